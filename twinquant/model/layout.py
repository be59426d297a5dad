"""Layout: the execution order of a model, a list of slots that point at blocks.

The plain model runs block i in slot i. Layer duplication adds slots that point at an already used block, so no
weight is ever copied: a slot references its block by index, and `copy` says which execution of that block it is
(0 = the original, k = the k-th duplicate), which selects the copy's own parameter set
(`twinquant.model.copies`).

- a **serial** slot runs one copy as a full residual block, scaled by the copy's residual factor α:
  `x + α·(B(x) − x)` (α = 1: the block as it is; α = 0: identity);
- a **parallel** slot runs several copies of one block on the same input and adds their residual branches once,
  weighted: `x + Σ wᵢ·(Bᵢ(x) − x)` (Σ wᵢ = 1 by default, so identical copies give the block itself).

Every execution of attention needs its own keys and values, so the KV cache has one entry per execution
(`Layout.executions`), not per block.
"""

from __future__ import annotations

from dataclasses import dataclass

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class Slot:
    block: int                                   # index of the block (weights) this slot executes
    copy: int = 0                                # serial: which execution of the block (its parameter set)
    members: tuple[tuple[int, float], ...] = ()  # parallel: (copy, weight) per member; () = a serial slot

    @property
    def parallel(self) -> bool:
        return bool(self.members)

    def copies(self) -> tuple[int, ...]:
        return tuple(c for c, _ in self.members) if self.members else (self.copy,)


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]

    @classmethod
    def sequential(cls, n_layers: int) -> "Layout":
        return cls(tuple(Slot(i) for i in range(n_layers)))

    def validate(self, n_layers: int) -> None:
        seen: set[tuple[int, int]] = set()
        for s in self.slots:
            if not 0 <= s.block < n_layers:
                raise TwinquantError(f"layout: slot points at block {s.block}, model has {n_layers} blocks")
            for c in s.copies():
                if c < 0 or (s.block, c) in seen:
                    raise TwinquantError(f"layout: copy {c} of block {s.block} is executed twice or is negative")
                seen.add((s.block, c))
        for b in range(n_layers):
            if (b, 0) not in seen:
                raise TwinquantError(f"layout: block {b} is never executed as its original (copy 0)")

    @property
    def is_sequential(self) -> bool:
        return all(not s.parallel and s.block == i and s.copy == 0 for i, s in enumerate(self.slots))

    def executions(self) -> list[tuple[int, int, int]]:
        """(slot index, block, copy) of every block execution, in order: one KV-cache entry each."""
        return [(i, s.block, c) for i, s in enumerate(self.slots) for c in s.copies()]

    def extra_executions(self) -> int:
        return len(self.executions()) - len({s.block for s in self.slots})

    def __len__(self) -> int:
        return len(self.slots)
