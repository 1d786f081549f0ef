"""Where the front's CPU goes under load: py-spy over the Serve processes.

    python -m bench.front_profile                  # production path (HAProxy), 30 s of search load
    python -m bench.front_profile --path proxy --duration 20 --out bench/.work/front_profile
    python -m bench.front_profile --model minilm --workload bulk --out bench/.work/front_profile_bulk

The service and the load are bench.capacity's (SFR's tokenizer, or MiniLM's with --model minilm; the
simulated GPU; API keys on; a workload of bench.capacity's, by default one query per request). While
the load runs, `py-spy record --nonblocking` samples each Serve process (proxy, Ingress, Tokenizer,
Embedder) at 100 Hz, active threads only (idle ones are not sampled), without pausing them. Per
process: the share of its samples in each function's own code (self), and in each function or its
callees (inclusive), grouped by package, so that the largest costs show first. Time in native code
counts to the Python frame that called it: self time in `Worker.main_loop` is Ray's C++ core worker
(task execution, its gRPC and object store), in `Thread.run` or an event loop's run function the
loop's polling and the C extensions it calls. (py-spy's --native would split it, but it must pause
the processes per sample and then counts threads idle in epoll as busy.) Writes <out>.{md,json}
(default bench/results/front_profile).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from testkit.harness import RESULTS, WORK, log, machine, machine_line, md_table, stamp, write
from testkit.procstats import roles_under

from .capacity import PATHS, ROLES, cpu_per_request, prepare, run_phase, start_service, warm_up

TOP = 15
# "function (path/to/file.py:line)" as py-spy's raw format names a frame.
FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    return found


def serve_processes(root: int) -> dict[str, int]:
    """The pid of each role's Python process (one replica each, as bench.capacity deploys); not
    HAProxy's, which py-spy cannot read (its CPU per request is in the report all the same)."""
    pids: dict[str, int] = {}
    for role, pid in roles_under(root):
        role = "Embedder" if role.startswith("Embedder") else role
        if role in ROLES and role != "HAProxy":
            pids.setdefault(role, pid)
    return pids


def package_of(file: str) -> str:
    """A frame's package. py-spy names files relative to the process's import path (ray/actor.py,
    threading.py): the first part, a module of the standard library or a package; absolute paths
    are files outside it."""
    if file.startswith("/") or not file:
        return file or "?"
    return Path(file).parts[0].removesuffix(".py")


def frame_name(frame: str) -> tuple[str, str]:
    """(function with its file's last parts, package) of a raw frame."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    file = m.group("file")
    short = "/".join(Path(file).parts[-2:])
    return f"{m.group('function')} ({short})", package_of(file)


def summarize_raw(text: str) -> dict:
    """py-spy's raw (collapsed) stacks → samples, self and inclusive shares by function and package."""
    total, own, inclusive, packages = 0, Counter(), Counter(), Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1][0]] += n
        for name in {f[0] for f in frames}:
            inclusive[name] += n
        packages[frames[-1][1]] += n  # a package's self time: where the CPU actually is
    share = lambda counter: [(k, v / total) for k, v in counter.most_common(TOP)] if total else []  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(inclusive), "packages_self": share(packages)}


def raw_file(out_dir: Path, role: str) -> Path:
    return out_dir / f"{role.replace(' ', '_')}.txt"


def record(pids: dict[str, int], duration_s: float, out_dir: Path) -> dict[str, subprocess.Popen]:
    """One py-spy per process, sampling for `duration_s`; its messages go to the .txt's .log."""
    shutil.rmtree(out_dir, ignore_errors=True)  # no profile of an earlier run is read as this one's
    out_dir.mkdir(parents=True)
    recorders = {}
    for role, pid in pids.items():
        with open(raw_file(out_dir, role).with_suffix(".log"), "w") as messages:
            recorders[role] = subprocess.Popen(
                [py_spy(), "record", "--nonblocking", "--format", "raw", "--rate", "100",
                 "--duration", str(int(duration_s)), "--pid", str(pid), "--output", str(raw_file(out_dir, role))],
                stdout=messages, stderr=subprocess.STDOUT)
    return recorders


def render(res: dict) -> list[str]:
    lines = [f"# Where the front's CPU goes: py-spy under {res.get('workload', 'search')} load", "",
             f"`{res['command']}`, {res['generated']}; {machine_line(res['machine'])}.", "",
             "\n\n".join(__doc__.split("\n\n")[2:]), "",
             f"Load: {res['load']['ok']} requests in {res['load']['wall_s']:.0f} s "
             f"({res['load']['requests_per_s']:.1f}/s, {res['path']} path), while sampled.", ""]
    for role, profile in res["profiles"].items():
        cpu_ms = res["cpu_ms_per_request"].get(role)
        lines += [f"## {role}: {profile['samples']} samples"
                  + (f", {cpu_ms:.2f} ms of CPU per request" if cpu_ms is not None else ""), ""]
        for title, key in (("package (self)", "packages_self"), ("function (self)", "self"),
                           ("function (inclusive)", "inclusive")):
            lines += md_table([title, "share of samples"], [[f"`{k}`", f"{v:.1%}"] for k, v in profile[key]])
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=PATHS, default="haproxy", help="how clients reach the Ingress (bench.capacity's PATHS)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of sampled load")
    p.add_argument("--out", default=None, help="path prefix (default bench/results/front_profile)")
    p.add_argument("--model", choices=("sfr", "minilm"), default="sfr", help="whose tokenizer and vector size")
    p.add_argument("--workload", default="search", help="one of bench.capacity's workloads (search, bulk, ...)")
    args = p.parse_args(argv)
    wall0, facts = time.monotonic(), machine()
    work = WORK / "front_profile"
    setup = prepare(work, args.model, simulated=True)
    source = setup.sources[args.workload]
    path = args.path
    served, clock, _ = start_service(work / path, setup, path)
    try:
        warm_up(served, source, setup.key, 5.0, setup.model_name)
        pids = serve_processes(served.pid)
        log(f"sampling {pids} for {args.duration:.0f} s")
        recorders = record(pids, args.duration, work / "raw")
        phase = run_phase(served, clock, source, source.concurrency, args.duration, setup.key, phase=0,
                          model=setup.model_name)
        for role, proc in recorders.items():
            if proc.wait(timeout=args.duration + 60) != 0:
                log(f"py-spy on {role} failed: {raw_file(work / 'raw', role).with_suffix('.log').read_text()[-500:]}")
    finally:
        served.stop()
    raw = [(role, raw_file(work / "raw", role)) for role in recorders]
    profiles = {role: summarize_raw(path.read_text()) for role, path in raw if path.exists()}
    cpu_ms = {role: seconds * 1000 for role, seconds in cpu_per_request(phase).items()}
    res = {"path": path, "model": setup.model_name, "workload": args.workload, "profiles": profiles,
           "cpu_ms_per_request": cpu_ms,
           "load": {k: phase[k] for k in ("ok", "failed", "requests_per_s", "wall_s", "latency")}}
    res |= stamp("bench.front_profile", argv, facts, wall0)
    write(Path(args.out) if args.out else RESULTS / "front_profile", res, render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
