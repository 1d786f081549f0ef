"""The batch job on a 3-node local Ray cluster: work spreads over the nodes, and a node killed
midway still leaves complete, correct output.

`ray.cluster_utils.Cluster` on this machine (own RAY_TMPDIR): a head node (2 CPUs: reads,
tokenizer, writes) and two worker nodes with one CPU and a custom resource `fake_gpu: 1` each,
standing in for GPU nodes. The job runs deploy/local.yaml's all-MiniLM-L6-v2 with the
Embedder's `ray_actor_options` set to `{num_cpus: 1, resources: {fake_gpu: 1}}` (and
`tuning.cpu_threads: 1`), so its pool is one engine actor per worker node. Once both workers have
finished engine batches and `--kill-at` of the documents are committed, worker-b is removed
without grace (raylet and workers killed). Ray Data re-runs what was lost; the job must finish
in the same run with every id exactly once and every vector equal to the in-process engine's.

    python -m tests.scenarios.test_batch_job_faults            # ~3 minutes; bench/results/batch_job_faults.{md,json}
    python -m tests.scenarios.test_batch_job_faults --documents 1024 --out bench/.work/faults   # smoke run

Exits non-zero if the work did not reach both workers, the node was not killed mid-run, or
the output is incomplete, duplicated or wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit import harness, workloads
from tests.scenarios.common import changes

MODEL = "all-MiniLM-L6-v2"  # deploy/local.yaml
ENGINE_TASK = "MapWorker(MapBatches(Embed)).submit"


def start_cluster(temp_dir: str):
    """harness.start_cluster's layout, with the head's dashboard: the state API (which node ran
    each engine batch) needs it."""
    import ray
    from ray.cluster_utils import Cluster

    common = dict(object_store_memory=200 << 20, temp_dir=os.path.join(temp_dir, "ray"))
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=2, include_dashboard=True, dashboard_port=harness.free_port(), **common))
    workers = [cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}, **common) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    names = {cluster.head_node.node_id: "head"} | {w.node_id: f"worker-{'ab'[i]}" for i, w in enumerate(workers)}
    return cluster, workers, names


def job_config(path: Path) -> Path:
    config = yaml.safe_load(harness.LOCAL_CONFIG.read_text())
    app = config["applications"][0]
    app["args"]["models"][0].setdefault("tuning", {})["cpu_threads"] = 1  # one core per stand-in GPU
    embedder = next(d for d in app["deployments"] if d["name"] == "Embedder")
    embedder["ray_actor_options"] = {"num_cpus": 1, "resources": {"fake_gpu": 1}}
    path.write_text(yaml.safe_dump(config))
    return path


def committed_rows(checkpoint: Path) -> int:
    import pyarrow.parquet as pq

    files = [p for p in checkpoint.glob("*.parquet") if not p.name.endswith(".pending.parquet")]
    return sum(pq.read_metadata(p).num_rows for p in files)


def engine_tasks_by_node(address: str, names: dict) -> dict[str, int]:
    """Engine batches finished so far, by the node that ran them (Ray's task events)."""
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, filters=[("name", "=", ENGINE_TASK), ("state", "=", "FINISHED")],
                       limit=10_000, timeout=10, raise_on_missing_output=False)
    counts: dict[str, int] = {}
    for task in tasks:
        node = names.get(task.node_id, task.node_id)
        counts[node] = counts.get(node, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=2048)
    p.add_argument("--kill-at", type=float, default=0.3, help="share of documents committed before the kill")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    args = p.parse_args(argv)
    import pyarrow.dataset as pads

    from serve_app.batch.config import load_job_model
    from serve_app.batch.job import run
    from testkit.inprocess import EngineRunner

    wall0, m = time.monotonic(), harness.machine()
    os.environ.update({k: v for k, v in harness.OFFLINE_ENV.items() if k not in os.environ})
    temp_dir = tempfile.mkdtemp(prefix="rbf", dir="/tmp")  # short: Unix socket paths are limited
    os.environ["RAY_TMPDIR"] = temp_dir  # Cluster's address file stays out of /tmp/ray
    work, wl = Path(temp_dir), workloads.corpus()
    texts = [t for i in range(args.documents // wl.docs_per_request) for t in wl(i).texts]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n"
                                               for i, t in enumerate(texts)))
    job_model = load_job_model(job_config(work / "config.yaml"), MODEL)
    cluster, workers, names = start_cluster(temp_dir)
    outcome, checkpoint = {}, work / "out/_checkpoint"

    def job() -> None:
        try:
            # Small engine batches, so that both actors get many and commits come in steps.
            outcome["summary"] = run(job_model, str(work / "corpus.jsonl"), str(work / "out"), batch_rows=64)
        except Exception as exc:  # noqa: BLE001 - reported below, and fails the scenario
            outcome["error"] = repr(exc)

    timeline, killed, started = [], None, time.monotonic()
    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    try:
        while thread.is_alive() and time.monotonic() - started < 900:
            t = round(time.monotonic() - started, 1)
            done = committed_rows(checkpoint) if checkpoint.exists() else 0
            batches = engine_tasks_by_node(cluster.address, names)
            timeline.append({"t_s": t, "committed": done, "engine_batches": batches})
            both_worked = all(batches.get(names[w.node_id]) for w in workers)
            if killed is None and both_worked and done >= args.kill_at * len(texts):
                cluster.remove_node(workers[1], allow_graceful=False)
                killed = {"t_s": t, "node": names[workers[1].node_id], "committed": done}
                harness.log(f"killed {killed}")
            time.sleep(1.0)
        thread.join(60)
        timeline.append({"t_s": round(time.monotonic() - started, 1), "committed": committed_rows(checkpoint),
                         "engine_batches": engine_tasks_by_node(cluster.address, names)})
        table = pads.dataset(work / "out/embeddings", format="parquet").to_table()
    finally:
        harness.stop_ray(None, cluster)

    ids = table["id"].to_pylist()
    sample = np.random.default_rng(0).choice(len(texts), size=min(128, len(texts)), replace=False)
    row = {i: k for k, i in enumerate(ids)}
    got = np.array([table["embedding"][row[str(i)]].as_py() for i in sample if str(i) in row], dtype=np.float32)
    expected = EngineRunner(job_model.spec)([texts[i] for i in sample])
    shutil.rmtree(temp_dir, ignore_errors=True)
    nodes_used = sorted({n for s in timeline for n in s["engine_batches"]})
    res = {
        "documents": len(texts), "killed": killed, "outcome": outcome.get("error") or str(outcome.get("summary")),
        "rows": len(ids), "unique_ids": len(set(ids)), "missing": len(set(map(str, range(len(texts)))) - set(ids)),
        "max_abs_diff": float(np.abs(got - expected).max()) if len(got) == len(sample) else None,
        "engine_batch_nodes": nodes_used, "timeline": timeline,
    }
    res["checks"] = checks = {
        "engine batches ran on both workers": {"worker-a", "worker-b"} <= set(nodes_used),
        "a worker killed mid-run": killed is not None and killed["committed"] < len(texts),
        "the job finished in the same run": "summary" in outcome,
        "every id exactly once": res["rows"] == res["unique_ids"] == len(texts) and res["missing"] == 0,
        "vectors equal the in-process engine's (1e-5)": res["max_abs_diff"] is not None and res["max_abs_diff"] <= 1e-5,
    }
    res.update(harness.stamp("tests.scenarios.test_batch_job_faults", argv, m, wall0))
    lines = [*harness.header("Batch job: a worker node killed midway", res, f"Head (2 CPUs) + 2 workers (1 CPU, fake_gpu 1 "
                     f"each); {MODEL}, one engine actor per worker; {len(texts)} documents, killed at "
                     f"{args.kill_at:.0%} committed."),
             f"- killed: {killed}", f"- run: {res['outcome']}",
             f"- output: {res['rows']} rows, {res['unique_ids']} unique ids, {res['missing']} missing; "
             f"max |diff| to the in-process engine on {len(sample)} documents: {res['max_abs_diff']}", "",
             *harness.md_checks(checks),
             *harness.md_table(["t (s)", "documents committed", "engine batches finished, by node"],
                               [[s["t_s"], s["committed"], s["engine_batches"]]
                                for s in changes(timeline, ("committed", "engine_batches"))])]
    harness.write(args.out / "batch_job_faults", res, lines)
    print("\n".join(lines[:12]))
    return 0 if all(checks.values()) else 1


@pytest.mark.scenario
def test_batch_job_faults():
    assert main([]) == 0, "a check failed: see bench/results/batch_job_faults.md"


if __name__ == "__main__":
    raise SystemExit(main())
