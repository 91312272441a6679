"""pdserve.kvtransfer component."""
