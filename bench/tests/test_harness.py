"""The benchmark harness's own logic, without a server: open-loop schedules, the mixed-traffic
benchmark's query stream and config patch, the cache report, and where clients connect."""

import copy

import pytest

from bench.mixed_traffic import cache_report, fifo_config, query_stream
from testkit import harness
from testkit.loadgen import arrivals


def test_open_loop_schedule_follows_the_rate_and_skips_idle_time():
    assert arrivals(lambda t: 4.0, 2.0) == pytest.approx([k * 0.25 for k in range(8)])
    ramp = arrivals(lambda t: 0.0 if t < 1.0 else 2.0, 3.0)
    assert ramp[0] == pytest.approx(1.0) and ramp == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert len(arrivals(lambda t: 100.0, 10.0, max_requests=7)) == 7


def test_a_query_is_repeated_only_when_its_text_was_sent_before():
    stream = query_stream(400, repeat_share=0.3, pool_size=20, seed=0)
    seen = set()
    for request in stream:
        (text,) = request.texts
        assert request.tag == ("repeated" if text in seen else "unique")
        seen.add(text)
    repeated = sum(r.tag == "repeated" for r in stream)
    assert 0 < repeated < 0.3 * len(stream)  # a pool query's first use counts as unique
    assert [r.texts for r in query_stream(400, 0.3, 20, seed=0)] == [r.texts for r in stream]  # seeded


def test_fifo_config_turns_classes_and_cache_off_and_leaves_the_original_alone():
    config = harness.read_config()
    before = copy.deepcopy(config)
    fifo = fifo_config(config)
    assert config == before
    args = fifo["applications"][0]["args"]
    assert args["priority"] == {"enabled": False}
    assert all(model["cache"] is False for model in args["models"])


def test_cache_report_counts_only_the_measured_window():
    before = {"ray_embeddings_cache_hits_total": 10.0, "ray_embeddings_cache_misses_total": 90.0,
              "ray_embeddings_cache_evictions_total": None}
    after = {"ray_embeddings_cache_hits_total": 40.0, "ray_embeddings_cache_misses_total": 150.0,
             "ray_embeddings_cache_evictions_total": None, "ray_embeddings_cache_bytes": 4096.0}
    report = cache_report(before, after)
    assert (report["hits"], report["misses"], report["evictions"]) == (30.0, 60.0, None)
    assert report["hit_rate"] == pytest.approx(1 / 3)
    assert cache_report({}, {})["hit_rate"] is None  # a system without the counters


def test_clients_reach_the_ingress_port_under_direct_ingress_alone_and_the_proxy_or_haproxy_otherwise():
    from ray.serve.schema import ServeDeploySchema

    direct = ServeDeploySchema.model_validate(harness.with_direct_ingress_only(harness.read_config()))
    harness.set_client_port(direct, 45678)
    env = direct.controller_options.runtime_env["env_vars"]
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "45678"
    assert env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "45679"  # exclusive: that one port
    assert direct.http_options.port != 45678  # the proxy moves out of the way
    for front in (harness.without_direct_ingress, harness.with_production_front):
        proxied = ServeDeploySchema.model_validate(front(harness.read_config()))
        harness.set_client_port(proxied, 45678)
        assert proxied.http_options.port == 45678 and proxied.http_options.host == "127.0.0.1"


def test_cpu_serving_rounds_report_each_systems_median_round_and_the_median_of_same_round_ratios():
    from bench.cpu_serving import median_ratios, median_rounds, round_ratios

    def entry(**tps):
        return {"label": "x", "info": {}, "workloads": {name: {"texts_per_s": v} for name, v in tps.items()}}

    # Served beats Infinity by 1.5x, 1.0x and 1.2x; each system's median rate comes from another
    # round (served: 3, Infinity: 1), so the ratio of the medians (132/100) is not the median ratio.
    rounds = [{"served-haproxy": entry(search=150.0), "infinity": entry(search=100.0)},
              {"served-haproxy": entry(search=60.0), "infinity": entry(search=60.0)},
              {"served-haproxy": entry(search=132.0), "infinity": entry(search=110.0)}]
    systems = {**median_rounds(rounds), "engine": entry(search=200.0)}
    assert systems["served-haproxy"]["workloads"]["search"] == {"texts_per_s": 132.0, "round": 3}
    assert systems["infinity"]["workloads"]["search"] == {"texts_per_s": 100.0, "round": 1}
    ratios = median_ratios(round_ratios(rounds, systems))["search"]
    assert ratios["served (HAProxy)/Infinity"] == pytest.approx(1.2)
    assert ratios["Infinity/in-process engine"] == pytest.approx(0.5)  # each round's Infinity over the one engine run
    assert ratios["served/Infinity"] is None
