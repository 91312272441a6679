"""pdserve.api component."""
