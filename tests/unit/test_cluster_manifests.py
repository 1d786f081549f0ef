"""The cluster manifests are valid and sized for the Serve app in deploy/config.yaml.

cluster.yaml (Ray cluster launcher, AWS) is checked against the JSON schema that Ray ships and
by Ray's own config preparation and validation, which `ray up` runs before it talks to AWS;
the AWS bootstrap after that (instance types, IAM, subnets) needs boto3 and credentials and is
not run here. deploy/rayservice.yaml (KubeRay) must embed deploy/config.yaml unchanged.

Both must give the Serve app the nodes it asks for: the head and the CPU-only front workers at
their maximum take every CPU-only replica at full scale, and never a GPU replica; front workers
start at zero; each GPU node takes whole Embedders and nothing else (a node that holds a CPU
replica never goes idle, so it never scales down); enough GPU nodes for the Embedder's
max_replicas, and no more always-on ones than its min_replicas.

Run as a script, it copies deploy/config.yaml into deploy/rayservice.yaml's serveConfigV2:
    python tests/unit/test_cluster_manifests.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
SERVE_CONFIG = ROOT / "deploy" / "config.yaml"
RAYSERVICE = ROOT / "deploy" / "rayservice.yaml"
SERVE_CONFIG_KEY = "  serveConfigV2: |\n"  # the last key of rayservice.yaml's spec


def render_rayservice(manifest: str, serve_config: str) -> str:
    """`manifest` with everything after its serveConfigV2 key replaced by `serve_config`."""
    head, key, _ = manifest.partition(SERVE_CONFIG_KEY)
    assert key, f"{RAYSERVICE.name} has no line {SERVE_CONFIG_KEY!r}"
    body = "".join(("    " + line if line.strip() else "") + "\n" for line in serve_config.splitlines())
    return head + key + body


# --- what the Serve app asks for ---------------------------------------------------------------


def load(path: Path):
    return yaml.safe_load(path.read_text())


def serve_deployments() -> list[dict]:
    (app,) = load(SERVE_CONFIG)["applications"]
    return app["deployments"]


def replicas(deployment: dict) -> tuple[int, int]:
    """(min, max) replicas of a deployment."""
    auto = deployment.get("autoscaling_config")
    if auto:
        return auto.get("min_replicas", 1), auto["max_replicas"]
    n = deployment.get("num_replicas", 1)
    return n, n


def actor(deployment: dict) -> tuple[float, float]:
    """(num_cpus, num_gpus) of one replica; Serve's default is one CPU."""
    options = deployment.get("ray_actor_options") or {}
    return options.get("num_cpus", 1), options.get("num_gpus", 0)


def gpu_deployments() -> list[dict]:
    found = [d for d in serve_deployments() if actor(d)[1] > 0]
    assert found, "deploy/config.yaml has no GPU deployment"
    return found


def cpu_deployments() -> list[dict]:
    return [d for d in serve_deployments() if actor(d)[1] == 0]


def check_node_sizes(head_cpus, head_gpus, front_cpus, gpu_cpus, gpu_gpus, min_nodes, max_nodes, where):
    """The sizing rules of the module docstring, for either manifest; `front_cpus`: the CPUs of
    every CPU-only worker at its group's maximum."""
    assert head_gpus == 0, f"{where}: the head advertises GPUs, so an Embedder could land there"
    cpu_need = sum(replicas(d)[1] * actor(d)[0] for d in cpu_deployments())
    assert head_cpus + front_cpus >= cpu_need, (
        f"{where}: the head and front workers have {head_cpus} + {front_cpus} CPUs; Ingress/Tokenizer "
        f"replicas at max_replicas need {cpu_need}"
    )
    nodes_for_max = nodes_for_min = 0
    for d in gpu_deployments():
        cpus, gpus = actor(d)
        per_node = int(min(gpu_gpus // gpus, gpu_cpus // cpus))
        assert per_node >= 1, f"{where}: a GPU node ({gpu_cpus} CPUs, {gpu_gpus} GPUs) can't hold one {d['name']}"
        spare = gpu_cpus - per_node * cpus
        smallest = min((actor(c)[0] for c in cpu_deployments()), default=math.inf)
        assert spare < smallest, (
            f"{where}: a GPU node has {spare} CPUs left beside its {d['name']} replicas; a CPU-only "
            "replica placed there would keep the node from ever scaling down"
        )
        low, high = replicas(d)
        nodes_for_min += math.ceil(low / per_node)
        nodes_for_max += math.ceil(high / per_node)
    # With one Embedder per node: max nodes >= max_replicas. Fewer would leave replicas pending
    # forever; more would never be launched, as there would be nothing to place on them.
    assert max_nodes >= nodes_for_max, f"{where}: at most {max_nodes} GPU nodes; max_replicas need {nodes_for_max}"
    # Always-on GPU nodes beyond what min_replicas fills would sit idle at full price.
    assert min_nodes <= nodes_for_min, f"{where}: {min_nodes} always-on GPU nodes; min_replicas fill {nodes_for_min}"


# --- cluster.yaml ------------------------------------------------------------------------------


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_rays_schema():
    import jsonschema

    validator = jsonschema.Draft7Validator(ray_schema())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(load(CLUSTER))]
    assert not errors, "\n".join(errors)


def prepared_cluster() -> dict:
    """cluster.yaml as `ray up` sees it: merged with the AWS defaults, then validated by Ray."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load(CLUSTER))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_own_validation():
    config = prepared_cluster()
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_nodes_fit_the_serve_app():
    config = prepared_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    (gpu_name,) = [n for n, t in types.items() if n != config["head_node_type"] and t["resources"].get("GPU", 0) > 0]
    gpu = types[gpu_name]
    fronts = [t for n, t in types.items() if n not in (config["head_node_type"], gpu_name)]
    assert head["max_workers"] == 0
    assert all(t["resources"].get("GPU", 0) == 0 and t["min_workers"] == 0 for t in fronts)
    check_node_sizes(
        head["resources"]["CPU"], head["resources"].get("GPU", 0),
        sum(t["resources"]["CPU"] * t["max_workers"] for t in fronts),
        gpu["resources"]["CPU"], gpu["resources"]["GPU"],
        gpu["min_workers"], min(gpu["max_workers"], config["max_workers"]),
        f"cluster.yaml ({gpu_name})",
    )  # fmt: skip


def test_every_node_runs_the_project_image():
    """The image (deploy/Dockerfile) holds the project: no node installs it again, and the head
    still gets boto3, which defining head_setup_commands drops from Ray's AWS defaults (without
    it the autoscaler on the head cannot launch a single GPU node)."""
    config = prepared_cluster()
    assert config["docker"]["image"].startswith("ghcr.io/") and "head_image" not in config["docker"]
    for role in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("serve-embeddings" in c or "torch" in c for c in config[role]), f"{role} installs the project again"
    assert any("boto3" in c for c in config["head_setup_commands"]), "head_setup_commands never install boto3"


def keys_file() -> str | None:
    """auth.keys_file of deploy/config.yaml, which must exist wherever an Ingress runs."""
    (app,) = load(SERVE_CONFIG)["applications"]
    auth = app["args"].get("auth") or {}
    return auth.get("keys_file") if auth.get("enabled", True) else None


def covers(directory: str, path: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def test_every_node_that_runs_an_ingress_gets_the_api_keys_file():
    path = keys_file()
    if path is None:
        return  # no keys file configured: nothing to ship
    assert any(covers(remote, path) for remote in load(CLUSTER)["file_mounts"]), f"cluster.yaml: no file_mount holds {path}"
    cluster = load(RAYSERVICE)["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]
                                                    if not k8s_gpus(g["template"]["spec"]["containers"][0])]
    for name, group in groups:  # the head and the CPU-only groups, where Ingress replicas run
        mounts = [m["mountPath"] for c in group["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert any(covers(m, path) for m in mounts), f"deploy/rayservice.yaml: no volume of {name} holds {path}"


# --- deploy/rayservice.yaml --------------------------------------------------------------------


def first_difference(a, b, path="") -> str | None:
    """Where two parsed YAML documents first differ, as a path like applications/0/args."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys(), key=str):
            if key not in a or key not in b:
                return f"{path}/{key}"
            found = first_difference(a[key], b[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(filter(None, (first_difference(x, y, f"{path}/{i}") for i, (x, y) in enumerate(zip(a, b)))), None)
    return None if a == b else path or "/"


def test_rayservice_serves_exactly_deploy_config_yaml():
    service = load(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    where = first_difference(yaml.safe_load(service["spec"]["serveConfigV2"]), load(SERVE_CONFIG))
    assert where is None, (
        f"deploy/rayservice.yaml's serveConfigV2 differs from deploy/config.yaml at {where}; "
        "copy it over with: python tests/unit/test_cluster_manifests.py"
    )


def test_rayservice_copy_script_round_trips():
    manifest = RAYSERVICE.read_text()
    rendered = render_rayservice(manifest, SERVE_CONFIG.read_text())
    assert yaml.safe_load(yaml.safe_load(rendered)["spec"]["serveConfigV2"]) == load(SERVE_CONFIG)
    assert render_rayservice(rendered, SERVE_CONFIG.read_text()) == rendered


def k8s_gpus(container: dict) -> int:
    resources = container["resources"]
    return int(resources.get("limits", {}).get("nvidia.com/gpu", 0))


def test_rayservice_pods_fit_the_serve_app():
    cluster = load(RAYSERVICE)["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    assert k8s_gpus(head_container) == 0
    groups = cluster["workerGroupSpecs"]
    (group,) = [g for g in groups if k8s_gpus(g["template"]["spec"]["containers"][0])]
    fronts = [g for g in groups if g is not group]
    (worker,) = group["template"]["spec"]["containers"]
    resources = worker["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    for container in (head_container, worker, *(c for g in fronts for c in g["template"]["spec"]["containers"])):
        assert container["resources"]["requests"] == container["resources"]["limits"]
    for g in (group, *fronts):
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert all(g["minReplicas"] == 0 and int(g["rayStartParams"].get("num-gpus", 0)) == 0 for g in fronts)
    check_node_sizes(
        int(head["rayStartParams"]["num-cpus"]), int(head["rayStartParams"]["num-gpus"]),
        sum(int(g["rayStartParams"]["num-cpus"]) * g["maxReplicas"] for g in fronts),
        int(group["rayStartParams"]["num-cpus"]), k8s_gpus(worker),
        group["minReplicas"], group["maxReplicas"],
        f"deploy/rayservice.yaml ({group['groupName']})",
    )  # fmt: skip


if __name__ == "__main__":
    RAYSERVICE.write_text(render_rayservice(RAYSERVICE.read_text(), SERVE_CONFIG.read_text()))
    print(f"copied {SERVE_CONFIG.relative_to(ROOT)} into {RAYSERVICE.relative_to(ROOT)}")
