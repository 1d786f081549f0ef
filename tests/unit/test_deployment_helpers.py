"""Ray-free helpers of the deployments: cutting requests into parts of the batch budget, Serve log hygiene."""

import logging

from serve_app.deployments.serve_logging import SERVE_LOGGER, drop_batch_size_warning
from serve_app.engine.parts import cut_to_budget, flatten


def test_requests_are_cut_into_parts_that_fit_the_batch_budget():
    sequences = [[7] * n for n in (3, 4, 2, 9, 1, 1, 5)]
    parts = cut_to_budget(sequences, max_tokens=6)
    assert [[len(ids) for ids in part] for part in parts] == [[3], [4, 2], [9], [1, 1], [5]]
    assert flatten(parts) == sequences  # order kept; an over-budget sequence travels alone
    assert cut_to_budget([], 6) == []


def test_serves_request_count_advice_for_token_budgets_is_dropped_and_nothing_else(caplog):
    drop_batch_size_warning()
    drop_batch_size_warning()  # idempotent: one filter
    logger = logging.getLogger(SERVE_LOGGER)
    with caplog.at_level(logging.WARNING, logger=SERVE_LOGGER):
        logger.warning("`max_batch_size` (8192) * `max_concurrent_batches` (64) is larger than "
                       "`max_ongoing_requests` (64). This means ...")
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
    assert sum(type(f).__module__ == drop_batch_size_warning.__module__ for f in logger.filters) == 1
