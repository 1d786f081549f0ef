"""Which way a model attends: causal decoders may run right-padded passes without a mask.

With right padding, a causal decoder's real tokens never attend to the padding after them, so
its padded passes need no attention mask. Without one, transformers neither checks a mask on
the host (a device sync per pass) nor builds a dense one, and SDPA runs its causal (flash)
kernel instead of the memory-efficient kernel over the full square. Bidirectional encoders
(BERT, MiniLM) need the mask: their tokens attend to everything in the row.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def attends_only_backwards(model: torch.nn.Module, device: str) -> bool:
    """Is `model` causal? Tested, not read from its config (whose flags differ per family): two
    rows that differ only in their last token must give the same hidden states before it."""
    first, second = [5, 9, 13, 17, 21, 25], [5, 9, 13, 17, 21, 7]
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    rows = model(input_ids=torch.tensor([first, second], device=device), **kwargs).last_hidden_state
    before, after = rows[0, :-1].float(), rows[1, :-1].float()
    # Causal: computed alike, so equal but for the last bits of rounding; bidirectional: moved
    # by the other token by far more than any rounding.
    return bool(torch.allclose(before, after, rtol=1e-3, atol=1e-3 * float(before.abs().max())))
