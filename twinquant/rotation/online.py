"""Online transforms: rotations the forward applies to activations at run time (R3, R4).

A weight can carry an input transform (R4 on `ffn_down`: the forward rotates the FFN activation, the weight was
pre-multiplied), and the attention can carry a per-head q/k transform after RoPE (R3). Both are (randomized)
Hadamard transforms, stored by size and seed so a runtime can rebuild them from metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OnlineHadamard:
    """x -> x @ Q with Q = H·diag(s)/√n (s = ±1 from `seed`), or Q = H/√n when seed is None."""

    n: int
    seed: int | None = None

    def _rh(self):
        from twinquant.rotation.hadamard import RandomizedHadamard

        return RandomizedHadamard(self.n, self.seed)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            from twinquant.rotation.hadamard import fwht

            return fwht(x, normalize=True)
        return self._rh().apply(x)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.seed is None:
            from twinquant.rotation.hadamard import hadamard

            return hadamard(self.n, dtype=torch.float64).to(dtype) / self.n ** 0.5
        return self._rh().matrix(dtype)

    def to_dict(self) -> dict:
        return {"kind": "hadamard", "n": self.n, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "OnlineHadamard":
        if d.get("kind") != "hadamard":
            from twinquant.errors import TwinquantError

            raise TwinquantError(f"unknown online transform {d.get('kind')!r}")
        return cls(int(d["n"]), d.get("seed"))
