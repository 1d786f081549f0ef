"""The token-backlog policy on synthetic autoscaling contexts (no cluster needed)."""

from types import SimpleNamespace

from serve_app.deployments.autoscaling import TokenBacklogPolicy


def ctx(replicas, tokens, requests, queued_at_handles=0.0):
    return SimpleNamespace(
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        total_queued_requests=queued_at_handles,
        aggregated_metrics={
            "backlog_tokens": {f"r{i}": t for i, t in enumerate(tokens)},
            "backlog_requests": {f"r{i}": r for i, r in enumerate(requests)},
        },
    )


def test_scales_with_tokens_not_requests():
    policy = TokenBacklogPolicy(target_backlog_tokens=1000)
    # One request of 5000 tokens needs five replicas; fifty one-token requests need one.
    assert policy(ctx(1, [5000], [1]))[0] == 5
    assert policy(ctx(1, [50], [50]))[0] == 1


def test_requests_waiting_at_handles_count_at_the_observed_mean_size():
    policy = TokenBacklogPolicy(target_backlog_tokens=1000)
    # 2 requests of 500 tokens at the replica, 6 more waiting: 4000 tokens in all.
    assert policy(ctx(1, [1000], [2], queued_at_handles=6))[0] == 4


def test_idle_deployment_asks_for_nothing_and_busy_replicas_are_kept():
    policy = TokenBacklogPolicy(target_backlog_tokens=1000)
    assert policy(ctx(3, [0, 0, 0], [0, 0, 0]))[0] == 0  # Serve clamps to min_replicas
    assert policy(ctx(3, [10, 10, 0], [1, 1, 0]))[0] == 2


def test_no_replicas_keeps_the_current_target():
    policy = TokenBacklogPolicy()
    assert policy(SimpleNamespace(current_num_replicas=0, target_num_replicas=1))[0] == 1
