"""The one calibration loop: calibration activations pass a block window by window, Hessians collected on the way.

`quantize` (executor.py) and `measure` (quant/measure.py) both walk the blocks with these two functions, holding
only the activations entering the current block ([windows, ctx, hidden], float32) and that block's Hessians.
"""

from __future__ import annotations

import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.forward import block_forward


class HessianHook:
    """A `LinearHook` accumulating H = mean of 2·xᵀx over the inputs of the named linears (one per input group)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.acc: dict[str, tuple[torch.Tensor, int]] = {}

    def __call__(self, name: str, inp: torch.Tensor) -> None:
        if name in self.names:
            self._add(name, inp)

    def expert_input(self, name: str, expert: int, inp: torch.Tensor) -> None:
        """The inputs of one routed expert (the tokens routed to it): one Hessian per expert."""
        if name in self.names:
            self._add((name, expert), inp)

    def _add(self, key, inp: torch.Tensor) -> None:
        from twinquant.algorithms.gptq import accumulate_hessian

        H, n = self.acc.get(key, (None, 0))
        self.acc[key] = accumulate_hessian(H, n, inp.reshape(-1, inp.shape[-1]).float())

    def hessian(self, name: str) -> torch.Tensor | None:
        return self.acc.get(name, (None, 0))[0]

    def expert_hessians(self, name: str, n_experts: int, cols: int) -> tuple[list[torch.Tensor], list[int]]:
        """Per-expert Hessians of a stacked expert tensor with `cols` inputs, and the tokens each expert saw.

        Calibration reaches some experts rarely or never. An expert that saw fewer tokens than it has inputs has a
        singular Hessian (GPTQ would fit those few tokens), and one that saw none has no Hessian at all: both are
        completed with the tensor's pooled Hessian (the token-weighted mean over its experts), in proportion to the
        tokens missing: H = (n·H_e + (cols − n)·H_pool) / cols. An expert with enough tokens keeps its own."""
        own = [self.acc.get((name, e), (None, 0)) for e in range(n_experts)]
        total = sum(n for _, n in own)
        if total == 0:
            raise TwinquantError(f"{name}: no calibration token reached any expert")
        pool = sum(H * (n / total) for H, n in own if n)
        out = []
        for H, n in own:
            out.append(H if n >= cols else (pool if n == 0 else (H * n + pool * (cols - n)) / cols))
        return out, [n for _, n in own]


def block_pass(model, layer: int, x: torch.Tensor, hook=None) -> torch.Tensor:
    """Block `layer` applied to every window of x [n, ctx, hidden] (float32 in and out), one window at a time."""
    return torch.cat([block_forward(model, layer, x[i: i + 1].to(model.dtype), hook=hook).float()
                      for i in range(x.shape[0])])


def block_hessians(model, layer: int, x: torch.Tensor, wanted: set[str]) -> HessianHook:
    """The Hessians of the shared-input groups of block `layer` whose members are in `wanted` (keyed by the
    group's first name), from the activations x entering it."""
    hooks = HessianHook({g[0] for g in roles.shared_input_groups(layer, model.spec) if any(n in wanted for n in g)})
    if hooks.names:
        for i in range(x.shape[0]):
            block_forward(model, layer, x[i: i + 1].to(model.dtype), hook=hooks)
    return hooks
