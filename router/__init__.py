"""pdserve.router component."""
