"""Batch jobs: embed a whole corpus with Ray Data, on the same engine and rules as the service.

A fourth layer beside engine/api/deployments: it uses serve_app/engine and the app's config
types, never the Serve deployments. `python -m serve_app.batch --help` runs it (see job.py).
"""
