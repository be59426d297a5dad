"""The column sweep of one GPTQ lazy batch, between two block fits: torch column by column, or one Triton kernel.

`gptq` and `gptq_many` call `sweep` for each run of columns that needs no new codec parameters (a whole batch, or
the columns up to the next block's first). All buffers are [n, columns, rows] (rows contiguous; n = 1 for `gptq`),
sliced to the batch: W1 (the batch's columns with every update so far, updated in place), W0 (the original
columns), M1 (the batch's block of the unit factor), St / Ot / Sd (each column's effective scale, offset and the
division scale, inf where a block's scale is 0), Qt (codes, out), R1 / D1 (rounding residuals and Δ, out).

On a GPU the torch loop is launch-bound (~9 launches, ~60 µs a column on an H200); `triton_gptq.sweep_kernel`
does a batch in one launch. On the CPU the torch loop stays (it is arithmetic-bound there).
"""

from __future__ import annotations

import torch

from twinquant.triton_env import runs_triton

MAX_FUSED_BATCH = 128          # the kernel holds a batch of 32 rows in one warp's registers: 128 floats a thread


def fused_sweep(Wt: torch.Tensor, block_size: int) -> bool:
    """Whether `sweep` takes the Triton kernel for buffers on Wt's device with batches of `block_size` columns."""
    return block_size <= MAX_FUSED_BATCH and runs_triton(Wt)


def sweep(W1, W0, M1, St, Ot, Sd, Qt, R1, D1, a: int, b: int, qmax: int, fused: bool) -> None:
    """Columns a..b-1 of the batch (module doc): codes into Qt, residuals into R1, Δ into D1, and each column's
    Δ spread over the batch's later columns of W1 along M1."""
    if a >= b:
        return
    if fused:
        _sweep_triton(W1, W0, M1, St, Ot, Sd, Qt, R1, D1, a, b, qmax)
        return
    one = W1.shape[0] == 1                    # one matrix: 2-D views and addmm_ (the CPU's baddbmm_ is slower)
    # column views: X[i] is column i of every matrix ([rows] for one matrix, [n, rows] for several)
    cw, c0, cs, co, cd, cq, cr, cD = (t[0] if one else t.transpose(0, 1) for t in (W1, W0, St, Ot, Sd, Qt, R1, D1))
    for i in range(a, b):
        w = cw[i]
        # nearest_codes' expression (RTN's rounding, bit for bit) without its per-column zero test
        q = (w - co[i]).div_(cd[i]).round_().clamp_(0, qmax)
        deq = torch.addcmul(co[i], cs[i], q)
        cq[i] = q
        torch.sub(w, deq, out=cr[i])
        d = torch.sub(c0[i], deq, out=cD[i])
        # spread Δ over the batch (rank 1); addmm_, not addr_: torch's CPU addr_ is ~60x slower here
        if one:
            cw[i + 1:].addmm_(M1[0, i, i + 1:, None], d[None, :])
        else:
            W1[:, i + 1:].baddbmm_(M1[:, i, i + 1:, None], d[:, None, :])


def _sweep_triton(W1, W0, M1, St, Ot, Sd, Qt, R1, D1, a, b, qmax) -> None:
    import triton

    from twinquant.algorithms.triton_gptq import sweep_kernel

    n, nbat, rows = W1.shape
    for t in (W1, W0, St, Ot, Sd, Qt, R1, D1):
        assert t.stride(-1) == 1, f"sweep: rows (the last axis) must be contiguous: {t.shape} {t.stride()}"
    assert St.stride() == Ot.stride() == Sd.stride() and R1.stride() == D1.stride()
    BR = 32
    sweep_kernel[(triton.cdiv(rows, BR), n)](
        W1, W0, M1, St, Ot, Sd, Qt, R1, D1, rows, a, b, nbat, float(qmax),
        W1.stride(0), W1.stride(1), W0.stride(0), W0.stride(1), M1.stride(0), M1.stride(1), M1.stride(2),
        St.stride(0), St.stride(1), Qt.stride(0), Qt.stride(1), R1.stride(0), R1.stride(1),
        NB=max(16, triton.next_power_of_2(nbat)), BR=BR, num_warps=1)
