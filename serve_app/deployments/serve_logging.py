"""Serve log hygiene for our replicas.

Serve warns at start-up when a `@serve.batch` max_batch_size times max_concurrent_batches exceeds
the deployment's max_ongoing_requests, and advises raising max_ongoing_requests to that product.
Our batches are sized in tokens (batch_size_fn), not requests, so the advice (half a million
requests for 8192 tokens × 64 batches) is wrong and would mislead an operator: drop that line.
"""

from __future__ import annotations

import logging

SERVE_LOGGER = "ray.serve"


class _TokenBudgetWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is larger than `max_ongoing_requests`" not in record.getMessage()


def drop_batch_size_warning() -> None:
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, _TokenBudgetWarningFilter) for f in logger.filters):
        logger.addFilter(_TokenBudgetWarningFilter())
