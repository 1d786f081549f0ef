"""The HTTP systems under test, each a subprocess in its own session.

* `ServedSystem`: our service from a Serve config (deploy/local.yaml), `python -m bench.harness
  CONFIG` on a fresh private Ray instance.
* `InfinitySystem`: `infinity_emb v2` from its own virtual environment (bench/.venv-infinity),
  installed on first use, serving the same local model directory offline.

Both check that the port they serve on is listened on by *their own* processes only (another
Serve instance on this machine could otherwise share a port), and stop by signalling the
process they started, then killing what is left of that process's tree, by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from .harness import OFFLINE_ENV, REPO, WORK, free_port, port_listeners
from .procstats import descendants

BENCH_DIR = REPO / "bench"
REPO_ROOT, WORK_DIR = REPO, WORK  # the names other benchmarks import

INFINITY_VERSION = "0.0.78"
# torch pinned in the same command: pip then takes the CPU wheel on local disk instead of a
# multi-GB CUDA build.
INFINITY_REQUIREMENTS = [f"infinity-emb[server,torch]=={INFINITY_VERSION}", "torch==2.13.0"]


class _Subprocess:
    name = "server"

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.tree: dict[int, float] = {}  # pid -> create_time of everything we started
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _start(self, cmd: list[str], env: dict, timeout_s: float) -> dict:
        """Spawn `cmd` in a session of its own; wait until /health answers 200 from a listener
        that is ours."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        while time.time() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            self._remember_tree()
            listeners = port_listeners(self.port)
            foreign = listeners - descendants(self.proc.pid)
            if foreign:
                raise RuntimeError(f"port {self.port} is also listened on by pids {sorted(foreign)}, not ours: "
                                   "refusing to send load there")
            try:
                if listeners and httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5.0,
                                           trust_env=False).status_code == 200:
                    self._remember_tree()
                    return {"port": self.port, "startup_s": time.time() - t0, "command": " ".join(cmd)}
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _remember_tree(self) -> None:
        for pid in descendants(self.proc.pid):
            try:
                self.tree.setdefault(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                pass

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 60.0) -> None:
        if self.proc is None:
            return
        self._remember_tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # Ray's workers live in sessions of their own: kill any of *our* recorded pids left.
        time.sleep(1.0)
        for pid, created in self.tree.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3:
                    p.kill()
            except psutil.Error:
                pass
        self.proc = None


class ServedSystem(_Subprocess):
    """Our service from a Serve config file, on its own fresh Ray instance.

    `env` is process-wide (it reaches the proxy and controller, not just replicas);
    `metrics_url` is Ray's Prometheus endpoint of that instance."""

    name = "served"

    def __init__(self, config: Path, env: dict[str, str] | None = None, num_cpus: int | None = None):
        super().__init__(WORK / "serve.log")
        self.config, self.extra_env, self.num_cpus = config, env or {}, num_cpus
        self.temp_dir = Path(f"/tmp/rb{os.getpid()}")  # short: Ray's socket paths have a length limit
        self.metrics_port: int | None = None

    def start(self, timeout_s: float = 300.0) -> dict:
        self.port = free_port()
        self.metrics_port = next(p for p in iter(free_port, None) if p != self.port)
        env = {**os.environ, **OFFLINE_ENV, **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "bench.harness", str(self.config), "--port", str(self.port),
               "--temp-dir", str(self.temp_dir), "--metrics-port", str(self.metrics_port)]
        if self.num_cpus:
            cmd += ["--num-cpus", str(self.num_cpus)]
        return self._start(cmd, env, timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, grace_s: float = 60.0) -> None:
        super().stop(grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class InfinitySystem(_Subprocess):
    """`infinity_emb v2` from bench/.venv-infinity, serving a local model directory offline."""

    name = "infinity"

    def __init__(self, model_dir: str, served_name: str, venv: Path = BENCH_DIR / ".venv-infinity",
                 dtype: str | None = None):
        super().__init__(WORK / "infinity.log")
        self.model_dir, self.served_name, self.venv = model_dir, served_name, venv
        self.dtype = dtype  # None: Infinity's default (float32 on CPU)

    def ensure_installed(self, timeout_s: float = 900.0) -> dict:
        """Create the venv and install Infinity unless a previous run did; reports the time."""
        spec, marker = " ".join(INFINITY_REQUIREMENTS), self.venv / ".bench-installed"
        if marker.exists() and marker.read_text().strip() == spec:
            return {"installed_now": False, "install_s": 0.0, "requirements": spec, **self.versions()}
        t0 = time.time()
        WORK.mkdir(parents=True, exist_ok=True)
        log = WORK / "infinity-install.log"
        print(f"installing {spec} into {self.venv} (log: {log}) ...", file=sys.stderr, flush=True)
        with open(log, "w") as f:
            if not (self.venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, stdout=f,
                               stderr=subprocess.STDOUT, timeout=120)
            subprocess.run([str(self.venv / "bin" / "python"), "-m", "pip", "install", *INFINITY_REQUIREMENTS],
                           check=True, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
        marker.write_text(spec + "\n")
        return {"installed_now": True, "install_s": time.time() - t0, "requirements": spec, **self.versions()}

    def versions(self) -> dict:
        code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                "['infinity-emb', 'torch', 'transformers', 'sentence-transformers', 'tokenizers']}))")
        out = subprocess.run([str(self.venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                             timeout=60)
        try:
            return {"versions": json.loads(out.stdout)}
        except ValueError:
            return {"versions": None}

    def start(self, timeout_s: float = 300.0) -> dict:
        self.port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
               "INFINITY_ANONYMOUS_USAGE_STATS": "0", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("VIRTUAL_ENV", None)
        cmd = [str(self.venv / "bin" / "infinity_emb"), "v2", "--model-id", self.model_dir,
               "--served-model-name", self.served_name, "--engine", "torch", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(self.port)] + (["--dtype", self.dtype] if self.dtype else [])
        return self._start(cmd, env, timeout_s)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"
