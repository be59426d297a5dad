"""Online transforms: rotations the forward applies to activations at run time (R3, R4).

A weight can carry an input transform (R4 on `ffn_down`: the forward rotates the FFN activation, the weight was
pre-multiplied), and the attention can carry a per-head q/k transform after RoPE (R3). Both are (randomized)
Hadamard transforms. Metadata stores the size, the seed and — for randomized ones — the bit-packed signs, which
are authoritative, so a runtime never has to replay torch's random generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class OnlineHadamard:
    """x -> x @ Q with Q = H·diag(s)/√n (s = ±1 from `seed`), or Q = H/√n when seed is None."""

    n: int
    seed: int | None = None
    stored: dict | None = field(default=None, compare=False, repr=False)   # RandomizedHadamard metadata

    @cached_property
    def _rh(self):
        from twinquant.transforms.hadamard import RandomizedHadamard

        if self.stored is not None:
            return RandomizedHadamard.from_dict(self.stored)
        return RandomizedHadamard(self.n, self.seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            from twinquant.transforms.hadamard import fwht

            return fwht(x, normalize=True)
        return self._rh.apply(x)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.seed is None:
            from twinquant.transforms.hadamard import hadamard

            return hadamard(self.n, dtype=torch.float64).to(dtype) / self.n ** 0.5
        return self._rh.matrix(dtype)

    def to_dict(self) -> dict:
        d = {"kind": "hadamard", "n": self.n, "seed": self.seed}
        if self.seed is not None:
            d["randomized"] = self._rh.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OnlineHadamard":
        if d.get("kind") != "hadamard":
            raise TwinquantError(f"unknown online transform {d.get('kind')!r}")
        try:
            n, seed = int(d["n"]), d.get("seed")
        except (KeyError, TypeError, ValueError):
            raise TwinquantError(f"invalid online transform metadata: {d}") from None
        return cls(n, None if seed is None else int(seed), d.get("randomized"))
