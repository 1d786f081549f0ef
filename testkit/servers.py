"""An HTTP system under test as a subprocess in its own session: `ServedSystem` runs our service
from a Serve config (deploy/local.yaml) as `python -m testkit.harness CONFIG` on a fresh private
Ray instance (bench/infinity.py runs the peer the same way).

A system checks that the port it serves on is listened on by *its own* processes only (another
Serve instance on this machine could otherwise share a port), and stops by signalling the
process it started, then killing what is left of that process's tree, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from testkit.harness import OFFLINE_ENV, REPO, WORK, free_port, port_listeners
from testkit.procstats import descendants


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
        cmd = [sys.executable, "-m", "testkit.harness", str(self.config), "--port", str(self.port),
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
