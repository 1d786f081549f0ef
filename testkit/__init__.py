"""What tests/ and bench/ share: tiny Mistral-architecture models built on the fly and the
independent reference embedder they are checked against. Neither tests/ nor bench/ imports
the other; both import this."""
