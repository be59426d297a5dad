"""Where twinquant's Triton kernels run: on CUDA tensors. On the CPU only for tests — TRITON_INTERPRET=1 (set
before Triton is imported: Triton's interpreter, numpy underneath) together with TWINQUANT_TRITON_CPU=1 — so a
test can check a kernel against its torch reference without a GPU while the rest of a CPU run stays plain torch.
Without Triton (it has no macOS wheels) or with TWINQUANT_NO_TRITON=1, callers use their torch reference."""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _on(var: str) -> bool:
    return os.environ.get(var, "0") not in ("", "0")


def interpreted() -> bool:
    """True when Triton runs kernels through its interpreter (no inline PTX there)."""
    return _on("TRITON_INTERPRET")


def runs_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel takes work on tensor t here."""
    if _on("TWINQUANT_NO_TRITON") or not triton_available():
        return False
    return t.is_cuda or (interpreted() and _on("TWINQUANT_TRITON_CPU"))
