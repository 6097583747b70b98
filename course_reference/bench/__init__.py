"""Benchmarks: each lab's reference against PyTorch's own implementation, in one process."""
