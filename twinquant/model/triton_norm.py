"""RMSNorm as one Triton kernel, optionally with the residual add before it: `forward.rms_norm`'s arithmetic
(normalize in float32, round to the activations' dtype, then times the weight) in one launch instead of two to
four, and `x + y` then the norm in one instead of three to five. A decode step is hundreds of tiny launches; in a
replayed CUDA graph each one costs microseconds whatever its size. The torch path stays the reference
(tests/test_triton_kernels.py runs both through Triton's interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinquant.formats.ggml.packed import q8_buffers, with_q8
from twinquant.formats.ggml.triton_kquants import q8_halves, store_q8

MAX_WIDTH = 16384          # one program holds a row
Q8_COLS = 1024             # columns a program normalizes and quantizes when it also stores h's int8 form


@triton.jit
def _row_tile(x_ptr, r_ptr, row, i, N, HAS_RES: tl.constexpr):
    """x (+ r, added in float32 and rounded to x's dtype) at the row's offsets i."""
    x = tl.load(x_ptr + row + i, mask=i < N, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(r_ptr + row + i, mask=i < N, other=0.0).to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, xo_ptr, h_ptr, q_ptr, d_ptr, s_ptr, N, eps, HAS_RES: tl.constexpr,
                    BLOCK: tl.constexpr, COLS: tl.constexpr, Q8: tl.constexpr = False):
    """Row program_id(0), columns program_id(1)·COLS ...: x (+ r, stored to xo) -> h = w · round(x · rsqrt(mean(x²)
    + eps)); Q8: h's int8 form too (`packed.quantize_q8` in the word-lane order, for the GEMV that reads h:
    `packed.with_q8`). Values in tiles [blocks of 32, 2, 16], `store_q8`'s layout. COLS < BLOCK: each program sums
    the squares of the whole row (from the L2) and writes its own columns: quantizing a row in one program took one
    SM several microseconds of arithmetic."""
    m = tl.program_id(0)
    row = m.to(tl.int64) * N
    blocks = tl.arange(0, BLOCK // 32)
    i = blocks[:, None, None] * 32 + q8_halves()
    x = _row_tile(x_ptr, r_ptr, row, i, N, HAS_RES)
    xf = x.to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(tl.sum(tl.sum(xf * xf, axis=2), axis=1), axis=0) / N + eps)
    if COLS < BLOCK:         # this program's columns again (the same arithmetic)
        blocks = tl.program_id(1) * (COLS // 32) + tl.arange(0, COLS // 32)
        i = blocks[:, None, None] * 32 + q8_halves()
        x = _row_tile(x_ptr, r_ptr, row, i, N, HAS_RES)
        xf = x.to(tl.float32)
    ok = i < N
    if HAS_RES:
        tl.store(xo_ptr + row + i, x, mask=ok)
    n = (xf * r).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    h = (w * n).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row + i, h, mask=ok)
    if Q8:
        store_q8(h.to(tl.float32), blocks, N // 32, q_ptr + row, d_ptr + m * (N // 32), s_ptr + m * (N // 16), True)


def fits(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None) -> bool:
    """Whether the kernel takes this norm: contiguous rows of one dtype (not float64) no wider than MAX_WIDTH."""
    return (x.is_contiguous() and x.dtype == w.dtype != torch.float64 and w.shape == x.shape[-1:]
            and x.shape[-1] <= MAX_WIDTH and (res is None or (res.is_contiguous() and res.shape == x.shape
                                                              and res.dtype == x.dtype)))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, res: torch.Tensor | None = None, q8: bool = False):
    """h = RMSNorm(x) · w; with res, (x + res, RMSNorm(x + res) · w). Callers check `fits` first. `q8` (a width of
    whole super-blocks): h also carries its int8 form (`packed.with_q8`), for an int8-x GEMV to read."""
    n = x.shape[-1]
    h = torch.empty_like(x)
    xo = torch.empty_like(x) if res is not None else h
    block = max(32, triton.next_power_of_2(n))
    cols = min(block, Q8_COLS) if q8 else block
    rows = x.numel() // n
    q, d, s = q8_buffers(rows, n, x.device) if q8 else (h, h, h)
    rms_norm_kernel[(rows, triton.cdiv(n, cols))](x, res if res is not None else x, w, xo, h, q, d, s, n, eps,
                                                   HAS_RES=res is not None, BLOCK=block, COLS=cols, Q8=q8,
                                                   num_warps=min(16, max(1, block // 512)))
    if q8:
        with_q8(h, (q.view(torch.int32), d, s))
    return (xo, h) if res is not None else h
