"""Scenario tests against a live Serve app: an Embedder replica killed mid-load.

The full, multi-node versions (with plots and reports) are tests/scenarios/test_replica_kill.py and
tests/scenarios/test_autoscaling.py; this is the fast check, in the session's single Ray instance.
The app is deployed the way `serve run <config>` deploys one (a `ServeDeploySchema` applied
by the controller), under its own name and route prefix, so that its `deployments:` section
can fix the Embedder at two replicas without touching the session's other apps.
"""

import asyncio
import base64
import random
import time

import httpx
import numpy as np
import pytest

from testkit.app import TINY_MAX_TOKENS
from tests.scenarios.common import fault_when_busy

APP = "replica-kill"
PREFIX = "/replica-kill"
WORDS = "the quick brown fox jumps over lazy dog cat sleeps in warm sun search vectors".split()
CLIENTS = 8
LOAD_S = 12.0
KILL_AFTER_S = 3.0  # then as soon as the victim holds work (tests.scenarios.common.fault_when_busy)


def _embedder_replicas(controller) -> list[dict]:
    import ray

    details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    deployment = details["applications"][APP]["deployments"]["Embedder"]
    return [r for r in deployment["replicas"] if str(r["state"]).endswith("RUNNING")]


@pytest.fixture(scope="module")
def kill_app(ray_session, tiny_family):
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve_app.deployments.app import AppArgs

    args = {
        "models": [
            {
                "name": "tiny-sfr",
                "source": str(tiny_family["base"]),
                "max_input_tokens": TINY_MAX_TOKENS,
                "max_batch_tokens": 512,  # a request of 24 texts spans several parts
            }
        ]
    }
    if "auth" in AppArgs.model_fields:
        args["auth"] = {"enabled": False}  # loopback only
    small = {"num_cpus": 0.1}
    config = {
        "applications": [
            {
                "name": APP,
                "route_prefix": PREFIX,
                "import_path": "serve_app.deployments.app:build_app",
                "args": args,
                "deployments": [
                    {"name": "Ingress", "num_replicas": 1, "ray_actor_options": small},
                    {"name": "Tokenizer", "num_replicas": 1, "ray_actor_options": small},
                    {"name": "Embedder", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}},
                ],
            }
        ]
    }
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP)
        if app is not None and str(app.status).endswith("RUNNING"):
            break
        assert app is None or not str(app.status).endswith("DEPLOY_FAILED"), app.message
        time.sleep(0.5)
    else:
        pytest.fail("the replica-kill app never became RUNNING")
    base = getattr(ray_session, "url", ray_session)  # the fixture yields a namespace (or, before, the URL)
    yield base + PREFIX, client._controller
    serve.delete(APP)


def test_killing_an_embedder_replica_mid_load_loses_nothing(kill_app, base_reference):
    import ray

    url, controller = kill_app
    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + f" {i}" for i in range(300)]
    refs = dict(zip(pool, base_reference.embed(pool)))
    before = _embedder_replicas(controller)
    assert len(before) == 2

    async def drive():
        records, killed = [], {}
        t0 = time.perf_counter()

        async def client_loop(client, cid):
            k = 0
            while time.perf_counter() - t0 < LOAD_S:
                texts = rng.sample(pool, 24)
                start = time.perf_counter() - t0
                response = await client.post(
                    "/v1/embeddings", json={"model": "tiny-sfr", "input": texts, "encoding_format": "base64"})
                records.append((cid, k, start, time.perf_counter() - t0, texts, response))
                k += 1

        async def killer():
            victim = before[0]
            struck = await fault_when_busy(victim["actor_name"], lambda actor: ray.kill(actor, no_restart=True),
                                           t0=t0, not_before_s=KILL_AFTER_S, give_up_s=LOAD_S - 4)
            killed.update(victim, t=struck["t_fault_s"], held=struck["ongoing_at_fault"])

        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as client:
            await asyncio.gather(killer(), *(client_loop(client, c) for c in range(CLIENTS)))
        return records, killed

    records, killed = asyncio.run(drive())

    assert killed["held"], "the victim never held a request: the kill would prove nothing"
    spanning = [r for r in records if r[2] <= killed["t"] < r[3]]
    assert spanning, "no request was in flight when the replica was killed"
    for cid, k, _start, _end, texts, response in records:
        assert response.status_code == 200, (cid, k, response.status_code, response.text[:300])
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(texts)))  # none lost, none duplicated, in order
        got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
        np.testing.assert_allclose(got, np.stack([refs[t] for t in texts]), atol=1e-5)

    # Serve replaces the killed replica.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = _embedder_replicas(controller)
        ids = {r["replica_id"] for r in running}
        if len(running) == 2 and killed["replica_id"] not in ids:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the killed replica was not replaced: {running}")
