"""The one calibration loop: calibration activations pass a block window by window, Hessians collected on the way.

`quantize` (executor.py) and `measure` (quant/measure.py) both walk the blocks with these functions, holding
only the activations entering the current block ([windows, ctx, hidden], float32), that block's Hessians and
(`staged_block`) the inputs of its linears.
"""

from __future__ import annotations

import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.forward import attention_mix, block_forward, ffn_mix, linear_input, linears, rms_norm


# Bytes of one stacked tensor's per-expert Hessians held at once by `block_hessians` (measure's pass; quantize goes
# expert-major, calibration/moe_blocks.py). DeepSeek-V3's 256 experts of 7168 inputs need 53 GB; past this they are
# collected a chunk of experts at a time (`ExpertHessians`), from the routed inputs the block pass kept (one
# [tokens, hidden] copy, 1 GB there), as the candidates reach each chunk.
EXPERT_HESSIAN_BYTES = 8 << 30


class HessianHook:
    """A `LinearHook` accumulating H = mean of 2·xᵀx over the inputs of the named linears (one per input group), and
    one H per slice of a stacked tensor (routed experts, MLA's per-head k_b / v_b) through `expert_input`.

    `chunked`: stacked expert tensors (by their gate_exps / down_exps name) whose per-expert Hessians would not fit
    in memory: for them the hook keeps the routed inputs (`routing`), each expert's token count and input power
    (the Hessian's diagonal) and the pooled Hessian instead; `expert_hessians` then rebuilds chunks on demand."""

    def __init__(self, names: set[str], chunked: set[str] = frozenset()):
        self.names = names
        self.chunked = set(chunked)
        self.acc: dict = {}                               # key -> HessianSum
        self.stats: dict[tuple[str, int], list] = {}      # chunked: (name, expert) -> [tokens, Σ 2x²]
        self.routed: dict[str, list] = {}                 # chunked gate_exps name -> [(inputs, chosen experts)]
        self._experts: dict[str, ExpertHessians] = {}

    def __call__(self, name: str, inp: torch.Tensor) -> None:
        if name in self.names:
            self._add(name, inp)

    def expert_input(self, name: str, expert: int, inp: torch.Tensor) -> None:
        """The inputs of one routed expert (the tokens routed to it) or head: one Hessian per expert."""
        if name not in self.names:
            return
        if name not in self.chunked:
            self._add((name, expert), inp)
            return
        x = inp.reshape(-1, inp.shape[-1]).float()
        st = self.stats.setdefault((name, expert), [0, 0.0])
        st[0] += x.shape[0]
        st[1] = st[1] + 2 * x.square().sum(0)
        self._add(name, x)          # the pool: every routed input of the tensor

    def routing(self, name: str, x: torch.Tensor, chosen: torch.Tensor) -> None:
        """A MoE block's FFN input [tokens, hidden] and the experts each token was routed to [tokens, k]."""
        if self.chunked:        # (any of this block's stacks: down's inputs are computed from these too)
            self.routed.setdefault(name, []).append((x.detach().float(), chosen))

    def _add(self, key, inp: torch.Tensor) -> None:
        from twinquant.algorithms.gptq import HessianSum

        self.acc.setdefault(key, HessianSum()).add(inp)

    def _taken(self, key, pop: bool = False) -> tuple[torch.Tensor | None, int]:
        acc = self.acc.pop(key, None) if pop else self.acc.get(key)
        return (acc.H, acc.n) if acc is not None else (None, 0)

    def hessian(self, name: str) -> torch.Tensor | None:
        return self._taken(name)[0]

    def expert_hessians(self, name: str, n_experts: int, cols: int, recollect=None) -> tuple["ExpertHessians",
                                                                                                list[int]]:
        """Per-expert Hessians of a stacked tensor with `cols` inputs (`ExpertHessians`), and the tokens each
        expert saw. `recollect(name, experts: range) -> {expert: (H, tokens)}` rebuilds a chunk of a `chunked`
        tensor's. Asked again (gate and up share theirs), the same object."""
        if name not in self._experts:
            if name in self.chunked:
                tokens = [self.stats.get((name, e), [0])[0] for e in range(n_experts)]
                power = [self.stats.get((name, e), [0, None])[1] for e in range(n_experts)]
                pool = self._taken(name)[0]
                chunk = max(1, EXPERT_HESSIAN_BYTES // (4 * cols * cols))
                hs = ExpertHessians(cols, tokens, pool, power=power, chunk=chunk,
                                    recollect=lambda r: recollect(name, r))
            else:
                own = [self._taken((name, e), pop=True) for e in range(n_experts)]
                tokens = [n for _, n in own]
                total = sum(tokens)
                pool = sum(H * (n / total) for H, n in own if n) if total else None
                hs = ExpertHessians(cols, tokens, pool, own=[H for H, _ in own])
            if hs.pool is None:
                raise TwinquantError(f"{name}: no calibration token reached any expert")
            self._experts[name] = hs
        hs = self._experts[name]
        return hs, hs.tokens


class ExpertHessians:
    """The Hessians of a stacked tensor's experts (`hs[e]`, `hs[a:b]`), their diagonals (`diagonal(e)`) and the
    tokens each saw (`tokens`).

    Calibration reaches some experts rarely or never. An expert that saw fewer tokens than it has inputs has a
    singular Hessian (GPTQ would fit those few tokens), and one that saw none has no Hessian at all: both are
    completed with the tensor's pooled Hessian (the token-weighted mean over its experts), in proportion to the
    tokens missing: H = (n·H_e + (cols − n)·H_pool) / cols. An expert with enough tokens keeps its own.

    Held all at once (`own`), or a chunk of `chunk` experts at a time: `recollect(range)` rebuilds a chunk's own
    Hessians when one of its experts is asked for, dropping the previous chunk (ask in expert order)."""

    def __init__(self, cols: int, tokens: list[int], pool, own: list | None = None, power: list | None = None,
                 chunk: int = 0, recollect=None):
        self.cols, self.tokens, self.pool = cols, tokens, pool
        self.power, self.chunk, self.recollect = power, chunk, recollect
        self.held = None if own is None else {e: self._complete(H, n) for e, (H, n) in enumerate(zip(own, tokens))}
        self.chunks_built = 0

    def _complete(self, H, n: int):
        """In place: a chunk's (or the whole set's) own Hessians are not used otherwise."""
        if n >= self.cols:
            return H
        if n == 0 or H is None:
            return self.pool
        return H.mul_(n / self.cols).add_(self.pool, alpha=(self.cols - n) / self.cols)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, e):
        if isinstance(e, slice):
            return [self[i] for i in range(*e.indices(len(self)))]
        if self.held is None or e not in self.held:
            if self.recollect is None:
                raise IndexError(e)
            start = e // self.chunk * self.chunk
            self.held = None            # the previous chunk goes before the next is built
            got = self.recollect(range(start, min(start + self.chunk, len(self))))
            self.held = {i: self._complete(got.get(i, (None, 0))[0], self.tokens[i])
                         for i in range(start, min(start + self.chunk, len(self)))}
            self.chunks_built += 1
        return self.held[e]

    def diagonal(self, e: int) -> torch.Tensor:
        """Expert e's completed Hessian's diagonal, without building its chunk."""
        if self.power is None:
            return torch.diagonal(self[e]).clone()
        n = self.tokens[e]
        if n >= self.cols:
            return self.power[e] / n
        own = self.power[e] if n else 0.0
        return (own + torch.diagonal(self.pool) * (self.cols - n)) / self.cols


def routed_hessians(model, layer: int, name: str, inputs: list, experts: range) -> dict[int, tuple]:
    """{expert: (H, tokens)} of the stacked tensor `name` of MoE block `layer` for `experts`, from the block's
    routed FFN inputs (`HessianHook.routing`): gate/up's inputs are the tokens routed to the expert, down's the
    expert's activations on them (with the block's gate/up as they are now)."""
    import torch.nn.functional as F

    from twinquant.algorithms.gptq import accumulate_hessian

    x = torch.cat([i for i, _ in inputs])
    chosen = torch.cat([c for _, c in inputs])
    down = roles.block_tensor(name) == roles.EXPERTS[2]
    if down:
        gate, up = (model.get(roles.name(t, layer)) for t in roles.EXPERTS[:2])
    out = {}
    for e in experts:
        xe = x[(chosen == e).any(-1)]
        if xe.shape[0] == 0:
            continue
        if down:
            xe = (F.silu(xe @ gate[e].float().T) * (xe @ up[e].float().T))
        out[e] = accumulate_hessian(None, 0, xe)
    return out


def block_pass(model, layer: int, x: torch.Tensor, hook=None) -> torch.Tensor:
    """Block `layer` applied to every window of x [n, ctx, hidden] (float32 in and out), one window at a time."""
    return torch.cat([block_forward(model, layer, x[i: i + 1].to(model.dtype), hook=hook).float()
                      for i in range(x.shape[0])])


def recollector(model, layer: int, hooks: HessianHook):
    """`recollect(name, experts)` for `HessianHook.expert_hessians`: chunks of block `layer`'s large stacks from
    the routed inputs `hooks` kept."""
    gate = roles.name(roles.EXPERTS[0], layer)
    return lambda name, experts: routed_hessians(model, layer, name, hooks.routed[gate], experts)


def chunked_stacks(model, layer: int) -> set[str]:
    """The stacked expert tensors of block `layer` whose per-expert Hessians exceed EXPERT_HESSIAN_BYTES."""
    s = model.spec
    out = set()
    for g in roles.shared_input_groups(layer, s):
        if roles.is_expert_stack(g[0]):
            n, _, cols = roles.expected_shape(s, g[0])
            if 4 * n * cols * cols > EXPERT_HESSIAN_BYTES:
                out.add(g[0])
    return out


def block_hessians(model, layer: int, x: torch.Tensor, wanted: set[str]) -> HessianHook:
    """The Hessians of the shared-input groups of block `layer` whose members are in `wanted` (keyed by the
    group's first name), from the activations x entering it; per-expert ones of large stacks in chunks later
    (`chunked_stacks`)."""
    names = {g[0] for g in roles.shared_input_groups(layer, model.spec) if any(n in wanted for n in g)}
    hooks = HessianHook(names, chunked_stacks(model, layer) & names)
    if hooks.names:
        for i in range(x.shape[0]):
            block_forward(model, layer, x[i: i + 1].to(model.dtype), hook=hooks)
    return hooks


def stages(model, layer: int) -> bool:
    """True when `staged_block` knows block `layer`: (q, k, v), (o), (gate, up), (down) of a dense block."""
    return not model.spec.mla and not model.spec.moe_layer(layer)


def staged_block(model, layer: int, x: torch.Tensor, wanted: set[str], quantize_group,
                 spill_dir=None, in_place: bool = False) -> torch.Tensor:
    """Block `layer` over every window of x [n, ctx, hidden] one shared-input group at a time (GPTQ's "true
    sequential" order), quantizing as it goes; returns the block's outputs (float32), the next block's inputs.

    Each group's Hessian (when a member is in `wanted`; else None) comes from the inputs the block computes with
    the groups before it already quantized, `quantize_group(group, H)` quantizes it, and then its outputs are
    computed once, with the quantized weights. So every linear of the block runs once: `block_hessians` +
    `block_pass` ran the block twice (once with the float weights for the Hessians, once with the quantized ones
    for the outputs), the larger part of a block's time on a CPU. The block's intermediate inputs are held for all
    windows at once (the FFN's: windows · ctx · intermediate floats, 0.6 GB for Qwen2.5-1.5B and 17920 tokens);
    on the CPU, past `spill.SPILL_ABOVE`, in a temporary file in `spill_dir` (6.1 GB at 32B shapes).

    `in_place`: the residual after attention, then the outputs, are written over x (the caller gives x up; it is
    returned): one [windows, ctx, hidden] float32 copy fewer while the FFN is quantized (1.1 GB at 32B shapes).
    The same bits: the residual is stored exactly (a float32 copy of model.dtype values) and read back in that
    dtype."""
    from twinquant.algorithms.gptq import HessianSum
    from twinquant.calibration.spill import StagedInputs

    s, T = model.spec, roles.T
    qkv, o, gate_up, down = roles.shared_input_groups(layer, s)
    n = x.shape[0]

    def hessian(group, inputs) -> torch.Tensor | None:
        if not any(m in wanted for m in group):
            return None
        acc = HessianSum()
        for i in range(n):
            acc.add(inputs(i))
        return acc.H

    def window(i):
        return x[i: i + 1].to(model.dtype)

    def attn_in(i):
        return rms_norm(window(i), model.get(roles.name(T.ATTN_NORM, layer)), s.rms_eps)

    quantize_group(qkv, hessian(qkv, lambda i: linear_input(attn_in(i), model, qkv[0])))
    mix = [linear_input(attention_mix(model, layer, attn_in(i), 0, None, 0, None), model, o[0]) for i in range(n)]
    quantize_group(o, hessian(o, lambda i: mix[i]))
    for i in range(n):      # the residual after attention, in place of the mix (or of x) it no longer needs
        r = window(i) + linears(mix[i], model, o, None, prepared=True)[0]
        if in_place:
            x[i: i + 1] = r
            mix[i] = None
        else:
            mix[i] = r
    res = window if in_place else mix.__getitem__

    def ffn_in(i):
        return rms_norm(res(i), model.get(roles.name(T.FFN_NORM, layer)), s.rms_eps)

    quantize_group(gate_up, hessian(gate_up, lambda i: linear_input(ffn_in(i), model, gate_up[0])))
    act = None
    for i in range(n):
        a = linear_input(ffn_mix(model, layer, ffn_in(i), None), model, down[0])
        if act is None:
            act = StagedInputs(n, a.shape, a.dtype, a.device, spill_dir)
        act.append(a)
        del a
    quantize_group(down, hessian(down, lambda i: act[i]))
    out = x if in_place else torch.empty_like(x)
    for i in range(n):
        out[i] = (res(i) + linears(act[i], model, down, None, prepared=True)[0])[0].float()
        mix[i] = None
    act.close()
    return out
