"""pdserve.deploy component."""
