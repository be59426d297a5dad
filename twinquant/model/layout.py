"""Layout: the execution order of a model, a list of slots that point at blocks.

The plain model runs block i in slot i. Layer duplication (a later stage) adds slots that point at an already
used block, so no weight is ever copied: a slot references its block by index.
"""

from __future__ import annotations

from dataclasses import dataclass

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class Slot:
    block: int            # index of the block (weights) this slot executes


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]

    @classmethod
    def sequential(cls, n_layers: int) -> "Layout":
        return cls(tuple(Slot(i) for i in range(n_layers)))

    def validate(self, n_layers: int) -> None:
        for s in self.slots:
            if not 0 <= s.block < n_layers:
                raise TwinquantError(f"layout: slot points at block {s.block}, model has {n_layers} blocks")

    def __len__(self) -> int:
        return len(self.slots)
