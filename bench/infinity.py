"""Infinity (infinity-emb), the peer our service is compared with: `infinity_emb v2` from its own
virtual environment (bench/.venv-infinity), installed on first use, serving the same local model
directory offline, as a subprocess in its own session (testkit.servers' `_Subprocess`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from testkit.harness import REPO, WORK, free_port
from testkit.servers import _Subprocess

INFINITY_VERSION = "0.0.78"
# torch pinned in the same command: pip then takes the CPU wheel on local disk instead of a
# multi-GB CUDA build.
INFINITY_REQUIREMENTS = [f"infinity-emb[server,torch]=={INFINITY_VERSION}", "torch==2.13.0"]



class InfinitySystem(_Subprocess):
    """`infinity_emb v2` from bench/.venv-infinity, serving a local model directory offline."""

    name = "infinity"

    def __init__(self, model_dir: str, served_name: str, venv: Path = REPO / "bench" / ".venv-infinity",
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
