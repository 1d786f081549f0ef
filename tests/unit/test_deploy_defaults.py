"""The shipped configs set only what differs from the defaults, so every line in them is a decision.

Defaults come from where they live: the app's args from its pydantic models (AppArgs, ModelSpec,
Tuning), the rest of a Serve config from Serve's own schema, each deployment's options from its
@serve.deployment in serve_app/deployments, and cluster.yaml's from Ray's AWS defaults, which
`ray up` merges under it. deploy/rayservice.yaml's serveConfigV2 is deploy/config.yaml
(tests/unit/test_cluster_manifests.py); its KubeRay fields have no defaults file to check against.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path

import pytest
import ray.autoscaler
import yaml
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app.deployments.app import AppArgs
from serve_app.deployments.embedder import Embedder
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = ["config.yaml", "local.yaml"]
CODE_DEPLOYMENTS = {d.name: d for d in (Ingress, Tokenizer, Embedder)}
# cluster.yaml keys that select which defaults apply, so they are written even when they match.
CLUSTER_SELECTORS = {"provider/type", "provider/region"}


def nested_model(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, in an Optional or Union, or as list items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        return next(filter(None, map(nested_model, typing.get_args(annotation))), None)
    return None


def repeats(model: type[BaseModel], values: dict, path: str) -> list[str]:
    """Paths in `values` that restate `model`'s default, looking into nested models."""
    found = []
    for key, value in values.items():
        field = model.model_fields.get(key)
        if field is None:
            continue  # not this model's (validation reports it elsewhere)
        inner = nested_model(field.annotation)
        if inner is not None and isinstance(value, dict):
            found += repeats(inner, value, f"{path}/{key}")
        elif inner is not None and isinstance(value, list):
            for i, item in enumerate(value):
                found += repeats(inner, item, f"{path}/{key}/{i}") if isinstance(item, dict) else []
        elif not field.is_required() and value == field.get_default(call_default_factory=True):
            found.append(f"{path}/{key}: {value!r}")
    return found


def deployment_repeats(options: dict, path: str) -> list[str]:
    """A deployment's options that restate its @serve.deployment (or Serve's) settings."""
    code = CODE_DEPLOYMENTS[options["name"].split("-")[0]]
    config = code._deployment_config
    found = []
    for key, value in options.items():
        if key == "autoscaling_config":
            found += repeats(AutoscalingConfig, value, f"{path}/{key}")
        elif key == "ray_actor_options":
            found += [f"{path}/{key}/{k}: {v!r}" for k, v in value.items() if (code.ray_actor_options or {}).get(k) == v]
        elif key != "name" and getattr(config, key, None) == value:
            found.append(f"{path}/{key}: {value!r}")
    return found


def serve_config_repeats(config: dict) -> list[str]:
    found = repeats(ServeDeploySchema, {k: v for k, v in config.items() if k != "applications"}, "")
    for i, app in enumerate(config["applications"]):
        path = f"/applications/{i}"
        found += repeats(ServeApplicationSchema, {k: v for k, v in app.items() if k not in ("args", "deployments")}, path)
        found += repeats(AppArgs, app["args"], f"{path}/args")
        for j, options in enumerate(app.get("deployments", [])):
            found += deployment_repeats(options, f"{path}/deployments/{j}")
    return found


def dict_repeats(values: dict, defaults: dict, path: str = "") -> list[str]:
    found = []
    for key, value in values.items():
        where = f"{path}/{key}".lstrip("/")
        if key not in defaults or where in CLUSTER_SELECTORS:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            found += dict_repeats(value, defaults[key], where)
        elif value == defaults[key]:
            found.append(f"{where}: {value!r}")
    return found


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_sets_only_what_differs_from_the_defaults(name):
    found = serve_config_repeats(yaml.safe_load((ROOT / "deploy" / name).read_text()))
    assert not found, f"deploy/{name} restates defaults (delete these lines):\n" + "\n".join(found)


def test_cluster_yaml_sets_only_what_differs_from_rays_aws_defaults():
    defaults = yaml.safe_load((Path(ray.autoscaler.__file__).parent / "aws" / "defaults.yaml").read_text())
    found = dict_repeats(yaml.safe_load((ROOT / "cluster.yaml").read_text()), defaults)
    assert not found, "cluster.yaml restates Ray's AWS defaults (delete these lines):\n" + "\n".join(found)


def test_a_restated_default_is_found():
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["models"][0]["tuning"] = {"batch_share": 0.25}
    app["args"]["limits"] = {"max_inputs_per_request": 2048}
    app["deployments"][0]["ray_actor_options"] = {"num_cpus": 0.25}
    app["deployments"][2]["autoscaling_config"] = {"max_replicas": 2, "look_back_period_s": 30}
    config["proxy_location"] = "EveryNode"
    assert serve_config_repeats(config) == [
        "/proxy_location: 'EveryNode'",
        "/applications/0/args/models/0/tuning/batch_share: 0.25",
        "/applications/0/args/limits/max_inputs_per_request: 2048",
        "/applications/0/deployments/0/ray_actor_options/num_cpus: 0.25",
        "/applications/0/deployments/2/autoscaling_config/look_back_period_s: 30",
    ]
