"""Embedder autoscaling on the token backlog, not on request counts.

A request of 2048 long documents and a one-word query are each "one request" to Serve's
default policy, but differ by six orders of magnitude in work. Each Embedder replica reports
the tokens it holds (queued in its batcher plus in the forward pass); this policy sizes the
deployment so that each replica holds about `target_backlog_tokens`. Requests still waiting
at the handles (they never reached a replica) are counted at the mean size of those that did.
Serve applies min/max_replicas and the up/downscale delays around it.

Config (deploy/config.yaml, Embedder's autoscaling_config):
    policy:
      policy_function: serve_app.deployments.autoscaling:TokenBacklogPolicy
      policy_kwargs: {target_backlog_tokens: 65536}
"""

from __future__ import annotations

import math

BACKLOG_TOKENS = "backlog_tokens"
BACKLOG_REQUESTS = "backlog_requests"


class TokenBacklogPolicy:
    def __init__(self, target_backlog_tokens: int = 65536):
        if target_backlog_tokens <= 0:
            raise ValueError("target_backlog_tokens must be positive")
        self.target_backlog_tokens = target_backlog_tokens

    def __call__(self, ctx) -> tuple[float, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        tokens = sum((metrics.get(BACKLOG_TOKENS) or {}).values())
        requests = sum((metrics.get(BACKLOG_REQUESTS) or {}).values())
        waiting_at_handles = ctx.total_queued_requests or 0.0
        if waiting_at_handles and requests > 0:
            tokens += waiting_at_handles * tokens / requests
        elif waiting_at_handles:
            tokens += waiting_at_handles * self.target_backlog_tokens  # no sample yet: assume heavy
        desired = math.ceil(tokens / self.target_backlog_tokens) if tokens > 0 else 0
        # Never shrink below the replicas that are busy right now.
        busy = sum(1 for value in (metrics.get(BACKLOG_REQUESTS) or {}).values() if value > 0)
        return max(desired, busy), {"backlog_tokens": tokens}
