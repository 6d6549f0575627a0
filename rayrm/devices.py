"""Where models run and in what precision: one choice for every package.

Backbones, the evaluation, the scorer and serving import these instead of choosing by hand,
so a CPU-only host and a GPU host pick the same way everywhere.
"""

from __future__ import annotations

import torch

from rayrm.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_device() -> torch.device:
    """The first GPU torch can use, else the CPU."""
    # Choose from torch, not from Ray: a fake-GPU test cluster assigns GPUs torch can't see.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bf16 on a GPU, fp32 elsewhere (CPU bf16 is slow; the reference ran fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"backbone.dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]
