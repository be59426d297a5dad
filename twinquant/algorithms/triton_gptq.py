"""GPTQ's column sweep inside one lazy batch as a single Triton kernel (`gptq_sweep.sweep` launches it on CUDA).

Inside a batch every row of W is independent: column i's rounding residual of a row only updates the later
columns of the same row. So one program takes BR rows and the whole batch of those rows (NB columns, at most 128:
128 floats per thread with one warp of 32 rows, all in registers) and walks the columns in order, doing what the
torch loop does per column with ~9 launches each (~60 µs a column on an H200: 27648 columns of a 32B model's
ffn_down were seconds of launches):

  q = clamp(rint((w − o) / s), 0, qmax)    (s = inf for a zero-scale block: code 0)
  deq = o + S·q;  R[i] = w − deq;  D[i] = w0 − deq;  W[j] += M[i, j]·D[i] for j > i

The division is IEEE (`div_rn`) and `rint` rounds half to even, as torch.round: codes are RTN's expression. The
rank-1 updates are fused multiply-adds, where torch's addmm may round the product first, so a code can differ
from the torch sweep's by one step where a weight sits on a rounding boundary (tests bound how often).

Buffers are [n, columns, rows] with rows contiguous (n matrices for `gptq_many`, 1 for `gptq`); M is the batch's
block of the unit factor, [n, batch, batch] with any strides.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rint(x):
    """Round half to even, as torch.round (libdevice's rint has no interpreter version): x − floor(x) is exact."""
    t = tl.floor(x)
    f = x - t
    odd = (t - 2.0 * tl.floor(t * 0.5)) != 0.0
    return tl.where((f > 0.5) | ((f == 0.5) & odd), t + 1.0, t)


@triton.jit
def sweep_kernel(W1, W0, M, S, O, SD, Q, R, D, rows, a, b, nbat, qmax,
                 w1_n, w1_c, w0_n, w0_c, m_n, m_r, m_c, p_n, p_c, q_n, q_c, rd_n, rd_c,
                 NB: tl.constexpr, BR: tl.constexpr):
    e = tl.program_id(1)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < rows
    k = tl.arange(0, NB)
    km = k < nbat
    tmask = km[:, None] & rm[None, :]
    tile = tl.load(W1 + e * w1_n + k[:, None] * w1_c + r[None, :], mask=tmask, other=0.0)
    for i in range(a, b):
        w = tl.sum(tl.where(k[:, None] == i, tile, 0.0), axis=0)
        p = e * p_n + i * p_c + r
        o = tl.load(O + p, mask=rm, other=0.0)
        s = tl.load(S + p, mask=rm, other=0.0)
        sd = tl.load(SD + p, mask=rm, other=1.0)
        w0 = tl.load(W0 + e * w0_n + i * w0_c + r, mask=rm, other=0.0)
        q = _rint(tl.div_rn(w - o, sd))
        q = tl.minimum(tl.maximum(q, 0.0), qmax)
        deq = o + s * q
        tl.store(Q + e * q_n + i * q_c + r, q, mask=rm)
        tl.store(R + e * rd_n + i * rd_c + r, w - deq, mask=rm)
        d = w0 - deq
        tl.store(D + e * rd_n + i * rd_c + r, d, mask=rm)
        m = tl.load(M + e * m_n + i * m_r + k * m_c, mask=km & (k > i), other=0.0)
        tile += m[:, None] * d[None, :]
    tl.store(W1 + e * w1_n + k[:, None] * w1_c + r[None, :], tile, mask=tmask & (k[:, None] > a))
