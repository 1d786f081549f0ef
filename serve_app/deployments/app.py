"""The app builder: typed args → the Ingress → Tokenizer → Embedder graph.

Used as `import_path: serve_app.deployments.app:build_app` with the config's `args:`.
"""

from __future__ import annotations

import logging

import ray
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray.serve import Application

from serve_app.api.auth import AuthConfig
from serve_app.api.cache import CacheConfig
from serve_app.api.limits import RequestLimits
from serve_app.api.ratelimit import RateLimits
from serve_app.api.request_class import RequestClassPolicy
from serve_app.api.tei import TeiConfig
from serve_app.engine.spec import ModelSpec, share_base

from .embedder import Embedder
from .ingress import Ingress
from .sizing import check_app_fits, cluster_capacity, config_overrides, need_of
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1, description="The models served, by the names clients send.")
    auth: AuthConfig = Field(
        description="API keys. Required, so that running without them is always a written-down decision."
    )
    rate_limits: RateLimits = Field(default=RateLimits(), description="Requests and tokens per minute, per API key.")
    limits: RequestLimits = Field(default=RequestLimits(), description="Per-request limits, checked before any work.")
    priority: RequestClassPolicy = Field(
        default=RequestClassPolicy(), description="Request classes (docs/request-classes.md); the config key as users write it."
    )
    cache: CacheConfig = Field(default=CacheConfig(), description="The Ingress's LRU cache of vectors.")
    tei: TeiConfig = Field(default=TeiConfig(), description="TEI's routes (docs/tei.md).")
    gpu_nodes_on_demand: bool = Field(
        default=False,
        description="The start-up guard's opt-out, for a cluster whose GPU nodes an autoscaler adds on "
        "demand without telling Ray its node types (see check_gpus_exist).",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"model names must be unique: {sorted(duplicated)}")
        share_base(models)  # models on one base must agree on its deployment's settings
        return models

    @model_validator(mode="after")
    def _tei_model_is_served(self) -> AppArgs:
        names = [m.name for m in self.models]
        if self.tei.model is not None and self.tei.model not in names:
            raise ValueError(f"tei.model {self.tei.model!r} is not one of the models: {names}")
        return self


# What a Tokenizer replica's output depends on (see engine.tokenization.InputTokenizer): models
# equal in these get the same token ids from one replica, so they share one Tokenizer deployment.
# The query instruction travels with each call, so it does not split them.
TOKENIZER_FIELDS = ("source", "revision", "trust_remote_code", "pooling", "append_eos", "max_input_tokens", "long_input")


def share_tokenizer(models: list[ModelSpec]) -> list[list[ModelSpec]]:
    """The models of each Tokenizer deployment, in config order (equal in TOKENIZER_FIELDS)."""
    groups: dict[tuple, list[ModelSpec]] = {}
    for spec in models:
        groups.setdefault(tuple(getattr(spec, f) for f in TOKENIZER_FIELDS), []).append(spec)
    return list(groups.values())


def deployment_names(models: list[ModelSpec]) -> tuple[dict[str, str], dict[str, str]]:
    """Each model's Tokenizer and Embedder deployment: `Tokenizer` and `Embedder` for a single
    model; with several, `Tokenizer-<model>` and `Embedder-<model>`, each named after the first
    (in config order) of the models that share it (share_tokenizer, spec.share_base)."""
    if len(models) == 1:
        return {models[0].name: "Tokenizer"}, {models[0].name: "Embedder"}
    tokenizers = {spec.name: f"Tokenizer-{group[0].name}" for group in share_tokenizer(models) for spec in group}
    embedders = {spec.name: f"Embedder-{group[0].name}" for group in share_base(models) for spec in group}
    return tokenizers, embedders


def needs_gpu(spec: ModelSpec) -> bool:
    return spec.device == "cuda" or spec.quantization == "fp8"


def check_gpus_exist(models: list[ModelSpec]) -> None:
    """Fail the deploy within seconds, not with Embedder replicas pending forever on a cluster
    that has no GPU and cannot get one.

    Runs where Serve builds the app (the `serve run`/`serve deploy` controller), before any
    replica is placed. The deployments' `ray_actor_options` (num_gpus) are applied by Serve
    after the builder returns, so the builder keys on what the models ask for: `device: cuda`
    or `quantization: fp8`. A cluster with no GPU yet passes when its autoscaler reported node
    types with GPUs (`gpus_on_demand`), or when the config sets `gpu_nodes_on_demand: true`:
    an autoscaler that does not report its node types to Ray looks like no autoscaler.
    """
    wanting = [spec.name for spec in models if needs_gpu(spec)]
    if not wanting or not ray.is_initialized():
        return
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return
    on_demand = gpus_on_demand()
    if on_demand:
        logger.info("no GPU in the Ray cluster yet, but %s: deploying", on_demand)
        return
    raise ValueError(
        f"model(s) {wanting} need a GPU (device: cuda or quantization: fp8: each Embedder replica "
        f"asks for num_gpus), but this Ray cluster has no GPU resource (ray.cluster_resources(): "
        f"GPU 0, CPU {resources.get('CPU', 0):g}) and no autoscaler reported a node type with one, "
        "so its replicas would stay pending forever. On a machine without GPUs, serve deploy/local.yaml "
        "(serve run deploy/local.yaml). If GPU nodes are added on demand by something Ray cannot "
        "see, set gpu_nodes_on_demand: true in the app's args."
    )


def gpus_on_demand() -> str | None:
    """Why a cluster without GPUs may still get some (its autoscaler's node types have GPUs,
    as the autoscaler reported them to Ray: what Ray Train and Data read for the same check),
    or None."""
    try:  # a private Ray API: a change there must not block a deploy
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001
        logger.warning("could not read the autoscaler's node types", exc_info=True)
        return "the autoscaler's node types could not be read"
    return f"its autoscaler can add up to {most['GPU']:g} GPUs" if most.get("GPU") else None


def build_app(args: dict) -> Application:
    parsed = AppArgs.model_validate(args)
    if not parsed.gpu_nodes_on_demand:
        check_gpus_exist(parsed.models)
    tokenizer_names, embedder_names = deployment_names(parsed.models)
    deployments = [Ingress]
    tokenizers = {}
    for group in share_tokenizer(parsed.models):
        deployments.append(Tokenizer.options(name=tokenizer_names[group[0].name]))
        tokenizer = deployments[-1].bind(group[0].model_dump())
        tokenizers.update((spec.name, tokenizer) for spec in group)
    embedders = {}
    for group in share_base(parsed.models):
        # One deployment per base: every model of the group maps to the same bound deployment.
        deployments.append(Embedder.options(name=embedder_names[group[0].name]))
        embedder = deployments[-1].bind([spec.model_dump() for spec in group])
        embedders.update((spec.name, embedder) for spec in group)
    if ray.is_initialized():
        overrides = config_overrides(args)
        capacity, where = cluster_capacity()
        needs = [need_of(d, overrides.get(d.name)) for d in deployments]
        check_app_fits(needs, capacity, where, skip_gpus=parsed.gpu_nodes_on_demand)
    return Ingress.bind(
        [spec.model_dump() for spec in parsed.models],
        tokenizers,
        embedders,
        parsed.limits.model_dump(),
        parsed.auth.model_dump(),
        parsed.rate_limits.model_dump(),
        parsed.priority.model_dump(),
        parsed.cache.model_dump(),
        parsed.tei.model_dump(),
    )
