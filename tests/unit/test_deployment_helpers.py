"""Ray-free helpers of the deployments: cutting requests into parts of the batch budget, where a
request is tokenized, Serve log hygiene."""

import logging

from serve_app.api.schemas import Inputs
from serve_app.deployments.serve_logging import SERVE_LOGGER, drop_batch_size_warning
from serve_app.deployments.tokenizer_client import (
    INTERACTIVE_TOKENIZE_FACTOR,
    LOCAL_CHECK_MAX_IDS,
    LOCAL_TOKENIZE_MAX_CHARS,
    THREAD_TOKENIZE_MAX_CHARS,
    TokenizeAt,
    where_to_tokenize,
)
from serve_app.engine.parts import cut_to_budget, flatten


def test_requests_are_cut_into_parts_that_fit_the_batch_budget():
    sequences = [[7] * n for n in (3, 4, 2, 9, 1, 1, 5)]
    parts = cut_to_budget(sequences, max_tokens=6)
    assert [[len(ids) for ids in part] for part in parts] == [[3], [4, 2], [9], [1, 1], [5]]
    assert flatten(parts) == sequences  # order kept; an over-budget sequence travels alone
    assert cut_to_budget([], 6) == []


def test_where_a_request_is_tokenized_goes_by_its_size_and_class():
    """Small requests, and interactive ones of a few long inputs, on the Ingress's event loop;
    bulk text requests on its threads; the largest, and large token-id ones, at the Tokenizer."""

    def texts(chars: int) -> Inputs:
        return Inputs(texts=["x" * (chars - 1), "y"])

    def ids(n: int) -> Inputs:
        return Inputs(token_ids=[[1] * (n - 1), [2]])

    loop, thread, tokenizer = TokenizeAt.EVENT_LOOP, TokenizeAt.INGRESS_THREAD, TokenizeAt.TOKENIZER
    for inputs, limit, beyond in ((texts, LOCAL_TOKENIZE_MAX_CHARS, thread), (ids, LOCAL_CHECK_MAX_IDS, tokenizer)):
        assert where_to_tokenize(inputs(limit), asks_interactive=False) is loop
        assert where_to_tokenize(inputs(limit + 1), asks_interactive=False) is beyond
        assert where_to_tokenize(inputs(limit * INTERACTIVE_TOKENIZE_FACTOR), asks_interactive=True) is loop
        assert where_to_tokenize(inputs(limit * INTERACTIVE_TOKENIZE_FACTOR + 1), asks_interactive=True) is beyond
    for asks_interactive in (False, True):
        assert where_to_tokenize(texts(THREAD_TOKENIZE_MAX_CHARS), asks_interactive) is thread
        assert where_to_tokenize(texts(THREAD_TOKENIZE_MAX_CHARS + 1), asks_interactive) is tokenizer


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
