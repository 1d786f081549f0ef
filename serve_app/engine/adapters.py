"""Several LoRA adapters over one loaded base, chosen per row of a forward pass (no Ray, no HTTP).

PEFT keeps each adapter's low-rank matrices beside the base's linear layers, unmerged. A LoRA
layer called with `adapter_names`, one name per row of its input, adds each row's own adapter
(`"__base__"`: none): PEFT's mixed-adapter inference. `PeftModel.forward(adapter_names=...)`
hands those names to the layers by registering a forward pre-hook on every layer for the
duration of the call, which is state shared by every thread: two passes running at once on CPU
lanes read each other's names (in a check with three threads, 595 of 600 calls raised or came
back wrong). Here each layer gets one pre-hook, once, which reads the names of the pass that
the calling thread runs, so passes of different adapters can run side by side.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from .loading import resolve_source
from .spec import ModelSpec

if TYPE_CHECKING:
    from peft import PeftModel

logger = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


def adapter_names(models: list[ModelSpec]) -> dict[str, str]:
    """Each model's PEFT adapter name (BASE for none); models naming the same adapter share it.

    Names are made up (`adapter_0`, ...): PEFT keeps adapters in module dicts, whose keys must
    not contain dots, and model names may.
    """
    loaded: dict[tuple[str, str | None], str] = {}
    names = {}
    for spec in models:
        if spec.adapter is None:
            names[spec.name] = BASE
            continue
        key = (spec.adapter, spec.adapter_revision)
        names[spec.name] = loaded.setdefault(key, f"adapter_{len(loaded)}")
    return names


def load_adapters(model: torch.nn.Module, models: list[ModelSpec], names: dict[str, str]) -> PeftModel:
    """`model` (the base) with every adapter of `models` loaded beside it, unmerged: a PeftModel."""
    from peft import PeftModel

    peft_model = None
    for spec in models:
        name = names[spec.name]
        if spec.adapter is None or name == BASE or (peft_model is not None and name in peft_model.peft_config):
            continue
        source = resolve_source(spec.adapter)
        logger.info("loading LoRA adapter %s (unmerged) for model %s", source, spec.name)
        # autocast_adapter_dtype=False: in the model's dtype. PEFT's default, made for training,
        # keeps a bf16 model's adapters in float32, which makes every pass's LoRA products fp32.
        load: dict[str, Any] = dict(adapter_name=name, revision=spec.adapter_revision, autocast_adapter_dtype=False)
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, source, **load)
        else:
            peft_model.load_adapter(source, **load)
        config = peft_model.peft_config[name]
        if config.peft_type != "LORA" or getattr(config, "use_dora", False):
            raise ValueError(
                f"model {spec.name!r}: its adapter is {'DoRA' if config.peft_type == 'LORA' else config.peft_type}, "
                "which PEFT cannot mix per row over a shared base; set merge_adapter: true"
            )
    if peft_model is None:
        raise ValueError("none of these models has an adapter to load")
    loaded: PeftModel = peft_model.eval()
    return loaded


class RowAdapters:
    """Picks the adapter of each row of the passes that a thread runs, on a PeftModel."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer
        from peft.utils import AuxiliaryTrainingWrapper

        if getattr(model, "_serve_row_adapters", False):
            # A second set of hooks would overwrite the first's names with its own (or none).
            raise ValueError("this model already has per-row adapters: use one engine per model")
        model._serve_row_adapters = True  # type: ignore[assignment]  # torch types Module attributes as modules or tensors
        self._local = threading.local()
        layers = [m for m in model.modules() if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))]
        if not layers:
            raise ValueError("the model has no LoRA layers: per-row adapters need a PeftModel with LoRA adapters")
        for layer in layers:  # the same modules PEFT's own forward(adapter_names=...) hooks
            layer.register_forward_pre_hook(self._inject, with_kwargs=True)

    @contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """Within this block, this thread's forward passes apply `names[i]` to row i."""
        self._local.names = names
        try:
            yield
        finally:
            self._local.names = None

    def _inject(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        names = getattr(self._local, "names", None)
        # Outside rows(): no adapter, rather than PEFT's active one (the first adapter loaded).
        kwargs["adapter_names"] = names if names is not None else [BASE] * len(args[0])
        return args, kwargs
