"""Device faults: freeing memory after an out-of-memory pass, probing a device, and injecting
faults on purpose so that tests can provoke on a CPU what a GPU does rarely.

Fault injection is off unless one of these environment variables is set in the replica's
process (tests set them through a test app's runtime_env; no config of ours sets them, and an
engine that reads one logs a warning at start):

- EMBEDDINGS_FAULT_OOM_ABOVE_TOKENS=N: after the warm-up, every pass of more than N padded tokens
  raises torch.OutOfMemoryError, as if something else had taken the device's memory.
- EMBEDDINGS_FAULT_OOM_AT_WARMUP=1: the warm-up's passes raise torch.OutOfMemoryError, as on a
  device too small for the largest pass the settings allow.
- EMBEDDINGS_FAULT_POISON_TRIGGER=PATH: when the file PATH exists, the next pass of any replica
  claims it (renames it away, so exactly one replica does) and poisons its device: that pass
  and everything later on the device (passes, device probes) raise the error a CUDA context
  raises after an illegal memory access.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

OOM_ABOVE_TOKENS = "EMBEDDINGS_FAULT_OOM_ABOVE_TOKENS"
OOM_AT_WARMUP = "EMBEDDINGS_FAULT_OOM_AT_WARMUP"
POISON_TRIGGER = "EMBEDDINGS_FAULT_POISON_TRIGGER"

# What CUDA says once a kernel touched memory it must not: the context is lost, every later
# call on it fails the same way, and only a new process gets a working device.
POISONED_MESSAGE = "CUDA error: an illegal memory access was encountered"


@dataclass
class FaultInjection:
    oom_above_tokens: int | None = None
    oom_at_warmup: bool = False
    poison_trigger: str | None = None
    poisoned: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> FaultInjection:
        above = environ.get(OOM_ABOVE_TOKENS)
        faults = cls(int(above) if above else None, environ.get(OOM_AT_WARMUP) == "1", environ.get(POISON_TRIGGER))
        if faults.active:
            logger.warning("FAULT INJECTION IS ON (a test setting, never for production): %s", faults)
        return faults

    @property
    def active(self) -> bool:
        return self.oom_above_tokens is not None or self.oom_at_warmup or bool(self.poison_trigger)

    def before_pass(self, padded_tokens: int, warming_up: bool) -> None:
        """Raise the injected fault, if any, that a pass of this size meets."""
        if self.poison_trigger and not self.poisoned:
            try:  # an atomic rename: of all replicas watching the file, one claims it
                os.rename(self.poison_trigger, f"{self.poison_trigger}.claimed-by-{os.getpid()}")
                self.poisoned = True
                logger.error("fault injection: this process's device is now poisoned")
            except FileNotFoundError:
                pass
        self.check_device()
        if warming_up and self.oom_at_warmup:
            raise torch.OutOfMemoryError(f"injected: {OOM_AT_WARMUP} (a pass of {padded_tokens} padded tokens)")
        if not warming_up and self.oom_above_tokens is not None and padded_tokens > self.oom_above_tokens:
            raise torch.OutOfMemoryError(
                f"injected: {OOM_ABOVE_TOKENS}={self.oom_above_tokens} (a pass of {padded_tokens} padded tokens)")

    def check_device(self) -> None:
        if self.poisoned:
            raise RuntimeError(f"{POISONED_MESSAGE} (injected: {POISON_TRIGGER})")


def release_cached_memory(device: str) -> None:
    """After an out-of-memory pass: drop the pass's garbage and hand the allocator's cached
    blocks back, so that the smaller passes that follow can use one contiguous free range."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def probe_device(device: str) -> None:
    """A tiny operation on the device, waited for: raises on a lost or poisoned device (a CUDA
    error is sticky: once the context is broken, every call fails). May block while the device
    finishes the work queued before it, or forever on a hung device: callers bound the wait."""
    x = torch.ones(8, device=device)
    if float((x * 2).sum()) != 16.0:  # the read back synchronizes
        raise RuntimeError(f"device {device} computed a wrong result: 2 * ones(8) summed != 16")
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
