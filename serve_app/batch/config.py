"""The model a job embeds with, read from a Serve config: the one source of truth for its settings.

The `models` entry is parsed with the app's own types (AppArgs, ModelSpec), so a job and the
service cannot disagree about the source, adapter, pooling, EOS, instruction, length limit or
dtype. The Embedder's `ray_actor_options` in the config's `deployments:` section size one
engine actor of the job (num_gpus, num_cpus, custom resources).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serve_app.deployments.app import AppArgs, deployment_names
from serve_app.engine.spec import ModelSpec

BUILDER = "serve_app.deployments.app:build_app"
# What the Embedder deployment asks for when the config does not say (its decorator's default).
DEFAULT_ACTOR_OPTIONS = {"num_cpus": 1}
# The Ray resource arguments an engine actor takes over from the Embedder's ray_actor_options.
ACTOR_RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


@dataclass(frozen=True)
class JobModel:
    spec: ModelSpec
    actor_options: dict = field(default_factory=dict)  # Ray resources of one engine actor


def load_job_model(config_path: str | Path, model: str) -> JobModel:
    """The named model's spec and its Embedder's resources, from a `serve run` config file."""
    config = yaml.safe_load(Path(config_path).expanduser().read_text())  # `~`: a path on the job's node
    apps = [app for app in config.get("applications", []) if app.get("import_path") == BUILDER]
    names = []
    for app in apps:
        args = AppArgs.model_validate(app.get("args", {}))
        names += [m.name for m in args.models]
        spec = next((m for m in args.models if m.name == model), None)
        if spec is None:
            continue
        embedder = deployment_names(args.models)[1][spec.name]
        deployment = next((d for d in app.get("deployments", []) if d.get("name") == embedder), {})
        options = deployment.get("ray_actor_options") or DEFAULT_ACTOR_OPTIONS
        return JobModel(spec, {k: options[k] for k in ACTOR_RESOURCE_KEYS if k in options})
    raise ValueError(f"model {model!r} is not in {config_path} (its models: {names or 'none'})")
