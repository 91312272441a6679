"""pdserve.engine component."""
