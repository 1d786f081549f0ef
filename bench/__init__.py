"""Benchmarks and load generation for the embeddings service (see bench/README.md)."""
