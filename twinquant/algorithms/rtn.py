"""Round-to-nearest into any codec, with an MSE-optimal clipping search for codecs that expose a clip hook.

Clipping: shrinking a group's range below its min/max trades a large error on a few outliers for a finer grid
everywhere else; for heavy-tailed weights the (importance-weighted) squared error is minimised well inside the
range (the grid search of GPTQ's quantizer and of AWQ, Lin et al. 2023, arXiv 2306.00978). A codec opts in by
accepting `fit(w, importance, clip=ratio)` with a ratio broadcastable to [rows, block // sub] (integer grids do);
GGML codecs have no such hook and their `fit` is llama.cpp's, which searches its scales itself.
"""

from __future__ import annotations

import inspect

import torch

from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams, dequantize_codes
from twinquant.formats.ggml import libggml

# shrink factors tried by the clip search, 1.0 (plain min/max) first: ties keep the unclipped range
DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.025 * i, 4) for i in range(29))          # 1.0 … 0.3
_CHUNK = 1 << 24                                                                # elements per search batch


def bind(codec, cols: int):
    """The codec resolved for rows of `cols` columns: per-channel codecs (block <= 0) get their row length bound,
    and the row length must be whole blocks."""
    if codec.block <= 0:
        if not hasattr(codec, "for_cols"):
            raise TwinquantError(f"{codec.name}: no block size")
        codec = codec.for_cols(cols)
    if cols % codec.block:
        raise TwinquantError(f"{codec.name}: {cols} columns are not a multiple of its block of {codec.block}")
    return codec


def has_clip_hook(codec) -> bool:
    try:
        return "clip" in inspect.signature(codec.fit).parameters
    except (TypeError, ValueError):
        return False


_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def fit_block(codec, w: torch.Tensor, importance: torch.Tensor | None = None, clip_search: bool = True,
              grid=DEFAULT_CLIP_GRID) -> BlockParams:
    """Parameters of one block slice w [rows, block]: the codec's `fit`, or with `clip_search` (and a clip hook) the
    clip ratio from `grid` that minimises the importance-weighted squared error of each sub-block (of each row's
    block when one block has several sub-blocks, whose parameters are then chosen together)."""
    if not (clip_search and has_clip_hook(codec)):
        if getattr(codec, "name", None) in _K_TYPES and libggml.usable(w) and w.shape[1] == codec.block:
            # llama.cpp's fit on a CPU: libggml's bytes of the block hold exactly the parameters `fit` returns
            # (tested); the K-quant searches are the slow part of GPTQ there
            return codec.unpack(libggml.quantize_rows(codec.ggml_type, w, importance), codec.block)[1][0]
        return codec.fit(w, importance)
    w = w.float()
    rows, width = w.shape
    sub = codec.sub
    n = width // sub
    ratios = [1.0] + [float(r) for r in grid if float(r) != 1.0]
    imp = None if importance is None else importance.float().reshape(1, n, sub)
    errs = []
    step = max(1, _CHUNK // max(1, w.numel()))
    for k in range(0, len(ratios), step):
        # several ratios at once: the block repeated as extra rows (rows are independent in every format)
        r = torch.tensor(ratios[k:k + step])
        wr = w.repeat(len(r), 1)
        p = codec.fit(wr, importance, clip=r.repeat_interleave(rows)[:, None])
        d = codec.codes(wr, p).float().view(-1, n, sub).mul_(p.scale[..., None]).add_(p.offset[..., None])
        e = d.sub_(wr.view(-1, n, sub)).square_()
        errs.append((e if imp is None else e.mul_(imp)).sum(-1).view(len(r), rows, n))
    err = torch.cat(errs)
    if codec.block != sub:
        err = err.sum(-1, keepdim=True)
    best = torch.tensor(ratios)[err.argmin(0)]          # argmin: the first (largest) ratio wins ties
    return codec.fit(w, importance, clip=best.expand(rows, n))


def rtn(w: torch.Tensor, codec, importance: torch.Tensor | None = None, clip_search: bool = True,
        grid=DEFAULT_CLIP_GRID) -> tuple[torch.Tensor, list[BlockParams], torch.Tensor]:
    """Round-to-nearest of w [rows, cols]: (codes [rows, cols], one BlockParams per block, dequantized float32).

    Without a clip search (or for codecs with no clip hook) this is the codec's own `quantize` (llama.cpp's RTN
    for GGML formats, importance-aware where llama.cpp is).
    """
    if w.dim() != 2:
        raise TwinquantError(f"rtn: expected a matrix, got shape {tuple(w.shape)}")
    w = w.float()
    rows, cols = w.shape
    codec = bind(codec, cols)
    if importance is not None and importance.numel() != cols:
        raise TwinquantError(f"rtn: importance has {importance.numel()} entries for {cols} columns")
    b = codec.block
    if clip_search and has_clip_hook(codec):
        params, codes = [], []
        for j in range(0, cols, b):
            ib = None if importance is None else importance.reshape(cols)[j:j + b]
            p = fit_block(codec, w[:, j:j + b], ib, True, grid)
            params.append(p)
            codes.append(codec.codes(w[:, j:j + b], p))
        codes = torch.cat(codes, 1)
    else:
        codes, params = codec.quantize(w, importance)
    return codes, params, dequantize(codes, params, codec)


def dequantize(codes: torch.Tensor, params: list[BlockParams], codec) -> torch.Tensor:
    """float32 [rows, cols] of whole-matrix codes and their per-block parameters."""
    codec = bind(codec, codes.shape[1])
    b = codec.block
    return torch.cat([dequantize_codes(codes[:, j * b:(j + 1) * b], p, codec.sub) for j, p in enumerate(params)], 1)
