"""Fail the deploy when the app's replicas can never all be placed on the cluster.

Ray only warns ("taken more than 30s to be scheduled") about an actor that waits for a CPU or
GPU the cluster will never have; Serve keeps the app DEPLOYING forever. Three models over one
base on a 2-core machine did exactly that. So the builder adds up what every deployment asks
for at its minimum replica count and compares it with everything the cluster has or its
autoscaler can add, before any replica is placed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
from ray.serve import Deployment

logger = logging.getLogger(__name__)

# Serve schedules a replica on one CPU when its ray_actor_options name none.
DEFAULT_REPLICA_CPUS = 1.0


@dataclass(frozen=True)
class Need:
    """What one deployment asks for at its minimum replica count."""

    name: str
    replicas: int
    cpus: float  # per replica
    gpus: float  # per replica


def need_of(deployment: Deployment, override: dict | None = None) -> Need:
    """The code's settings of `deployment`, with the config's `deployments:` entry for it (only
    the fields it sets) on top, as Serve applies them after the builder returns."""
    override = override or {}
    actor = dict(deployment.ray_actor_options or {}) | (override.get("ray_actor_options") or {})
    if "num_replicas" in override or "autoscaling_config" in override:
        num_replicas, autoscaling = override.get("num_replicas"), override.get("autoscaling_config")
    else:
        code_autoscaling = deployment._deployment_config.autoscaling_config
        num_replicas, autoscaling = deployment.num_replicas, code_autoscaling and code_autoscaling.model_dump()
    if autoscaling or num_replicas in (None, "auto"):
        auto = autoscaling or {}
        # min_replicas 0 still places one replica for the first request.
        replicas = max(1, auto.get("min_replicas") or 0, auto.get("initial_replicas") or 0)
    else:
        replicas = int(num_replicas)
    return Need(deployment.name, replicas, float(actor.get("num_cpus", DEFAULT_REPLICA_CPUS)),
                float(actor.get("num_gpus", 0)))


def config_overrides(args: dict) -> dict[str, dict]:
    """The `deployments:` entries of the config that deploys this app (found at Serve's
    controller by its args), by deployment name; {} when the app is not deployed from a config
    (`serve.run(build_app(...))`), where the code's settings are what Serve uses."""
    try:  # a private Serve API: a change there must not block a deploy
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        configs = ray.get(controller.get_app_configs.remote(), timeout=30)
    except Exception:  # noqa: BLE001
        logger.info("no Serve config found for this app; sizing it by the code's settings", exc_info=True)
        return {}
    for config in configs.values():
        if config.args == args:
            return {d.name: d.model_dump(exclude_unset=True) for d in config.deployments}
    return {}


def cluster_capacity() -> tuple[dict[str, float], str]:
    """The most CPUs and GPUs the cluster can have: its nodes now, or the autoscaler's maximum
    where it reported its node types to Ray (more nodes can come), and where the figure is from."""
    now = ray.cluster_resources()
    try:  # a private Ray API, as in app.gpus_on_demand
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001
        most = {}
    capacity = {k: max(float(now.get(k, 0)), float(most.get(k, 0))) for k in ("CPU", "GPU")}
    where = "the autoscaler's largest cluster" if most else "ray.cluster_resources()"
    return capacity, where


def check_app_fits(needs: list[Need], capacity: dict[str, float], where: str, skip_gpus: bool = False) -> None:
    """Raise, naming each deployment's share and the settings to lower, when the replicas at
    their minimum counts need more CPUs (or GPUs) than the cluster can have."""
    for resource, per_replica in (("CPU", lambda n: n.cpus), ("GPU", lambda n: n.gpus)):
        if resource == "GPU" and skip_gpus:
            continue
        total = sum(n.replicas * per_replica(n) for n in needs)
        if total <= capacity.get(resource, 0) + 1e-9:
            continue
        shares = ", ".join(
            f"{n.name} {n.replicas} x {per_replica(n):g}" for n in needs if per_replica(n) > 0
        )
        key = "num_cpus" if resource == "CPU" else "num_gpus"
        raise ValueError(
            f"this app's replicas need {total:g} {resource}s at their minimum replica counts ({shares}), "
            f"but the cluster has at most {capacity.get(resource, 0):g} ({where}), so some would wait "
            f"for a {resource} forever and the app would never become ready. Lower ray_actor_options."
            f"{key}, num_replicas or autoscaling_config.min_replicas of these deployments in the config's "
            "`deployments:` section, serve fewer models, or add nodes."
        )
