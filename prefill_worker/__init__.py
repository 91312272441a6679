"""pdserve.prefill_worker component."""
