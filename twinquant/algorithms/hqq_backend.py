"""HQQ (Half-Quadratic Quantization, Badri & Shaji 2023) as a weight quantizer: `get_quantizer("hqq")`.

HQQ needs no calibration data: for each group of columns it starts from the min/max affine grid and then moves the
group's zero point by a half-quadratic (proximal) solver that minimises the lp-norm (p < 1, default 0.7) of the
reconstruction error `|| W - dequant(quant(W)) ||_p^p`, which is robust to the outliers of heavy-tailed weights.
The solver is the `hqq` package's own (`hqq.core.optimize.optimize_weights_proximal_legacy`, the optimizer behind
its default `Quantizer.quantize(..., optimize=True)`), called with `axis=1` on the weight reshaped to one group per
row and run on the weight's device (on CPU in float32; on CUDA HQQ iterates in float16). `hqq` is an optional
dependency, imported only when a matrix is quantized: `pip install 'twinquant[hqq]'`.

Codecs: asymmetric integer grids (`IntGrid(bits, group_size, symmetric=False)`, per-channel included) only; a group
is the codec's block. In HQQ's convention a group is `q = round(w * s_inv + z)` and `w ~ (q - z) / s_inv`; here it
becomes `BlockParams(scale=1/s_inv, offset=-scale * z)` (value = scale * q + offset) with codes in [0, qmax] (HQQ's
own rounding of the optimised grid), and `W_hat` is `dequantize_codes` of those codes and parameters.
`importance` is ignored (HQQ's objective weighs every weight alike) and so is `H` (it is data-free).

Float zero points. HQQ's zero points are floats (and its scales float32), so the parameters are *not* what an
integer-grid checkpoint stores (fp16 scale, integer zero in [0, qmax]). They are kept as they are, for fake-quant
experiments (the pipeline stores W_hat for integer grids): `BlockParams.packed` is None and `IntGrid.pack` refuses
them with a TwinquantError ("parameters not representable (fp16 scale, integer zero)"). Rounding the zeros to
integers and re-fitting the codes would be a different method and is not done here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinquant.algorithms.config import Config
from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams, dequantize_codes
from twinquant.formats.intgrid import IntGrid

MISSING = "the hqq backend needs the optional extra: pip install 'twinquant[hqq]'"


def _optimizer():
    """HQQ's proximal zero-point solver (imported lazily: hqq is an optional extra)."""
    try:
        from hqq.core.optimize import optimize_weights_proximal_legacy
    except ImportError as e:
        raise TwinquantError(MISSING) from e
    return optimize_weights_proximal_legacy


@dataclass(frozen=True)
class HQQConfig(Config):
    """Versioned like the other backends' configs."""

    iters: int = 20                  # maximum solver iterations (HQQ stops early once the mean |error| rises)
    lp_norm: float = 0.7             # p of the lp-norm minimised (0 < p <= 1; HQQ's default 0.7)
    beta: float = 10.0               # initial half-quadratic penalty
    kappa: float = 1.01              # growth of beta per iteration

    def __post_init__(self):
        if self.iters < 1 or not 0 < self.lp_norm <= 1 or self.beta <= 0 or self.kappa <= 1:
            raise TwinquantError("HQQConfig: iters must be >= 1, 0 < lp_norm <= 1, beta > 0 and kappa > 1")


def hqq_fit(W: torch.Tensor, codec: IntGrid, config: HQQConfig | None = None):
    """HQQ of W [rows, cols] on an asymmetric integer grid: (float codes [rows, cols], scale [rows, n], offset
    [rows, n]) with n = cols // group; see the module docstring."""
    config = config or HQQConfig()
    optimize = _optimizer()
    W = W.float()
    rows, cols = W.shape
    g = codec.block
    Wg = W.reshape(rows * (cols // g), g)
    lo, hi = Wg.amin(1, keepdim=True), Wg.amax(1, keepdim=True)
    # min/max start in HQQ's convention (inverse scale); a constant group gets s_inv = 1 (every step fits it exactly)
    span = hi - lo
    s_inv = codec.qmax / torch.where(span > 0, span, torch.ones_like(span))
    s_inv = torch.where((span > 0) & torch.isfinite(s_inv), s_inv, torch.ones_like(s_inv))
    z = -lo * s_inv
    opt = {"lp_norm": float(config.lp_norm), "beta": float(config.beta), "kappa": float(config.kappa),
           "iters": int(config.iters)}
    q, s_inv, z = optimize(tensor=Wg, scale=s_inv, zero=z, min_max=[0, codec.qmax], axis=1, device=W.device,
                           opt_params=opt)
    scale = (1.0 / s_inv.float()).reshape(rows, -1)
    offset = -scale * z.float().reshape(rows, -1)
    return q.float().reshape(rows, cols), scale, offset


class HQQQuantizer:
    name = "hqq"
    needs_hessian = False
    Config = HQQConfig

    def __init__(self, config: HQQConfig | None = None):
        self.config = config or HQQConfig()

    def quantize_weight(self, W, codec, H=None, importance=None):
        if not isinstance(codec, IntGrid) or codec.symmetric:
            name = getattr(codec, "name", type(codec).__name__)
            raise TwinquantError(f"hqq: only asymmetric integer grids (like int4_g64_asym) are supported, not {name}")
        if W.dim() != 2:
            raise TwinquantError(f"hqq: expected a matrix, got shape {tuple(W.shape)}")
        codec = codec.for_cols(W.shape[1])
        q, scale, offset = hqq_fit(W, codec, self.config)
        codes = q.to(torch.uint8)
        b = codec.block
        params = [BlockParams(scale[:, j:j + 1].contiguous(), offset[:, j:j + 1].contiguous())
                  for j in range(W.shape[1] // b)]
        W_hat = torch.cat([dequantize_codes(codes[:, j * b:(j + 1) * b], p, codec.sub)
                           for j, p in enumerate(params)], 1)
        return codes, params, W_hat
