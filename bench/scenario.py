"""Small pieces the scenarios share beyond bench/harness.py: a results file's opening lines,
the samples of a timeline where something changed, counting lines in Ray's Serve logs, and
striking a replica with a fault while it holds work (fault_when_busy)."""

from __future__ import annotations

import glob
import os

from bench import harness


def header(title: str, report: dict, what: str) -> list[str]:
    """A scenario's results file opens with its title, the command, when, on what, and `what`."""
    return [f"# {title}", "", f"`{report['command']}`, {report['generated']}; "
            f"{harness.machine_line(report['machine'])}. {what}", ""]


def changes(samples: list[dict], keys: tuple[str, ...] | None = None) -> list[dict]:
    """The first sample and each one whose state (its `keys`, else all but the time) differs from
    the sample before it."""
    def state(s: dict) -> dict:
        return {k: v for k, v in s.items() if (k in keys if keys else k not in ("t", "t_s"))}

    return [s for i, s in enumerate(samples) if i == 0 or state(s) != state(samples[i - 1])]


def serve_log_lines(temp_dir: str, pattern: str, needle: str) -> int:
    """Lines containing `needle` in the Serve logs named `pattern` of the Ray instance in `temp_dir`."""
    # session_latest links to the session directory: read each file once.
    paths = {os.path.realpath(p) for p in glob.glob(os.path.join(temp_dir, "ray", "session_*", "logs", "serve",
                                                                  pattern))}
    count = 0
    for path in paths:
        with open(path, errors="replace") as f:
            count += sum(needle in line for line in f)
    return count


# --- faults at a moment that proves something -----------------------------------------------


def ongoing_requests(actor) -> int:
    """Requests a Serve replica holds now (running, or waiting in it, e.g. in its batcher), as the
    replica itself counts them."""
    import ray

    return int(ray.get(actor.get_num_ongoing_requests.remote(), timeout=10))


async def fault_when_busy(actor_name: str, fault, *, t0: float, not_before_s: float, give_up_s: float,
                          min_ongoing: int = 1, poll_s: float = 0.02) -> dict:
    """Apply `fault(actor)` to the Serve replica `actor_name` as soon as it holds at least
    `min_ongoing` requests, polling from `not_before_s` until `give_up_s` (seconds since `t0`,
    a `time.perf_counter()` origin). A fault at a fixed time may land while the replica is idle
    and prove nothing; this one lands while it holds work. `fault` is any callable of the actor
    handle (`ray.kill`, a hook that breaks its device, ...). Returns when it struck (None if the
    replica never held that much work) and how many requests the replica held just before."""
    import asyncio
    import time

    import ray

    actor = ray.get_actor(actor_name, namespace="serve")
    await asyncio.sleep(max(0.0, not_before_s - (time.perf_counter() - t0)))
    held, most = 0, 0
    while time.perf_counter() - t0 < give_up_s:
        held = await asyncio.to_thread(ongoing_requests, actor)
        most = max(most, held)
        if held >= min_ongoing:
            await asyncio.to_thread(fault, actor)
            return {"t_fault_s": round(time.perf_counter() - t0, 3), "ongoing_at_fault": held}
        await asyncio.sleep(poll_s)
    return {"t_fault_s": None, "ongoing_at_fault": None, "most_ongoing_seen": most}
