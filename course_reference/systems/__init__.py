"""The systems of Part III, small enough to read: each one is checked against its dense,
single-process PyTorch equivalent in tests/test_systems_*.py and run on the book's pages."""
