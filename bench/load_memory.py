"""Peak host memory while an Embedder loads its weights: old way vs straight onto the device.

Builds an SFR-shaped checkpoint (MistralConfig with SFR-Embedding-Mistral's numbers, random
bf16 weights, sharded safetensors, ~14.2 GB at 32 layers; cached under bench/.work/), then loads
it in a fresh process per way, one at a time, and reads that process's peak RSS:

- old: `AutoModel.from_pretrained(path, dtype)` on the host, then `.to(device)` (the loading
  code before weights went straight to the device);
- new: `serve_app.engine.loading.load_model` (transformers `device_map=device`).

    python -m bench.load_memory [--layers 32] [--device auto] [--out bench/results/load_memory.md]

On a CPU-only machine both ways load onto the host, so the figure to read there is peak RSS
against the checkpoint's size; on a GPU machine, the old way holds the whole model in host RAM
before copying it. Needs free RAM of about the checkpoint's size (check `free -g`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from testkit import harness

WORK = Path(__file__).resolve().parent / ".work" / "load_memory"
# SFR-Embedding-Mistral's config.json (Mistral-7B), as ARCHITECTURE.md lists it.
SFR_SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                 rms_norm_eps=1e-5, rope_theta=10000.0)


def build_checkpoint(layers: int) -> Path:
    """An SFR-shaped MistralModel with random bf16 weights, one safetensors shard per layer so
    that building it never holds more than one layer in memory. Cached by layer count."""
    import torch
    from safetensors.torch import save_file
    from transformers import MistralConfig, MistralModel

    path = WORK / f"sfr-shaped-{layers}-layers"
    if (path / "model.safetensors.index.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = MistralConfig(**{**SFR_SHAPE, "num_hidden_layers": layers}, dtype="bfloat16")
    config.architectures = ["MistralModel"]
    with torch.device("meta"):
        model = MistralModel(config)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, parameter in model.state_dict().items():
        shard = f"layer-{name.split('.')[1]}" if name.startswith("layers.") else "other"
        shards.setdefault(shard, {})[name] = parameter
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for k, tensors in enumerate(shards.values()):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        filled = {
            name: (torch.ones(t.shape) if name.endswith("norm.weight") else torch.randn(t.shape, generator=generator) * 0.02)
            .to(torch.bfloat16)
            for name, t in tensors.items()
        }
        save_file(filled, path / filename, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in filled.values())
        weight_map.update(dict.fromkeys(filled, filename))
        del filled
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    return path


def load_once(path: str, way: str, device: str) -> dict:
    """In this (fresh) process: load the checkpoint one way, report peak RSS and time."""
    import psutil
    import torch

    from serve_app.engine.embedder import pick_device
    from serve_app.engine.loading import ResolvedSpec, load_model
    from serve_app.engine.spec import ModelSpec

    device = pick_device(device)
    before = psutil.Process().memory_info().rss  # torch, transformers and our code imported
    started = time.perf_counter()
    if way == "old":
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    else:
        spec = ModelSpec(name="sfr-shaped", source=path, max_input_tokens=4096, max_batch_tokens=16384)
        model = load_model(ResolvedSpec(spec, path, "last_token", True, 4096), device, torch.bfloat16)
    seconds = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "way": way,
        "device": str(next(model.parameters()).device),
        "load_s": round(seconds, 1),
        "weights_bytes": weights,
        "rss_before_bytes": before,
        # Linux reports ru_maxrss in KiB: the process's peak resident memory, loading included.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def measure(path: Path, way: str, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.load_memory", "--load-once", str(path), "--way", way, "--device", device],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(rows: list[dict], layers: int, checkpoint_bytes: int, machine_text: str) -> str:
    gib = 2**30
    lines = [
        "# Peak host memory while loading an SFR-shaped checkpoint",
        "",
        f"`python -m bench.load_memory --layers {layers}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine_text}.",
        f"Checkpoint: MistralConfig with SFR's shape, {layers} layers, random bf16 weights, sharded "
        f"safetensors, {checkpoint_bytes / gib:.2f} GiB on disk. Each way loads in a fresh process, one at a time.",
        "",
        "RSS before: the process with torch and transformers imported, before loading; the growth "
        "is peak minus before.",
        "",
        "| way | device | load s | weights GiB | RSS before GiB | peak RSS GiB | growth / checkpoint |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['way']} | {row['device']} | {row['load_s']} | {row['weights_bytes'] / gib:.2f} | "
            f"{row['rss_before_bytes'] / gib:.2f} | {row['peak_rss_bytes'] / gib:.2f} | "
            f"{(row['peak_rss_bytes'] - row['rss_before_bytes']) / checkpoint_bytes:.2f} |"
        )
    if all(row["device"] == "cpu" for row in rows):
        lines += [
            "",
            "On a CPU both ways load onto the host, and a bf16 checkpoint loaded as bf16 stays memory-mapped",
            "from its safetensors files: pages come in as the weights are first used, so neither way",
            "reads the weights during the load. The figure this benchmark exists for, host RAM while a",
            "GPU replica loads, needs a GPU machine: `python -m bench.load_memory --device cuda`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="32: SFR's full size (~14.2 GB)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/load_memory.md"))
    parser.add_argument("--build-only", action="store_true", help="build (or find) the checkpoint and stop")
    parser.add_argument("--load-once", help=argparse.SUPPRESS)  # the child process's job
    parser.add_argument("--way", choices=("old", "new"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_once:
        print(json.dumps(load_once(args.load_once, args.way, args.device)))
        return
    path = build_checkpoint(args.layers)
    checkpoint_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint {path}: {checkpoint_bytes / 2**30:.2f} GiB", flush=True)
    if args.build_only:
        return
    rows = []
    for way in ("old", "new"):
        rows.append(measure(path, way, args.device))
        print(json.dumps(rows[-1]), flush=True)
    machine = harness.machine()
    text = report(rows, args.layers, checkpoint_bytes, harness.machine_line(machine))
    harness.write(args.out.with_suffix(""), {"layers": args.layers, "checkpoint_bytes": checkpoint_bytes,
                                            "machine": machine, "rows": rows}, text.splitlines())
    print(text)


if __name__ == "__main__":
    main()
