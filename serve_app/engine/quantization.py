"""FP8 inference: the linear layers' weights and activations in float8, through torchao.

torchao's `Float8DynamicActivationFloat8WeightConfig` quantizes each weight once at load and
each activation per pass, and multiplies with `torch._scaled_mm` (cuBLASLt/CUTLASS FP8 kernels).
transformers' own `FineGrainedFP8Config` was not chosen: transformers 5 fetches its Triton
kernels from the Hugging Face hub at load (`kernels-community/finegrained-fp8`), which an
offline node (and the benchmark's GPU machine) cannot do. Per-row scales (one per token and one
per output channel) are the default: finer than one scale per tensor, so an outlier in one row
does not cost the others their precision; `bench/gpu_engine.py` measures both granularities.
"""

from __future__ import annotations

import torch

# FP8 tensor cores: Ada (sm_89: L4, L40S) and Hopper (sm_90: H100, H200) and later.
FP8_MIN_CAPABILITY = (8, 9)
INSTALL_HINT = "pip install 'serve-embeddings[fp8]' (torchao)"
GRANULARITIES = ("row", "tensor")


class FP8Unsupported(RuntimeError):
    """This node cannot run FP8 matmuls: the replica must not start."""


def fp8_unsupported_reason(device: str) -> str | None:
    """Why `device` cannot run FP8 matmuls, or None if it can."""
    if not device.startswith("cuda"):
        return f"the model runs on {device!r}; FP8 matmuls need a CUDA GPU"
    if not torch.cuda.is_available():
        return f"this node's torch {torch.__version__} sees no CUDA GPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_MIN_CAPABILITY))
        return (
            f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
            f"FP8 matmuls need >= {need} (L4, L40S, H100, H200 or newer)"
        )
    return None


def check_fp8_supported(model_name: str, device: str) -> None:
    """Raise a clear FP8Unsupported before any weights load, if FP8 cannot run here."""
    reason = fp8_unsupported_reason(device)
    if reason is None:
        try:
            import torchao  # noqa: F401
        except ImportError:
            reason = f"torchao is not installed ({INSTALL_HINT})"
    if reason is not None:
        raise FP8Unsupported(
            f"model {model_name!r}: quantization: fp8 cannot run here: {reason}. "
            "Serve it with quantization: none, or on an FP8-capable GPU node."
        )


def quantize_fp8(model: torch.nn.Module, granularity: str = "row") -> torch.nn.Module:
    """Quantize every nn.Linear of `model` in place (embeddings and norms stay as they are).

    Unmerged LoRA adapters (adapters.py) keep their low-rank matrices in the model's dtype: they
    are a small share of the work, and a rank such as 8 is below the 16 that FP8 matmuls need.
    """
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    scale = PerRow() if granularity == "row" else PerTensor()
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=scale), filter_fn=_base_linear)
    return model


def _base_linear(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and ".lora_" not in f".{name}"
