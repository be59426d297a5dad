"""A mixture-of-experts block quantized with one batch of experts' weights in memory.

A DeepSeek-V3 block holds three stacks of 256 experts (2048 x 7168 each): 45 GB in float32, 53 GB more for the
per-expert Hessians. `staged_moe_block` never materialises a stack. The attention runs window by window as in any
block (its Hessians from the float weights, quantized, run again quantized). The FFN then runs over every
calibration token at once (`[tokens, hidden]`: 1 GB for V3's 36864 tokens), expert-major, so each expert's weights
are read once from the source (`Model.expert`), a batch of experts at a time:

1. the router (never quantized) picks each token's experts; the shared expert, if any, is quantized and run as a
   dense FFN over all tokens (gate/up with the Hessian of the normed inputs, down with the Hessian of its
   activations computed with the quantized gate/up);
2. each batch of experts: gate and up quantized with each expert's Hessian of the tokens routed to it, then the
   expert's activations computed with the quantized gate/up and kept (`StagedRows`, on disk past 2 GiB on a CPU:
   2.4 GB for V3);
3. each batch again: down quantized with the Hessian of those activations, and its outputs, weighted by the
   router, summed into the block's output.

GPTQ's "true sequential" order inside each expert: down's Hessian comes from the inputs it will see. An expert
that saw fewer tokens than it has inputs (or none) is completed with the tensor's pooled Hessian
(`ExpertHessians`): for gate/up that is the Hessian of every token (each token is routed to exactly k experts), for
down the token-weighted mean over all experts' activations, known once step 2 has run every expert; hence the
two sweeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinquant.algorithms.backends import experts_per_batch
from twinquant.algorithms.gptq import HessianSum
from twinquant.calibration.blocks import ExpertHessians, HessianHook
from twinquant.calibration.spill import StagedRows
from twinquant.model import roles
from twinquant.model.forward import attention, latent_attention, linear_input, linears, rms_norm, route

T = roles.T


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianSum()
    acc.add(x)
    return acc.H


def staged_moe_block(model, layer: int, x: torch.Tensor, wanted: set[str], quantize_group, quantize_stack,
                     stack_quantizer, spill_dir=None, batch: int | None = None) -> torch.Tensor:
    """MoE block `layer` over every window of x [n, ctx, hidden] (float32), quantizing as it goes; x is
    overwritten with the block's outputs and returned (see the module doc).

    `quantize_group(group, H)` quantizes a group of ordinary linears with its Hessian (None when none of it is in
    `wanted`); `quantize_stack(name, hessians)` a whole per-head stack of latent attention (small);
    `stack_quantizer(name)` gives, for a routed-expert stack in `wanted`, an object whose `batch(first, W, Hs)`
    quantizes the experts first.. of W [b, rows, cols] with their Hessians and returns their dequantized weights,
    and whose `finish(tokens)` ends the tensor; None for a stack that stays float. `batch` experts at a time (by
    default as many as one gptq_many batch takes)."""
    s, dt, n = model.spec, model.dtype, x.shape[0]
    groups = roles.shared_input_groups(layer, s)
    tail = 4 if s.shared_ffn else 2
    attn_groups, shared_groups = groups[:-tail], groups[-tail:-2]
    attend = latent_attention if s.mla else attention

    def attn(i, hook):
        h = rms_norm(x[i: i + 1].to(dt), model.get(roles.name(T.ATTN_NORM, layer)), s.rms_eps)
        return attend(model, layer, h, 0, None, 0, hook)

    names = {g[0] for g in attn_groups if any(m in wanted for m in g)}
    if names:
        hooks = HessianHook(names)
        for i in range(n):
            attn(i, hooks)
        for g in attn_groups:
            if g[0] not in names:
                continue
            if roles.is_stack(g[0]):         # latent attention's per-head k_b / v_b
                heads, _, cols = roles.expected_shape(s, g[0])
                quantize_stack(g[0], hooks.expert_hessians(g[0], heads, cols)[0])
            else:
                quantize_group(g, hooks.hessian(g[0]))
        del hooks
    for i in range(n):      # the residual after the (quantized) attention, in place
        x[i: i + 1] = (x[i: i + 1].to(dt) + attn(i, None)).float()

    flat = rms_norm(x.reshape(-1, s.hidden).to(dt), model.get(roles.name(T.FFN_NORM, layer)), s.rms_eps)
    weights, chosen = route(model, layer, flat, None)
    weights = weights.to(dt)
    out = torch.zeros_like(flat)
    gate_n, up_n, down_n = (roles.name(t, layer) for t in roles.EXPERTS)
    sinks = {m: stack_quantizer(m) if m in wanted else None for m in (gate_n, up_n, down_n)}
    routed_in = linear_input(flat, model, gate_n)
    pool = None
    cover = [(chosen == e).nonzero(as_tuple=True) for e in range(s.n_experts)]     # (tokens, slot) per expert
    tokens = [int(t.shape[0]) for t, _ in cover]
    rows_at = [0]
    for c in tokens:
        rows_at.append(rows_at[-1] + c)
    cols = s.hidden
    shared_wanted = bool(shared_groups) and any(m in wanted for m in shared_groups[0])
    if ((sinks[gate_n] or sinks[up_n]) and min(tokens) < cols) or shared_wanted:
        # the token-weighted mean of the experts' own Hessians: each token is routed to k of them. (The shared
        # expert reads the same input: MoE models take no online input transforms.)
        pool = _hessian(routed_in)

    shared = None
    if shared_groups:
        gu, dn = shared_groups
        quantize_group(gu, pool if shared_wanted else None)
        g, u = linears(flat, model, gu, None)
        act = linear_input(F.silu(g) * u, model, dn[0])
        del g, u
        quantize_group(dn, _hessian(act) if any(m in wanted for m in dn) else None)
        shared = linears(act, model, dn, None, prepared=True)[0]
        del act
        if roles.shared_gate(s):
            shared = torch.sigmoid(linears(flat, model, (roles.name(T.FFN_GATE_INP_SHEXP, layer),), None)[0]) * shared

    ffn = s.expert_ffn
    steps = (batch or experts_per_batch(ffn, cols, x.device), batch or experts_per_batch(cols, ffn, x.device))
    acts = StagedRows(rows_at[-1], ffn, dt, flat.device, spill_dir)
    down_pool = HessianSum() if sinks[down_n] else None

    def hessians(xs, first, pooled, width):
        own = [_hessian(xe) if xe.shape[0] else None for xe in xs]
        hs = ExpertHessians(width, tokens[first: first + len(xs)], pooled, own=own)
        return [hs[i] for i in range(len(xs))]

    def quantized(name, first, W, Hs):
        sink = sinks[name]
        return [w.to(dt) for w in (sink.batch(first, W, Hs) if sink is not None else W)]

    for e0 in range(0, s.n_experts, steps[0]):      # gate and up, a batch of experts at a time
        ex = range(e0, min(s.n_experts, e0 + steps[0]))
        xs = [routed_in[cover[e][0]] for e in ex]
        Hs = hessians(xs, e0, pool, cols) if sinks[gate_n] or sinks[up_n] else None
        got = [quantized(m, e0, torch.stack([model.expert(m, e).float() for e in ex]), Hs) for m in (gate_n, up_n)]
        for j, e in enumerate(ex):
            a = linear_input(F.silu(F.linear(xs[j], got[0][j])) * F.linear(xs[j], got[1][j]), model, down_n)
            acts.put(rows_at[e], a)
            if down_pool is not None:
                down_pool.add(a)
        del xs, Hs, got
    for m in (gate_n, up_n):        # their bytes go (to the work directory) before down's sweep
        if sinks[m] is not None:
            sinks[m].finish(tokens)
    down_H = down_pool.H if down_pool is not None and down_pool.n else None
    for e0 in range(0, s.n_experts, steps[1]):      # down, and the routed outputs
        ex = range(e0, min(s.n_experts, e0 + steps[1]))
        xs = [acts.get(rows_at[e], tokens[e]) for e in ex]
        Hs = hessians(xs, e0, down_H, ffn) if sinks[down_n] else None
        W = quantized(down_n, e0, torch.stack([model.expert(down_n, e).float() for e in ex]), Hs)
        for j, e in enumerate(ex):
            if tokens[e]:
                tok, k = cover[e]
                out.index_add_(0, tok, F.linear(xs[j].to(flat.device), W[j]) * weights[tok, k, None])
        del xs, Hs, W
    acts.close()
    if sinks[down_n] is not None:
        sinks[down_n].finish(tokens)
    if shared is not None:
        out = out + shared
    x.view(-1, s.hidden)[:] = (x.reshape(-1, s.hidden).to(dt) + out).float()
    return x
