"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) rounding into any codec's format.

GPTQ quantizes the columns of W [rows, cols] one at a time and spreads each column's rounding error over the
columns not yet quantized, along the inverse Hessian of the layer's output error `H = 2 XᵀX / n`, so that
`‖XWᵀ − XŴᵀ‖²` (not ‖W − Ŵ‖²) is what gets small. The codec's parameters of a block are fitted when the sweep
reaches the block's first column, on the weights as the error updates have left them: GPTQ rounds *into the
codec's format* (GGML K-quants included) with parameters chosen along the way.

Here, as in the paper: damping `damp * mean(diag H)`; dead columns (`H_ii == 0`: an input that is always 0) get
`H_ii = 1` and weight 0; the upper Cholesky factor of H⁻¹ replaces repeated inverse updates (float64 for the
factorisations); updates are lazy, applied to the columns beyond a batch of `block_size` columns once per batch.

Act-order (columns by descending `H_ii`, the most sensitive first) needs the parameters of every block before
the sweep reaches it out of order: with `static_groups=True` they are fitted up front on the original W, in the
original column order, and each column uses its own block's. `act_order=True, static_groups=False` raises a
TwinquantError when the format has more than one block per row (formats with contiguous blocks cannot take
GPTQ's permuted groups); with one block per row (per-channel grids) the two are the same and it is allowed.

Devices: everything runs where W is (H is moved there), the float64 factorisation too; an n×n float64 matrix is
8·n² bytes (6.1 GB for n = 27648) and `_inverse_cholesky` holds about five at once (H, the identity, the damped
and flipped copy, the factor, U), which an H200 holds easily.

Each column is rounded to the nearest code of the stored grid (`nearest_codes`). With a diagonal Hessian nothing
propagates and the result is the codec's RTN with the same parameters; the one exception is llama.cpp's legacy
Q8_0/Q4_0/Q5_0, whose RTN rounds with the fp32 inverse scale before the scale is stored as fp16, so a few codes
(~0.1-1%) differ from it by one step, always to the grid point nearer the weight.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams
from twinquant.formats.intgrid import nearest_codes
from twinquant.algorithms.rtn import DEFAULT_CLIP_GRID, bind, dequantize, fit_block


@dataclass
class GPTQResult:
    codes: torch.Tensor              # [rows, cols] in the original column order, the dtype of codec.codes
    params: list[BlockParams]        # one per codec block, in column order: ready for codec.pack
    dequantized: torch.Tensor        # float32 [rows, cols]
    loss: float                      # ½·Σ err²/[H⁻¹]_ii over columns = ½·tr(ΔW H ΔWᵀ) for the damped H


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch x [..., in] (flattened to [tokens, in]) to the running `H = 2 XᵀX / n`: returns (H, n).

    Pass (None, 0) first. A running mean keeps H's scale independent of the token count (and of float32 range).
    H lives on the device of the first batch; later batches are moved to it.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    t = x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    elif H.shape != (x.shape[1], x.shape[1]):
        raise TwinquantError(f"hessian: H is {tuple(H.shape)} but inputs have {x.shape[1]} features")
    if t == 0:
        return H, n
    x = x.to(H.device)
    total = n + t
    H = H * (n / total) + x.T @ x * (2.0 / total)
    return H, total


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = H⁻¹), λ = damp·mean(diag H), in float64.

    A Hessian that is not positive definite after damping (too few tokens, rank-deficient inputs) gets tenfold
    damping until it is, with a warning.
    """
    H = H.double()
    mean = torch.diagonal(H).mean().item()
    if not (mean > 0 and torch.isfinite(H).all()):
        raise TwinquantError("gptq: the Hessian has a non-positive or non-finite diagonal (not 2·XᵀX/n?)")
    eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
    lam = damp
    for _ in range(10):
        # with J the order reversal, J·H·J = L·Lᵀ gives H = R·Rᵀ with R = J·L·J upper, so H⁻¹ = R⁻ᵀ·R⁻¹ and
        # U = R⁻¹: one factorisation and one triangular solve instead of inverting H and factorising again
        L, info = torch.linalg.cholesky_ex((H + lam * mean * eye).flip(0, 1))
        if info.item() == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
            if torch.isfinite(U).all():
                return U
        more = lam * 10 if lam > 0 else 1e-6
        warnings.warn(f"gptq: Hessian not positive definite with damping {lam:g}; retrying with {more:g}", stacklevel=3)
        lam = more
    raise TwinquantError("gptq: the Hessian is not positive definite even with heavy damping")


def gptq(W: torch.Tensor, H: torch.Tensor, codec, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, importance: torch.Tensor | None = None, clip_search: bool = False,
         grid=DEFAULT_CLIP_GRID) -> GPTQResult:
    """Quantize W [rows, cols] into `codec` minimising the output error under H [cols, cols] (see module doc).

    `importance` ([cols]) goes to the codec's `fit` (llama.cpp's imatrix for GGML formats); `clip_search` fits each
    block with RTN's clip search (codecs with a clip hook) instead of the plain `fit`.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise TwinquantError(f"gptq: W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    if block_size < 1 or damp < 0:
        raise TwinquantError("gptq: block_size must be >= 1 and damp >= 0")
    rows, cols = W.shape
    codec = bind(codec, cols)
    nb, B, sub = cols // codec.block, codec.block, codec.sub
    if act_order and not static_groups and nb > 1:
        raise TwinquantError(f"gptq: act_order with {codec.name} ({nb} blocks per row) needs static_groups=True")
    if importance is not None and importance.numel() != cols:
        raise TwinquantError(f"gptq: importance has {importance.numel()} entries for {cols} columns")
    imp = None if importance is None else importance.to(W.device, torch.float32).reshape(cols)

    dev = W.device
    W = W.float().clone()
    H = H.to(dev, torch.float64, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def fit(w_block, j):                                 # parameters of block j fitted on w_block [rows, B]
        ib = None if imp is None else imp[j * B:(j + 1) * B]
        return fit_block(codec, w_block, ib, clip_search, grid)

    params: list[BlockParams | None] = [None] * nb
    # The sweep works on transposed copies ([cols, rows]: a column is a contiguous row). St/Ot hold each column's
    # effective scale/offset in the processing order, filled when its block's parameters are known.
    St = torch.zeros(cols, rows, device=dev)
    Ot = torch.zeros(cols, rows, device=dev)
    static = static_groups or act_order
    if static:
        for j in range(nb):
            params[j] = fit(W[:, j * B:(j + 1) * B], j)
            St[j * B:(j + 1) * B] = params[j].scale.repeat_interleave(sub, 1).T
            Ot[j * B:(j + 1) * B] = params[j].offset.repeat_interleave(sub, 1).T

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H, St, Ot = W[:, perm], H[perm][:, perm], St[perm], Ot[perm]

    U = _inverse_cholesky(H, damp).float()
    del H
    Wt = W.T.contiguous()
    del W
    Qt = torch.zeros(cols, rows, device=dev)
    losses = torch.zeros(cols, device=dev)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()                           # this batch, updated column by column
        E1 = torch.zeros(i2 - i1, rows, device=dev)                  # scaled errors, for the lazy update beyond the batch
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if not static and c % B == 0:
                # a new codec block: fit it on the weights with every update so far; the part of the block
                # beyond this batch has not had this batch's updates yet, so apply them to a copy
                e = min(c + B, cols)
                wb = W1[i:min(e, i2) - i1]
                if e > i2:
                    wb = torch.cat([wb, Wt[i2:e] - U[i1:c, i2:e].T @ E1[:i]], 0)
                j = c // B
                params[j] = fit(wb.T.contiguous(), j)
                St[c:e] = params[j].scale.repeat_interleave(sub, 1).T
                Ot[c:e] = params[j].offset.repeat_interleave(sub, 1).T
            w = W1[i]
            q = nearest_codes(w, St[c], Ot[c], codec.qmax)
            r = w - (St[c] * q + Ot[c])
            d = U1[i, i]
            Qt[c] = q
            losses[c] = r.square().sum() / (2 * d * d)
            err = r / d
            # spread the error over the batch (rank 1); addmm_, not addr_: torch's CPU addr_ is ~60x slower here
            W1[i + 1:].addmm_(U1[i, i + 1:, None], err[None, :], alpha=-1.0)
            E1[i] = err
        Wt[i2:].addmm_(U[i1:i2, i2:].T, E1, alpha=-1.0)  # the lazy update of everything after the batch

    Q = Qt.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    dtype = codec.codes(torch.zeros(rows, B, device=dev), params[0]).dtype       # the codec's own code dtype
    codes = Q.to(dtype)
    return GPTQResult(codes, params, dequantize(codes, params, codec), losses.double().sum().item())
