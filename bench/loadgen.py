"""Closed-loop load generator for OpenAI-compatible `/embeddings` endpoints (asyncio + httpx).

N clients each send requests back to back (the next as soon as the previous answered) until
a request count or a duration runs out, whichever comes first; requests in flight at the
deadline are awaited (each bounded by `timeout_s`). Every request is recorded: latency, texts,
tokens from the response's `usage`, and the HTTP status or the exception that failed it.

Function API (reused by other benchmarks):

    from bench.loadgen import run_load_sync, summarize
    from bench import workloads
    result = run_load_sync("http://127.0.0.1:8000/v1", "all-MiniLM-L6-v2",
                           workloads.search(), concurrency=32, max_requests=2000, max_duration_s=20)
    print(summarize(result))

`source` is any callable `index -> Request` (see bench/workloads.py) or `index -> list[str]`.

CLI (targets 127.0.0.1 by default; bounded by --requests and --duration):

    python -m bench.loadgen --workload search --duration 20 --requests 2000
    python -m bench.loadgen --url http://127.0.0.1:7997 --workload bulk --concurrency 8 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import httpx

try:
    import orjson

    _dumps, _loads = orjson.dumps, orjson.loads
except ImportError:  # pragma: no cover - orjson is a dependency of the service
    _dumps = lambda obj: json.dumps(obj).encode()  # noqa: E731
    _loads = json.loads

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@dataclass
class RequestRecord:
    index: int  # position in the workload's request stream
    tag: str  # the request's kind (e.g. "search", "bulk")
    client: int
    start_s: float  # since the run started
    latency_s: float
    n_texts: int
    status: int  # HTTP status; 0 when no response (connection error, timeout)
    error: str | None = None  # error code from the body, or the exception's class name
    usage_tokens: int | None = None  # response usage.prompt_tokens

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

    def to_dict(self, with_records: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        if with_records:
            d["records"] = [asdict(r) for r in self.records]
        return d


def _as_request(item: Any, index: int) -> tuple[Sequence[str], str]:
    texts = getattr(item, "texts", None)
    if texts is not None:
        return list(texts), getattr(item, "tag", "")
    if isinstance(item, str):
        return [item], ""
    return list(item), ""


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
    extra_body: dict | None = None,
    encoding_format: str | None = "base64",
    timeout_s: float = 60.0,
    headers: dict | None = None,
    index_offset: int = 0,
    progress: bool = True,
    label: str = "",
) -> LoadResult:
    """Drive `concurrency` closed-loop clients; stop after `max_requests` or `max_duration_s`.

    Request k of the run uses `source(index_offset + k)`, so every system driven with the same
    source and offset sees the same texts in the same order. `encoding_format=None` leaves the
    field out (the server's default, usually float).
    """
    if concurrency < 1 or max_requests < 1 or max_duration_s <= 0:
        raise ValueError("concurrency, max_requests and max_duration_s must be positive")
    url = embeddings_url(base_url)
    body_extra = dict(extra_body or {})
    if encoding_format is not None:
        body_extra["encoding_format"] = encoding_format
    send_headers = {"content-type": "application/json", **(headers or {})}

    records: list[RequestRecord] = []
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s
    stopped_by = "requests"
    bar = _Progress(max_requests, label, progress)

    def next_index() -> int | None:
        nonlocal issued, stopped_by
        if issued >= max_requests:
            return None
        if time.perf_counter() >= deadline:
            stopped_by = "duration"
            return None
        issued += 1
        return index_offset + issued - 1

    async def client_loop(cid: int, client: httpx.AsyncClient) -> None:
        while (index := next_index()) is not None:
            texts, tag = _as_request(source(index), index)
            body = _dumps({"model": model, "input": texts, **body_extra})
            start = time.perf_counter()
            status, error, usage = 0, None, None
            try:
                response = await client.post(url, content=body, headers=send_headers)
                status = response.status_code
                error, usage = _check(response, len(texts))
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            end = time.perf_counter()
            records.append(RequestRecord(index, tag, cid, start - t0, end - start, len(texts), status, error, usage))
            bar.update(records[-1])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        tasks = [asyncio.create_task(client_loop(c, client)) for c in range(concurrency)]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            stopped_by = "interrupted"
            for task in tasks:
                task.cancel()
            raise
        finally:
            bar.close()
    wall = max((r.start_s + r.latency_s for r in records), default=0.0)
    return LoadResult(url, model, concurrency, max_requests, max_duration_s, wall, stopped_by, records, label)


def _check(response: httpx.Response, n_texts: int) -> tuple[str | None, int | None]:
    """(error, usage tokens): an error code for a non-200 or a malformed 200, else None."""
    try:
        payload = _loads(response.content)
    except ValueError:
        return ("invalid_json" if response.status_code == 200 else None), None
    if response.status_code != 200:
        err = payload.get("error") if isinstance(payload, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return (code or f"http_{response.status_code}"), None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != n_texts:
        return "wrong_item_count", None
    usage = payload.get("usage") or {}
    tokens = usage.get("prompt_tokens")
    return None, tokens if isinstance(tokens, int) else None


def run_load_sync(*args, **kwargs) -> LoadResult:
    """`run_load` from synchronous code (uses uvloop when installed: less client CPU)."""
    try:
        import uvloop

        return uvloop.run(run_load(*args, **kwargs))
    except ImportError:
        return asyncio.run(run_load(*args, **kwargs))


class _Progress:
    """tqdm when installed, else a line every 5 s; silent when disabled."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.enabled, self.label = enabled, label
        self.n = self.failed = self.texts = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and tqdm is not None:
            self.bar = tqdm(total=total, desc=label or "requests", unit="req", leave=False, file=sys.stderr,
                            mininterval=0.5, dynamic_ncols=True)

    def update(self, rec: RequestRecord) -> None:
        if not self.enabled:
            return
        self.n += 1
        self.failed += not rec.ok
        self.texts += rec.n_texts if rec.ok else 0
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
            if now - self.last > 0.5:
                self.bar.set_postfix(texts_s=f"{self.texts / (now - self.t0):.1f}", failed=self.failed, refresh=False)
                self.last = now
        elif now - self.last >= 5.0:
            print(f"  {self.label}: {self.n} requests, {self.texts / (now - self.t0):.1f} texts/s, "
                  f"{self.failed} failed", file=sys.stderr, flush=True)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(latencies: Sequence[float]) -> dict:
    values = sorted(latencies)
    return {
        "n": len(values),
        "mean_s": sum(values) / len(values) if values else None,
        "p50_s": percentile(values, 50),
        "p90_s": percentile(values, 90),
        "p99_s": percentile(values, 99),
        "max_s": values[-1] if values else None,
    }


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
    from bench import workloads

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL (…/v1 for our service, http://host:port for Infinity)")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--workload", choices=sorted(workloads.WORKLOADS), default="search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", type=int, default=None, help="clients (default: the workload's)")
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
                      index_offset=1_000_000, progress=False, **common)
    result = run_load_sync(args.url, args.model, wl, max_requests=args.requests, max_duration_s=args.duration,
                           progress=not args.no_progress, label=args.workload, **common)
    summary = summarize(result)
    print(f"{args.workload} × {wl.concurrency} clients → {args.url}: {format_summary(summary)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": result.to_dict(), "summary": summary,
                       "records": [asdict(r) for r in result.records]}, f, indent=1)
    return 1 if summary["ok"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
