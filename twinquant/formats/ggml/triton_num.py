"""Triton kernels for the sequential loops of llama.cpp's searches, one launch where torch takes hundreds.

The torch port (`_num.py`) keeps C's order of float operations, so a left-to-right sum of 32 values is 31 adds and
make_qp_quants' coordinate descent (5 passes over 32 codes) about 5,000 small ops: on a GPU each is a launch, and a
block-LDLQ sweep into IQ2_XXS made ~9,000 of them per 256 columns, nearly all its time (benchmarks/results/
scale_s11-*.json). Here each column of such a loop is one lane that runs the loop in registers.

The bits are the torch port's: every float operation is a separate IEEE float32 operation in the same order —
kernels are compiled with `enable_fp_fusion=False` (no a*b+c contracted into an FMA) and divide with `div_rn`
(correctly rounded, not Triton's approximate `/`). Tests run them under Triton's interpreter against the torch
loops (tests/test_triton_num.py) and on CUDA through the lent GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128


@triton.jit
def _seqsum_kernel(a, out, n, B, ZERO_START: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = (((0 + a[0, b]) + a[1, b]) + …) for a [n, B] float32 (without the 0 unless ZERO_START)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < B
    s = tl.load(a + cols, mask=m, other=0.0)
    if ZERO_START:
        s = tl.zeros([BLOCK], tl.float32) + s          # 0.0f + -0.0f is +0.0f, as in C
    p = a + cols
    for _ in range(1, n):
        p += B
        s += tl.load(p, mask=m, other=0.0)
    tl.store(out + cols, s, mask=m)


def seqsum_lead(a: torch.Tensor, zero_start: bool) -> torch.Tensor:
    """seqsum over the first axis of a contiguous float32 a [n, ...] -> [...]."""
    n = a.shape[0]
    flat = a.reshape(n, -1)
    B = flat.shape[1]
    out = torch.empty(B, dtype=torch.float32, device=a.device)
    if B:
        _seqsum_kernel[(triton.cdiv(B, _BLOCK),)](flat, out, n, B, ZERO_START=zero_start, BLOCK=_BLOCK,
                                                  enable_fp_fusion=False)
    return out.reshape(a.shape[1:])


@triton.jit
def _nearest_int(v):
    """ggml's nearest_int (add 1.5*2^23, read the mantissa); a NaN reads as 0 (as _num.nearest_int_ on a GPU)."""
    v = v + 12582912.0
    v = tl.where(v != v, 12582912.0, v)
    return (v.to(tl.int32, bitcast=True) & 0x7FFFFF) - 0x400000


@triton.jit
def _qp_descend_kernel(x, w, wx, L, sumlx, suml2, n, B, nmax, passes, BLOCK: tl.constexpr):
    """make_qp_quants' refinement (`_num._qp_pass`, `passes` times) of the sub-blocks in columns of [n, B]; L, sumlx
    and suml2 updated in place. A sub-block whose pass changes nothing is at its fixed point, so running every pass
    on every lane gives the bits of C's early exit."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < B
    slx_b = tl.load(sumlx + cols, mask=m, other=0.0)
    sl2_b = tl.load(suml2 + cols, mask=m, other=0.0)
    for _ in range(passes):
        off = cols.to(tl.int64)
        for _i in range(n):
            xi = tl.load(x + off, mask=m, other=0.0)
            wi = tl.load(w + off, mask=m, other=0.0)
            wxi = tl.load(wx + off, mask=m, other=0.0)
            Li = tl.load(L + off, mask=m, other=0)
            Lf = Li.to(tl.float32)
            slx = slx_b - wxi * Lf
            sl2 = sl2_b - (wi * Lf) * Lf
            new = tl.minimum(_nearest_int(tl.math.div_rn(xi * sl2, slx)), nmax)
            nf = new.to(tl.float32)
            slx2 = slx + wxi * nf
            sl22 = sl2 + (wi * nf) * nf
            upd = (slx > 0) & (sl2 > 0) & (new != Li) & ((slx2 * slx2) * sl2_b > (slx_b * slx_b) * sl22)
            tl.store(L + off, tl.where(upd, new & 0xFF, Li), mask=m)
            slx_b = tl.where(upd, slx2, slx_b)
            sl2_b = tl.where(upd, sl22, sl2_b)
            off += B
    tl.store(sumlx + cols, slx_b, mask=m)
    tl.store(suml2 + cols, sl2_b, mask=m)


def qp_descend(state: dict, nmax: int, passes: int) -> dict:
    """`_num._descend(state, _qp_pass)` in one launch: state's x, w, wx float32 [n, B], L int32 [n, B], sumlx,
    suml2 float32 [B], all contiguous; updated in place."""
    x, L = state["x"], state["L"]
    n, B = x.shape
    if B:
        _qp_descend_kernel[(triton.cdiv(B, _BLOCK),)](x, state["w"], state["wx"], L, state["sumlx"], state["suml2"],
                                                      n, B, nmax, passes, BLOCK=_BLOCK, enable_fp_fusion=False)
    return state
