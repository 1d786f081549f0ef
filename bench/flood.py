"""A flood of over-bound requests beside plain queries (issue 20): how fast each refusal comes,
and what the flood costs a query sent meanwhile.

`python -m bench.flood` serves deploy/local.yaml (all-MiniLM-L6-v2, max_tokens_per_request
300 000) on a private Ray instance and sends `--requests` concurrent requests of `--inputs`
inputs, each input within the model's length limit but the request over the token limit, and a
plain one-text query every `--query-every-s` while they are answered. Checks: every over-bound
request gets a well-formed 400 too_many_tokens or 503 overloaded (with Retry-After), every query
a 200, and the targets (each refusal and each query under 1 s). Run it on a quiet machine: the
figures are latencies. Writes bench/results/flood.{md,json} (or `--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

from testkit import harness

TARGET_S = 1.0
# ~200 MiniLM tokens (WordPiece: one per word here), under its 256-token input limit.
INPUT_TEXT = " ".join(["vectors"] * 198)


async def _timed(client: httpx.AsyncClient, body: dict | bytes) -> tuple[float, httpx.Response]:
    """A request's latency. A large body is passed already serialized: encoding 3 MB of JSON in
    this event loop would stall every other request's clock and count the client's work as the
    service's."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    response = await client.post("/v1/embeddings", content=content, headers={"content-type": "application/json"})
    return time.perf_counter() - t0, response


def _refusal_ok(response: httpx.Response) -> bool:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    if set(error) != {"message", "type", "param", "code"}:
        return False
    if response.status_code == 503:
        return error["code"] == "overloaded" and "retry-after" in response.headers
    return response.status_code == 400 and error["code"] == "too_many_tokens"


async def flood(url: str, model: str, n_requests: int, n_inputs: int, query_every_s: float) -> dict:
    over = json.dumps({"model": model, "input": [INPUT_TEXT] * n_inputs}).encode()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=n_requests + 8),
                                 trust_env=False) as client:
        await _timed(client, {"model": model, "input": "warm up"})
        refusals = [asyncio.ensure_future(_timed(client, over)) for _ in range(n_requests)]
        queries = []
        while not all(r.done() for r in refusals):
            queries.append(asyncio.ensure_future(
                _timed(client, {"model": model, "input": f"plain query {len(queries)}", "input_type": "query"})))
            await asyncio.sleep(query_every_s)
        refused = await asyncio.gather(*refusals)
        answered = await asyncio.gather(*queries)
    return {"refusals": [(s, r.status_code, _refusal_ok(r)) for s, r in refused],
            "queries": [(s, r.status_code) for s, r in answered]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--inputs", type=int, default=2000)
    p.add_argument("--query-every-s", type=float, default=0.1)
    p.add_argument("--out", type=Path, default=harness.RESULTS / "flood")
    args = p.parse_args(argv)
    wall0 = time.monotonic()
    machine = harness.machine()
    config = harness.read_config()
    model = config["applications"][0]["args"]["models"][0]["name"]
    port = harness.free_port()
    temp_dir = harness.start_ray()
    try:
        harness.deploy(config, port)
        url = f"http://127.0.0.1:{port}"
        harness.wait_healthy(url)
        result = asyncio.run(flood(url, model, args.requests, args.inputs, args.query_every_s))
    finally:
        harness.stop_ray(temp_dir)
    refusal_s = [s for s, _, _ in result["refusals"]]
    query_s = [s for s, _ in result["queries"]]
    figures = {
        "over-bound requests": len(refusal_s),
        "refusal p50 ms": harness.ms(statistics.median(refusal_s)), "refusal max ms": harness.ms(max(refusal_s)),
        "503 of them": sum(status == 503 for _, status, _ in result["refusals"]),
        "queries during the flood": len(query_s),
        "query p50 ms": harness.ms(statistics.median(query_s)), "query max ms": harness.ms(max(query_s)),
    }
    checks = {
        "every over-bound request refused in the OpenAI shape (400 too_many_tokens or 503 + Retry-After)":
            all(ok for _, _, ok in result["refusals"]),
        "every query answered 200": all(status == 200 for _, status in result["queries"]),
        f"every refusal under {TARGET_S:.0f} s": max(refusal_s) < TARGET_S,
        f"every query under {TARGET_S:.0f} s": max(query_s) < TARGET_S,
    }
    report = harness.stamp("bench.flood", argv, machine, wall0) | {"figures": figures, "checks": checks, **result}
    lines = harness.header("Flood of over-bound requests", report, (
        f"{args.requests} concurrent requests of {args.inputs} inputs of ~200 tokens each (over "
        f"max_tokens_per_request) to {model}, a plain query every {args.query_every_s} s meanwhile."))
    harness.write(args.out, report, lines + harness.md_figures(figures) + [""] + harness.md_checks(checks))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
