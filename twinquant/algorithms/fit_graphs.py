"""GGML block fits replayed as CUDA graphs inside GPTQ.

GPTQ fits a codec block each time its sweep reaches one (20 blocks for a 5120-wide row, 108 for 27648), always on
the same shape. llama.cpp's searches, ported op for op to torch (`formats/ggml/_num.py`), are thousands of tiny
kernels a fit: on an H200 a fit took 15-35 ms whatever the rows, nearly all of it launching. A fit is captured once
per shape (under `static_shapes()`: no host synchronisation, fixed shapes, the same bits) and replayed for every
later block: inputs are copied into the graph's buffers, the outputs cloned out.

`FitGraphs` lives for one GPTQ call (its graphs hold their buffers). Each capture is checked once: its first
replay must give the bits of the eager fit it was warmed up with; a fit that cannot be captured, or fails that
check, is run as usual with a warning. TWINQUANT_NO_FIT_GRAPHS=1 turns graphs off.
"""

from __future__ import annotations

import os
import warnings

import torch

from twinquant.formats.codec import BlockParams
from twinquant.formats.ggml._num import static_shapes


def graphs_enabled(device: torch.device, codec) -> bool:
    """Fits of `codec` on `device` are replayed from graphs: CUDA, a GGML codec with per-weight codes."""
    return (device.type == "cuda" and os.environ.get("TWINQUANT_NO_FIT_GRAPHS", "0") in ("", "0")
            and hasattr(codec, "ggml_type") and not getattr(codec, "blockwise", False))


def _equal(a: BlockParams, b: BlockParams) -> bool:
    """The same bits in every field of two fits."""
    for x, y in zip(a.fields(), b.fields()):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


class FitGraphs:
    """codec.fit(w, importance) through one captured graph per (codec, shape, importance or not)."""

    def __init__(self):
        self._graphs: dict = {}

    def fit(self, codec, w: torch.Tensor, importance: torch.Tensor | None) -> BlockParams:
        key = (codec.name, tuple(w.shape), None if importance is None else tuple(importance.shape))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(codec, w, importance)
        if entry is False:                               # not capturable: run it as usual
            return codec.fit(w, importance)
        graph, w_in, imp_in, out = entry
        w_in.copy_(w)
        if imp_in is not None:
            imp_in.copy_(importance)
        graph.replay()
        return out.map_tensors(torch.clone)     # the graph's buffers are overwritten by the next replay

    @staticmethod
    def _capture(codec, w, importance):
        w_in = w.clone()
        imp_in = None if importance is None else importance.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), static_shapes():       # warm-up, as torch asks before a capture
                ref = codec.fit(w_in, imp_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with static_shapes(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = codec.fit(w_in, imp_in)
            graph.replay()
            same = _equal(ref, out)                              # the replay must give the eager fit's bits
        except Exception as e:      # noqa: BLE001  (any capture failure: the plain fit still works)
            warnings.warn(f"{codec.name}: block fit not captured as a CUDA graph ({type(e).__name__}: "
                          f"{str(e)[:120]}); fitting eagerly", stacklevel=3)
            torch.cuda.synchronize()
            return False
        if not same:
            warnings.warn(f"{codec.name}: a CUDA graph of the block fit gave other parameters than the fit itself; "
                          f"fitting eagerly", stacklevel=3)
            return False
        return graph, w_in, imp_in, out
