"""The app builder: typed args → the Ingress → Tokenizer → Embedder graph.

Used as `import_path: serve_app.deployments.app:build_app` with the config's `args:`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from serve_app.api.auth import AuthConfig
from serve_app.api.cache import CacheConfig
from serve_app.api.limits import RequestLimits
from serve_app.api.priority import PriorityPolicy
from serve_app.api.ratelimit import RateLimits
from serve_app.engine.spec import ModelSpec

from .embedder import Embedder
from .ingress import Ingress
from .tokenizer import Tokenizer


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    # Required, so that running without API keys is always a written-down decision.
    auth: AuthConfig
    rate_limits: RateLimits = RateLimits()
    limits: RequestLimits = RequestLimits()
    priority: PriorityPolicy = PriorityPolicy()
    cache: CacheConfig = CacheConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        duplicated = {n for n in names if names.count(n) > 1}
        if duplicated:
            raise ValueError(f"model names must be unique: {sorted(duplicated)}")
        return models


def deployment_names(model: str, n_models: int) -> tuple[str, str]:
    """`Tokenizer`/`Embedder` for a single model, suffixed with the model name for several."""
    if n_models == 1:
        return "Tokenizer", "Embedder"
    return f"Tokenizer-{model}", f"Embedder-{model}"


def build_app(args: dict) -> Application:
    parsed = AppArgs.model_validate(args)
    tokenizers, embedders = {}, {}
    for spec in parsed.models:
        tokenizer_name, embedder_name = deployment_names(spec.name, len(parsed.models))
        spec_dict = spec.model_dump()
        tokenizers[spec.name] = Tokenizer.options(name=tokenizer_name).bind(spec_dict)
        embedders[spec.name] = Embedder.options(name=embedder_name).bind(spec_dict)
    return Ingress.bind(
        [spec.model_dump() for spec in parsed.models],
        tokenizers,
        embedders,
        parsed.limits.model_dump(),
        parsed.auth.model_dump(),
        parsed.rate_limits.model_dump(),
        parsed.priority.model_dump(),
        parsed.cache.model_dump(),
    )
