"""Benchmarks of the embeddings service, one command each (see bench/README.md); the load harness they run on is testkit/."""
