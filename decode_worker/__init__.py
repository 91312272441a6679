"""pdserve.decode_worker component."""
