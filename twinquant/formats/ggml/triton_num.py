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


@triton.jit
def _scan_kernel(best, bi, x2, q2, s, n, S, base, BLOCK: tl.constexpr):
    """IQ1's acceptance scan (`iq1._scan_rows`) down the rows of [n, S], one lane per sub-block."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < S
    b = tl.load(best + cols, mask=m, other=0.0)
    i = tl.load(bi + cols, mask=m, other=-1)
    off = cols.to(tl.int64)
    for r in range(n):
        acc = tl.load(x2 + off, mask=m, other=0.0) > b * tl.load(q2 + off, mask=m, other=0.0)
        b = tl.where(acc, tl.load(s + off, mask=m, other=0.0), b)
        i = tl.where(acc, base + r, i)
        off += S
    tl.store(best + cols, b, mask=m)
    tl.store(bi + cols, i, mask=m)


def scan(best: torch.Tensor, bi: torch.Tensor, x2: torch.Tensor, q2: torch.Tensor, s: torch.Tensor, base: int):
    """iq1._scan in one launch: best float32 [S] and bi int64 [S] updated in place from x2, q2, s [n, S]."""
    n, S = x2.shape
    if S and n:
        x2, q2, s = x2.contiguous(), q2.contiguous(), s.contiguous()
        _scan_kernel[(triton.cdiv(S, _BLOCK),)](best, bi, x2, q2, s, n, S, base, BLOCK=_BLOCK,
                                                enable_fp_fusion=False)


# ---- IQ1_S / IQ1_M: the split searches (iq1._iq1s_sub, iq1._iq1m_sub) ------------------------------------------

@triton.jit
def _prefix_kernel(c, p, n, S, BLOCK: tl.constexpr):
    """p [n+1, S] = sequential prefix sums of c [n, S] (p[0] = 0, p[j+1] = p[j] + c[j])."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < S
    acc = tl.zeros([BLOCK], tl.float32)
    tl.store(p + cols, acc, mask=m)
    off = cols.to(tl.int64)
    for _ in range(n):
        acc = acc + tl.load(c + off, mask=m, other=0.0)
        off += S
        tl.store(p + off, acc, mask=m)


def prefix(c: torch.Tensor) -> torch.Tensor:
    """iq1._prefix of one element-major list c [n, S] (float32) in one launch."""
    c = c.contiguous()
    n, S = c.shape
    p = torch.empty(n + 1, S, dtype=torch.float32, device=c.device)
    if S:
        _prefix_kernel[(triton.cdiv(S, _BLOCK),)](c, p, n, S, BLOCK=_BLOCK, enable_fp_fusion=False)
    return p


@triton.jit
def _row(p, r, S, cols, m):
    """Row r of an element-major [n, S] float32 list at the lanes' columns."""
    return tl.load(p + r * S + cols, mask=m, other=0.0)


@triton.jit
def _accept(b, i, sqx, sq2, c):
    """One candidate of iq1._scan: C's `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {best = scale*sumqx; …}`."""
    acc = (sq2 > 0) & (sqx * sqx > b * sq2)
    return tl.where(acc, tl.math.div_rn(sqx, sq2) * sqx, b), tl.where(acc, c, i)


@triton.jit
def _iq1s_terms(s1, s2, sn, t1, t2, tn, v0, v1, v2):
    """iq1._iq1s_terms: sumqx, sumq2 of the split (i1, i2) with shift values v."""
    sqx = (s1 * v0 + (s2 - s1) * v1) + (sn - s2) * v2
    sq2 = ((t1 * v0) * v0 + ((t2 - t1) * v1) * v1) + ((tn - t2) * v2) * v2
    return sqx, sq2


@triton.jit
def _iq1s_search_kernel(sx, sw, best, bi, n, S, BLOCK: tl.constexpr):
    """Every split (i1 <= i2) and shift of IQ1_S's sub-blocks in C's order, accepted as iq1._scan does; bi counts
    the candidates as iq1._iq1s_sub lists them."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < S
    b = tl.load(best + cols, mask=m, other=0.0)
    i = tl.load(bi + cols, mask=m, other=-1)
    sn = _row(sx, n, S, cols, m)
    tn = _row(sw, n, S, cols, m)
    c = 0
    for i1 in range(n + 1):
        s1 = _row(sx, i1, S, cols, m)
        t1 = _row(sw, i1, S, cols, m)
        for i2 in range(i1, n + 1):
            s2 = _row(sx, i2, S, cols, m)
            t2 = _row(sw, i2, S, cols, m)
            sqx, sq2 = _iq1s_terms(s1, s2, sn, t1, t2, tn, -0.875, 0.125, 1.125)
            b, i = _accept(b, i, sqx, sq2, c)
            sqx, sq2 = _iq1s_terms(s1, s2, sn, t1, t2, tn, -1.125, -0.125, 0.875)
            b, i = _accept(b, i, sqx, sq2, c + 1)
            c += 2
    tl.store(best + cols, b, mask=m)
    tl.store(bi + cols, i, mask=m)


def iq1s_search(sx: torch.Tensor, sw: torch.Tensor, best: torch.Tensor, bi: torch.Tensor) -> None:
    """IQ1_S's candidate loop over prefix sums sx, sw [n+1, S]: best [S] and bi [S] (int64) updated in place."""
    n, S = sx.shape[0] - 1, sx.shape[1]
    if S:
        _iq1s_search_kernel[(triton.cdiv(S, _BLOCK),)](sx.contiguous(), sw.contiguous(), best, bi, n, S,
                                                       BLOCK=_BLOCK, enable_fp_fusion=False)


@triton.jit
def _half_terms(px1, px2, pw1, pw2, tx, tw, v2, c1, c2):
    """iq1._half_terms: one half's (qx, q2) at the split (i1, i2)."""
    return tx * v2 - (px1 + px2), ((tw * v2) * v2 + pw1 * c1) + pw2 * c2


@triton.jit
def _iq1m_search_kernel(px0, px1, pw0, pw1, best, bi, n, S, va, vb, c1a, c1b, c2a, c2b, BLOCK: tl.constexpr):
    """Every split (i1 <= i2) and shift combination k of IQ1_M's sub-blocks in C's order (k: group 0 takes x_m for
    k >= 2, group 1 for odd k; va/vb, c1*, c2*: iq1._V2, _C1, _C2 of x_p and x_m), accepted as iq1._scan does."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < S
    b = tl.load(best + cols, mask=m, other=0.0)
    i = tl.load(bi + cols, mask=m, other=-1)
    tx0 = _row(px0, n, S, cols, m)
    tx1 = _row(px1, n, S, cols, m)
    tw0 = _row(pw0, n, S, cols, m)
    tw1 = _row(pw1, n, S, cols, m)
    c = 0
    for i1 in range(n + 1):
        a0 = _row(px0, i1, S, cols, m)
        a1 = _row(px1, i1, S, cols, m)
        e0 = _row(pw0, i1, S, cols, m)
        e1 = _row(pw1, i1, S, cols, m)
        for i2 in range(i1, n + 1):
            b0 = _row(px0, i2, S, cols, m)
            b1 = _row(px1, i2, S, cols, m)
            f0 = _row(pw0, i2, S, cols, m)
            f1 = _row(pw1, i2, S, cols, m)
            qx0p, q20p = _half_terms(a0, b0, e0, f0, tx0, tw0, va, c1a, c2a)
            qx0m, q20m = _half_terms(a0, b0, e0, f0, tx0, tw0, vb, c1b, c2b)
            qx1p, q21p = _half_terms(a1, b1, e1, f1, tx1, tw1, va, c1a, c2a)
            qx1m, q21m = _half_terms(a1, b1, e1, f1, tx1, tw1, vb, c1b, c2b)
            b, i = _accept(b, i, qx0p + qx1p, q20p + q21p, c)
            b, i = _accept(b, i, qx0p + qx1m, q20p + q21m, c + 1)
            b, i = _accept(b, i, qx0m + qx1p, q20m + q21p, c + 2)
            b, i = _accept(b, i, qx0m + qx1m, q20m + q21m, c + 3)
            c += 4
    tl.store(best + cols, b, mask=m)
    tl.store(bi + cols, i, mask=m)


def iq1m_search(px, pw, best, bi, v2, c1, c2) -> None:
    """IQ1_M's candidate loop over the halves' prefix sums px, pw (two [n+1, S] each): best, bi updated in place."""
    n, S = px[0].shape[0] - 1, px[0].shape[1]
    if S:
        _iq1m_search_kernel[(triton.cdiv(S, _BLOCK),)](
            *(t.contiguous() for t in (*px, *pw)), best, bi, n, S, *v2, *c1, *c2, BLOCK=_BLOCK,
            enable_fp_fusion=False)
