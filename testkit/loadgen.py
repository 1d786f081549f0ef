"""Load generator for OpenAI-compatible `/embeddings` endpoints (asyncio + aiohttp).

Closed loop (default): N clients each send requests back to back (the next as soon as the
previous answered). Open loop (`arrivals`): request k is sent at its scheduled time whatever
the earlier ones are doing (at most N in flight), and its latency counts from that time, so a
slow server cannot hide its queue by slowing the client down (no coordinated omission). Either
stops when a request count or a duration runs out; requests in flight then are awaited (each
bounded by `timeout_s`). Every request is recorded: latency, texts, tokens from the response's
`usage`, and the HTTP status or the exception or failed check that failed it.

Function API (reused by the other benchmarks):

    from testkit.loadgen import run_load_sync, summarize, arrivals
    from testkit import workloads
    result = run_load_sync("http://127.0.0.1:8000/v1", "all-MiniLM-L6-v2",
                           workloads.search(), concurrency=32, max_requests=2000, max_duration_s=20)
    result = run_load_sync(..., arrivals=arrivals(lambda t: 4.0, 60), ...)  # 4 requests/s, open loop
    print(summarize(result))

`source` is any callable `index -> Request` (see testkit/workloads.py) or `index -> list[str]`; an item's
`body` (a dict, if it has one) adds fields to its request's body alone.

CLI (targets 127.0.0.1 by default; bounded by --requests and --duration):

    python -m testkit.loadgen --workload search --duration 20 --requests 2000
    python -m testkit.loadgen --url http://127.0.0.1:7997 --workload bulk --concurrency 8 --json out.json
    python -m testkit.loadgen --workload search --rate 4 --duration 30   # open loop, 4 requests/s
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import numpy as np

try:
    import orjson

    _dumps, _loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency of the service
    _dumps = lambda obj: json.dumps(obj).encode()  # noqa: E731
    _loads = json.loads

try:
    from tqdm import tqdm  # progress bars: pip install -e '.[bench]'
except ImportError:  # pragma: no cover
    tqdm = None

WARMUP_OFFSET = 1_000_000  # warm-up requests use indices far from the measured ones


@dataclass
class RequestRecord:
    index: int  # position in the workload's request stream
    tag: str  # the request's kind (e.g. "search", "bulk")
    client: int
    start_s: float  # since the run started (open loop: when it was due)
    latency_s: float  # from start_s to the response
    n_texts: int
    status: int  # HTTP status; 0 when no response (connection error, timeout)
    error: str | None = None  # error code from the body, or the exception's class name
    usage_tokens: int | None = None  # response usage.prompt_tokens
    send_delay_s: float = 0.0  # open loop: sent this long after it was due (waiting for a slot)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


@dataclass
class LoadResult:
    url: str
    model: str
    concurrency: int
    max_requests: int
    max_duration_s: float
    wall_s: float  # first request sent → last response received
    stopped_by: str  # "requests", "duration" or "interrupted"
    records: list[RequestRecord] = field(default_factory=list)
    label: str = ""


def _as_request(item: Any, index: int) -> tuple[Sequence[str], str, dict]:
    """The texts, the tag and the request's own body fields (an item's `body`, e.g. input_type)."""
    texts = getattr(item, "texts", None)
    if texts is not None:
        return list(texts), getattr(item, "tag", ""), getattr(item, "body", None) or {}
    if isinstance(item, str):
        return [item], "", {}
    return list(item), "", {}


def embeddings_url(base_url: str) -> str:
    """`http://host:port/v1` or `http://host:port` (Infinity) or a full …/embeddings URL."""
    base = base_url.rstrip("/")
    return base if base.endswith("/embeddings") else base + "/embeddings"


async def run_load(
    base_url: str,
    model: str,
    source: Callable[[int], Any],
    *,
    concurrency: int,
    max_requests: int,
    max_duration_s: float,
    arrivals: Sequence[float] | None = None,
    extra_body: dict | None = None,
    encoding_format: str | None = "base64",
    timeout_s: float = 60.0,
    headers: dict | None = None,
    index_offset: int = 0,
    validate: Callable[[int, dict], str | None] | None = None,
    t0: float | None = None,
    progress: bool = True,
    label: str = "",
) -> LoadResult:
    """Drive the load; stop after `max_requests` or `max_duration_s`.

    Closed loop: `concurrency` clients. Open loop: request k is due `arrivals[k]` seconds after
    the start, at most `concurrency` in flight (a request waiting for a slot is late, and its
    latency shows it). Request k uses `source(index_offset + k)`, so every system driven with
    the same source and offset sees the same texts in the same order. `validate(index, payload)`
    checks each 200 further (an error code, or None). `t0`: a `time.perf_counter()` origin
    shared with other tasks (default: now). `encoding_format=None` leaves the field out.
    """
    if concurrency < 1 or max_requests < 1 or max_duration_s <= 0:
        raise ValueError("concurrency, max_requests and max_duration_s must be positive")
    url = embeddings_url(base_url)
    body_extra = dict(extra_body or {})
    if encoding_format is not None:
        body_extra["encoding_format"] = encoding_format
    send_headers = {"content-type": "application/json", **(headers or {})}
    records: list[RequestRecord] = []
    t0 = time.perf_counter() if t0 is None else t0
    deadline = time.perf_counter() + max_duration_s
    issued, stopped_by = 0, "requests"
    bar = tqdm(total=max_requests, desc=label or "requests", unit="req", leave=False, file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True) if progress and tqdm is not None else None

    async def send(client: aiohttp.ClientSession, cid: int, index: int, due: float) -> None:
        texts, tag, own = _as_request(source(index), index)
        body = _dumps({"model": model, "input": texts, **body_extra, **own})
        sent = time.perf_counter()
        status, error, usage = 0, None, None
        try:
            async with client.post(url, data=body, headers=send_headers) as response:
                status, content = response.status, await response.read()
            error, usage = _check(status, content, len(texts), validate and (lambda payload: validate(index, payload)))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = type(exc).__name__
        end = time.perf_counter()
        records.append(RequestRecord(index, tag, cid, due - t0, end - due, len(texts), status, error, usage,
                                     sent - due))
        if bar is not None:
            bar.update(1)

    def next_index(now: float) -> int | None:
        """The next request's index, or None once the count is reached or `now` is past the deadline."""
        nonlocal issued, stopped_by
        if issued >= max_requests or (arrivals is not None and issued >= len(arrivals)):
            return None
        if now >= deadline:
            stopped_by = "duration"
            return None
        issued += 1
        return index_offset + issued - 1

    async def client_loop(cid: int, client: aiohttp.ClientSession) -> None:
        while (index := next_index(time.perf_counter())) is not None:
            await send(client, cid, index, time.perf_counter())

    async def dispatcher(client: aiohttp.ClientSession) -> None:
        slots, start, tasks = asyncio.Semaphore(concurrency), time.perf_counter(), set()

        async def one(k: int, index: int, due: float) -> None:
            try:
                await send(client, k % concurrency, index, due)
            finally:
                slots.release()

        k = 0
        while True:
            due = start + arrivals[min(k, len(arrivals) - 1)]
            if (index := next_index(due)) is None:  # a request due before the deadline is sent, even late
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await slots.acquire()
            task = asyncio.create_task(one(k, index, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks)

    # aiohttp, not httpx: httpx's connection pool costs CPU that grows with the connections open
    # (encode/httpx#3215), so at a few hundred in flight the load generator, not the service, was
    # what saturated a core; on a 2-core machine the client's CPU is also taken from the server's.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as client:
        loops = [dispatcher(client)] if arrivals is not None else [client_loop(c, client) for c in range(concurrency)]
        tasks = [asyncio.create_task(loop) for loop in loops]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            stopped_by = "interrupted"
            for task in tasks:
                task.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    wall = max((r.start_s + r.latency_s for r in records), default=0.0)
    return LoadResult(url, model, concurrency, max_requests, max_duration_s, wall, stopped_by, records, label)


def arrivals(rate: Callable[[float], float], duration_s: float, max_requests: int = 1_000_000) -> list[float]:
    """The schedule of an open-loop load: send times (s) at `rate(t)` requests/s for `duration_s`."""
    out, t = [], 0.0
    while t < duration_s and len(out) < max_requests:
        r = rate(t)
        if r <= 0:
            t += 0.05
            continue
        out.append(t)
        t += 1.0 / r
    return out


def vectors(payload: dict) -> np.ndarray:
    """A 200's embeddings in `index` order, float32 (from base64 or float lists)."""
    data = sorted(payload["data"], key=lambda d: d["index"])
    if data and isinstance(data[0]["embedding"], str):
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def _check(status: int, content: bytes, n_texts: int, validate=None) -> tuple[str | None, int | None]:
    """(error, usage tokens): an error code for a non-200 or a malformed 200, else None."""
    try:
        payload = _loads(content)
    except ValueError:
        return ("invalid_json" if status == 200 else f"http_{status}"), None
    if status != 200:
        err = payload.get("error") if isinstance(payload, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return (code or f"http_{status}"), None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != n_texts:
        return "wrong_item_count", None
    if [d.get("index") for d in data] != list(range(n_texts)):
        return "wrong_indexes", None
    tokens = (payload.get("usage") or {}).get("prompt_tokens")
    return (validate(payload) if validate else None), tokens if isinstance(tokens, int) else None


def run_load_sync(*args, **kwargs) -> LoadResult:
    """`run_load` from synchronous code (uses uvloop when installed: less client CPU)."""
    try:
        import uvloop

        return uvloop.run(run_load(*args, **kwargs))
    except ImportError:
        return asyncio.run(run_load(*args, **kwargs))


def latency_stats(latencies: Sequence[float]) -> dict:
    """Count, mean, p50/p90/p95/p99 (linear interpolation) and max, in seconds."""
    v = np.asarray(latencies, dtype=float)
    if not len(v):
        return {"n": 0, **dict.fromkeys(("mean_s", "p50_s", "p90_s", "p95_s", "p99_s", "max_s"))}
    p50, p90, p95, p99 = (float(x) for x in np.percentile(v, [50, 90, 95, 99]))
    return {"n": len(v), "mean_s": float(v.mean()), "p50_s": p50, "p90_s": p90, "p95_s": p95, "p99_s": p99,
            "max_s": float(v.max())}


def summarize(
    result_or_records: LoadResult | Sequence[RequestRecord],
    wall_s: float | None = None,
    tokens_of: Callable[[int], int] | None = None,
) -> dict:
    """Throughput, latency percentiles and failures of a run.

    Tokens come from `tokens_of(request index)` when given (one token count for every
    system, whatever its `usage` reports), else from the responses' `usage`.
    """
    if isinstance(result_or_records, LoadResult):
        records, wall_s = result_or_records.records, result_or_records.wall_s
    else:
        records = list(result_or_records)
        if wall_s is None:
            wall_s = max((r.start_s + r.latency_s for r in records), default=0.0)
    ok = [r for r in records if r.ok]
    texts = sum(r.n_texts for r in ok)
    if tokens_of is not None:
        tokens = sum(tokens_of(r.index) for r in ok)
    else:
        tokens = sum(r.usage_tokens or 0 for r in ok)
    usage_tokens = sum(r.usage_tokens or 0 for r in ok) if any(r.usage_tokens is not None for r in ok) else None
    failures = Counter(f"{r.status}:{r.error}" if r.error else str(r.status) for r in records if not r.ok)
    per = (lambda x: x / wall_s) if wall_s else (lambda x: None)
    summary = {
        "requests": len(records),
        "ok": len(ok),
        "failed": len(records) - len(ok),
        "failures": dict(failures),
        "texts": texts,
        "tokens": tokens,
        "tokens_source": "counted" if tokens_of is not None else "usage",  # usage: as the server reports it
        "usage_tokens": usage_tokens,
        "wall_s": wall_s,
        "requests_per_s": per(len(ok)),
        "texts_per_s": per(texts),
        "tokens_per_s": per(tokens),
        "latency": latency_stats([r.latency_s for r in ok]),
    }
    tags = sorted({r.tag for r in ok})
    if len(tags) > 1:
        summary["latency_by_tag"] = {t: latency_stats([r.latency_s for r in ok if r.tag == t]) for t in tags}
    return summary


def format_summary(s: dict) -> str:
    lat = s["latency"]
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"  # noqa: E731
    line = (
        f"{s['ok']}/{s['requests']} ok in {s['wall_s']:.1f} s: {s['texts_per_s'] or 0:.1f} texts/s, "
        f"{s['tokens_per_s'] or 0:.0f} {'usage-' if s.get('tokens_source') == 'usage' else ''}tokens/s, "
        f"{s['requests_per_s'] or 0:.1f} req/s, "
        f"p50 {ms(lat['p50_s'])}, p99 {ms(lat['p99_s'])}"
    )
    if s["failures"]:
        line += f", failures {s['failures']}"
    return line


def main(argv: list[str] | None = None) -> int:
    from testkit import workloads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1",
                   help="base URL (…/v1 for our service, http://host:port for Infinity)")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--workload", choices=sorted(workloads.WORKLOADS), default="search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=None, help="clients (default: the workload's); open loop: "
                   "the most requests in flight")
    p.add_argument("--rate", type=float, default=None, help="open loop: requests per second (default: closed loop)")
    p.add_argument("--requests", type=int, default=1000, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=20.0, help="stop sending after this many seconds")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--encoding-format", default="base64", help="'float', 'base64' or 'none' (leave out)")
    p.add_argument("--extra", default=None, help='JSON merged into every body, e.g. \'{"truncate": true}\'')
    p.add_argument("--warmup", type=int, default=0, help="unrecorded requests sent first (indices from 1e6)")
    p.add_argument("--json", default=None, help="write the summary (and every record) here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.requests < 1 or args.duration <= 0:
        p.error("--requests and --duration must be positive: runs are always bounded")

    wl = workloads.get(args.workload, args.seed, args.concurrency)
    fmt = None if args.encoding_format == "none" else args.encoding_format
    extra = json.loads(args.extra) if args.extra else None
    common = dict(concurrency=wl.concurrency, extra_body=extra, encoding_format=fmt, timeout_s=args.timeout)
    if args.warmup:
        run_load_sync(args.url, args.model, wl, max_requests=args.warmup, max_duration_s=args.duration,
                      index_offset=WARMUP_OFFSET, progress=False, **common)
    schedule = arrivals(lambda t: args.rate, args.duration, args.requests) if args.rate else None
    result = run_load_sync(args.url, args.model, wl, max_requests=args.requests, max_duration_s=args.duration,
                           arrivals=schedule, progress=not args.no_progress, label=args.workload, **common)
    summary = summarize(result)
    print(f"{args.workload} × {wl.concurrency} clients → {args.url}: {format_summary(summary)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "records": [asdict(r) for r in result.records]}, f, indent=1)
    return 1 if summary["ok"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
