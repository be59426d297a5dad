"""Activation fake-quantization: round activations to a `bits`-bit grid and back (simulated W·A quantization).

Rotations (QuaRot, Ashkboos et al. 2024, arXiv 2404.00456; SpinQuant, Liu et al. 2024, arXiv 2405.16406) are
judged by how well activations survive this. Granularity is per token (one grid per row of the last dimension,
computed on the fly) or per tensor; the grid is dynamic (from each input) or static (fixed by `calibrate`).

* symmetric: `scale = clip · max|x| / (2**(bits-1) - 1)`, codes the signed integers `[-2**(bits-1), 2**(bits-1)-1]`;
* asymmetric: the range `clip · [min(x, 0), max(x, 0)]` in `2**bits - 1` steps with an integer zero point.

`clip_ratio < 1` shrinks the range (outliers saturate, the rest gets a finer grid). Stochastic rounding
(`floor(v + u)`, u ~ U[0, 1)) is unbiased inside the range; its noise comes from a `torch.Generator` seeded with
`seed` on every call (the same input gives the same output), or from a generator the caller passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from twinquant.errors import TwinquantError

VERSION = 1
_TINY = 1e-12                        # the scale of an all-zero token / tensor: any positive value represents 0


@dataclass(frozen=True)
class ActQuant:
    bits: int = 8
    granularity: str = "per_token"           # "per_token" | "per_tensor"
    symmetric: bool = True
    static: bool = False
    scale: float | None = None               # static only (per tensor)
    zero_point: float | None = None          # static asymmetric only: an integer code
    clip_ratio: float = 1.0
    rounding: str = "nearest"                # "nearest" | "stochastic"
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 16):
            raise TwinquantError(f"activation quantization: bits must be in 2..16, not {self.bits}")
        if self.granularity not in ("per_token", "per_tensor"):
            raise TwinquantError(f"activation quantization: granularity {self.granularity!r} is not per_token or per_tensor")
        if self.rounding not in ("nearest", "stochastic"):
            raise TwinquantError(f"activation quantization: rounding {self.rounding!r} is not nearest or stochastic")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise TwinquantError(f"activation quantization: clip ratio must be in (0, 1], not {self.clip_ratio}")
        if self.static and self.granularity != "per_tensor":
            raise TwinquantError("activation quantization: static scales are per tensor (tokens vary between inputs)")
        if self.scale is not None and not self.scale > 0:
            raise TwinquantError(f"activation quantization: scale must be positive, not {self.scale}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) broadcastable to x: from the given static values or from x itself."""
        if self.static:
            if self.scale is None or (not self.symmetric and self.zero_point is None):
                raise TwinquantError("activation quantization: static grid without scale/zero point; calibrate() first")
            return (torch.tensor(self.scale, device=x.device),
                    torch.tensor(0.0 if self.symmetric else self.zero_point, device=x.device))
        dims = dict(dim=-1, keepdim=True) if self.granularity == "per_token" else {}
        if self.symmetric:
            amax = (x.abs().amax(**dims) if dims else x.abs().amax()) * self.clip_ratio
            scale = torch.clamp(amax / self.qmax, min=_TINY)
            return scale, torch.zeros_like(scale)
        lo = (x.amin(**dims) if dims else x.amin()).clamp(max=0) * self.clip_ratio
        hi = (x.amax(**dims) if dims else x.amax()).clamp(min=0) * self.clip_ratio
        scale = torch.clamp((hi - lo) / self.qmax, min=_TINY)
        return scale, torch.round(-lo / scale)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_hat, the same shape and dtype as x (computed in float32)."""
        xf = x.float()
        if xf.numel() == 0:
            return x.clone()
        scale, zero = self._grid(xf)
        v = xf / scale + zero
        if self.rounding == "nearest":
            q = torch.round(v)
        else:
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            # noise drawn on the CPU generator, then moved: the same seed gives the same noise on every device
            q = torch.floor(v + torch.rand(v.shape, generator=generator).to(v.device))
        return ((q.clamp_(self.qmin, self.qmax) - zero) * scale).to(x.dtype)

    def calibrate(self, xs) -> "ActQuant":
        """A static per-tensor ActQuant whose grid covers the (clipped) range of the samples `xs` (tensors)."""
        lo, hi, amax, seen = 0.0, 0.0, 0.0, False
        for x in xs:
            x = x.float()
            if x.numel():
                lo, hi = min(lo, x.min().item()), max(hi, x.max().item())
                amax, seen = max(amax, x.abs().max().item()), True
        if not seen:
            raise TwinquantError("activation quantization: no samples to calibrate on")
        if self.symmetric:
            scale, zero = max(amax * self.clip_ratio / self.qmax, _TINY), None
        else:
            scale = max((hi - lo) * self.clip_ratio / self.qmax, _TINY)
            zero = float(round(-lo * self.clip_ratio / scale))
        return replace(self, granularity="per_tensor", static=True, scale=scale, zero_point=zero)

    def to_dict(self) -> dict:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActQuant":
        d = dict(d)
        if d.pop("version", None) != VERSION:
            raise TwinquantError(f"activation quantization: unsupported settings version (want {VERSION})")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise TwinquantError(f"activation quantization: unknown settings {sorted(unknown)}")
        return cls(**d)
