"""AI Systems, hands-on: the reference implementation of every lab and the shared runtime."""
