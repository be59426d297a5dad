"""RO: an optimized orthogonal rotation, DFRot-style (Xiang & Zhang 2024, arXiv 2412.00648).

Start from a randomized Hadamard and alternate: quantize the rotated samples, then solve the (weighted) orthogonal
Procrustes problem for the rotation that best maps the samples onto their quantized versions:

    min_R  Σ_t w_t ‖x_t R − Q(x_t R)‖²      step: Y = Q(X R);  R = U Vᵀ where U Σ Vᵀ = svd(Xᵀ diag(w) Y)

Massive-activation tokens get a larger weight w_t (DFRot's finding: they dominate the error that matters).
The best rotation seen is returned, so the objective never ends above the starting RH's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from twinquant.model.history import Rotation


def int_rtn_rows(bits: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Symmetric per-row (per-token) round-to-nearest fake-quant, the default objective's quantizer."""
    qmax = 2 ** (bits - 1) - 1

    def q(x: torch.Tensor) -> torch.Tensor:
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
        return (x / s).round().clamp(-qmax - 1, qmax) * s

    return q


def objective(x: torch.Tensor, r: torch.Tensor, quantize, w: torch.Tensor | None = None) -> float:
    y = x @ r
    err = (y - quantize(y)).pow(2).sum(-1)
    return float((err * w).sum() if w is not None else err.sum())


@dataclass
class ROResult:
    rotation: torch.Tensor               # float64 [n, n], orthogonal
    history: list[float] = field(default_factory=list)   # objective per iteration (index 0 = the start)


def optimize_rotation(x: torch.Tensor, r0: torch.Tensor, quantize=None, weights: torch.Tensor | None = None,
                      iters: int = 20) -> ROResult:
    """x: samples [N, n] (activations and/or weight rows); r0: starting orthogonal matrix [n, n]."""
    quantize = quantize or int_rtn_rows(4)
    x = x.double()
    w = weights.double() if weights is not None else None
    r = r0.double()
    best, best_r = objective(x, r, quantize, w), r
    hist = [best]
    xw = x * w[:, None] if w is not None else x
    for _ in range(iters):
        y = quantize(x @ r)
        u, _, vh = torch.linalg.svd(xw.T @ y)
        r = u @ vh
        f = objective(x, r, quantize, w)
        hist.append(f)
        if f < best:
            best, best_r = f, r
    return ROResult(best_r, hist)


def token_weights(x: torch.Tensor, massive: torch.Tensor | None, factor: float = 10.0) -> torch.Tensor:
    """1 for ordinary tokens, `factor` for flagged massive-activation tokens (bool [N])."""
    w = torch.ones(x.shape[0], dtype=torch.float64)
    if massive is not None:
        w[massive] = factor
    return w


def optimize_rotation_from_samples(x: torch.Tensor, r0: torch.Tensor, n: int, seed: int, iters: int, bits: int,
                                   massive_factor: float) -> tuple[torch.Tensor, Rotation]:
    """RO as `rotate` runs it: massive tokens (above `massive_factor` x the 99.9th percentile) up-weighted; returns
    the rotation and its record for `model.history`."""
    from twinquant.rotation.massive import massive_token_mask

    thr = massive_factor * torch.quantile(x.abs().flatten()[:1 << 24].float(), 0.999).item()
    res = optimize_rotation(x, r0, int_rtn_rows(bits), token_weights(x, massive_token_mask(x, thr)), iters=iters)
    return res.rotation, Rotation("R1", "ro", n, seed, iters, bits, res.history[0], min(res.history))
