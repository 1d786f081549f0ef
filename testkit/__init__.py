"""What tests/ and bench/ share: tiny Mistral-architecture models built on the fly, the
independent reference embedder they are checked against, the test app's settings, and the load
harness (start a Serve config on a private Ray instance, drive it with seeded workloads, measure
CPU per process, write reports) that the benchmarks and the scenarios (tests/scenarios/) run on.
Neither tests/ nor bench/ imports the other; both import this."""
