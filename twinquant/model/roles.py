"""Tensor roles and the facts rotation and GPTQ need about them.

A role is named exactly as llama.cpp names the tensor (gguf-py's `TENSOR_NAMES` templates, e.g.
`blk.{bid}.attn_q` + `.weight`), so GGUF needs no renaming and only the Hugging Face loader maps names.

Spaces: `residual` (hidden), `head` (per-head q/k/v space), `ffn` (intermediate), `vocab`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from twinquant.model.architectures import get_architecture
from twinquant.model.spec import ModelSpec

T = gguf.MODEL_TENSOR


def _base(t: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[t]


@dataclass(frozen=True)
class LinearRole:
    tensor: gguf.MODEL_TENSOR
    reads: str            # space of the input
    writes: str           # space of the output
    input_group: str      # linears with the same group read the same input (share calibration statistics)

    @property
    def base(self) -> str:
        return _base(self.tensor)


# Per-block linears in execution order.
BLOCK_LINEARS: tuple[LinearRole, ...] = (
    LinearRole(T.ATTN_Q, "residual", "head", "attn_in"),
    LinearRole(T.ATTN_K, "residual", "head", "attn_in"),
    LinearRole(T.ATTN_V, "residual", "head", "attn_in"),
    LinearRole(T.ATTN_OUT, "head", "residual", "attn_out"),
    LinearRole(T.FFN_GATE, "residual", "ffn", "ffn_in"),
    LinearRole(T.FFN_UP, "residual", "ffn", "ffn_in"),
    LinearRole(T.FFN_DOWN, "ffn", "residual", "ffn_out"),
)
OUTPUT_LINEAR = LinearRole(T.OUTPUT, "residual", "vocab", "output")

# A mixture-of-experts block's FFN (in place of the dense gate/up/down): the router, the routed experts stacked
# [experts, out, in] as llama.cpp stores them, and the optional shared expert with its sigmoid gate ([1, hidden]).
ROUTER = T.FFN_GATE_INP
EXPERTS = (T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)
SHARED_EXPERT = (T.FFN_GATE_INP_SHEXP, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)
# Weights kept in F32 whatever the file type, as llama.cpp's converter keeps them: a router in half precision
# changes which experts tokens go to.
_F32_TENSORS = {ROUTER, T.FFN_GATE_INP_SHEXP}
# DeepSeek's per-expert selection bias (`exp_probs_b.bias`, [experts], F32 as every 1-D tensor).
EXPERT_BIAS = T.FFN_EXP_PROBS_B
# Multi-head latent attention (DeepSeek): queries through a low-rank bottleneck (q_a, its norm, q_b) or directly
# (attn_q); the shared latent + RoPE key (kv_a_mqa, its norm on the latent part); the per-head expansions stacked
# [heads, out, in] as llama.cpp stores them: attn_k_b maps a head's non-RoPE query into the latent space (the
# "absorbed" key, so the latent is all the cache holds), attn_v_b maps the head's attention output in the latent
# space to its value.
MLA_Q_LORA = (T.ATTN_Q_A, T.ATTN_Q_A_NORM, T.ATTN_Q_B)
MLA_KV = (T.ATTN_KV_A_MQA, T.ATTN_KV_A_NORM, T.ATTN_K_B, T.ATTN_V_B)
PER_HEAD = (T.ATTN_K_B, T.ATTN_V_B)
_BLOCK_TENSORS = {_base(t).split(".")[-1]: t for t in (
    *(lin.tensor for lin in BLOCK_LINEARS), T.ATTN_NORM, T.FFN_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM, ROUTER, *EXPERTS,
    *SHARED_EXPERT, EXPERT_BIAS, *MLA_Q_LORA, *MLA_KV)}


def block_tensor(tensor_name: str) -> gguf.MODEL_TENSOR | None:
    """`blk.3.ffn_up_exps.weight` -> T.FFN_UP_EXP; None for a tensor outside the blocks."""
    parts = tensor_name.split(".")
    return _BLOCK_TENSORS.get(parts[2]) if parts[0] == "blk" and len(parts) > 2 else None


def keeps_f32(tensor_name: str, shape: tuple[int, ...]) -> bool:
    """1-D tensors (norms, biases) and the routers stay F32 in every file."""
    return len(shape) == 1 or block_tensor(tensor_name) in _F32_TENSORS


def is_expert_stack(tensor_name: str) -> bool:
    """A routed experts' tensor ([experts, out, in])."""
    return block_tensor(tensor_name) in EXPERTS


def is_stack(tensor_name: str) -> bool:
    """A stack of matrices with inputs of their own ([n, out, in]): routed experts, or MLA's per-head k_b / v_b.
    Each slice is quantized with its own Hessian (`expert_input` hooks)."""
    return block_tensor(tensor_name) in (*EXPERTS, *PER_HEAD)


def shared_gate(spec: ModelSpec) -> bool:
    """The shared expert sits behind a sigmoid gate (Qwen2-MoE; DeepSeek's shared experts have none)."""
    return bool(spec.shared_ffn) and get_architecture(spec.arch).shared_expert


def shared_input_groups(layer: int, spec: ModelSpec | None = None) -> list[tuple[str, ...]]:
    """Weight names of block `layer` that read one input, in execution order: (q, k, v), (o), (gate, up), (down).

    A mixture-of-experts block (`spec.moe_layer`) has, after (q, k, v), (o): the shared expert's (gate, up), (down)
    if it has one, then the routed experts' (gate, up), (down), whose inputs (and Hessians) are per expert. The
    router is in no group: it is never quantized. Latent attention (`spec.mla`) replaces (q, k, v) with (q_a or q,
    kv_a_mqa), (q_b), (k_b), (v_b): k_b's and v_b's inputs are per head."""
    groups: dict[str, list[str]] = {}
    for lin in BLOCK_LINEARS:
        groups.setdefault(lin.input_group, []).append(name(lin.tensor, layer))
    out = [tuple(g) for g in groups.values()]
    if spec is None:
        return out
    if spec.mla:
        n = lambda t: name(t, layer)    # noqa: E731
        q = [(n(T.ATTN_Q_A), n(T.ATTN_KV_A_MQA)), (n(T.ATTN_Q_B),)] if spec.q_lora_rank else \
            [(n(T.ATTN_Q), n(T.ATTN_KV_A_MQA))]
        out = [*q, (n(T.ATTN_K_B),), (n(T.ATTN_V_B),), *out[1:]]
    if spec.moe_layer(layer):
        out = out[:-2]
        if spec.shared_ffn:
            out += [(name(T.FFN_GATE_SHEXP, layer), name(T.FFN_UP_SHEXP, layer)), (name(T.FFN_DOWN_SHEXP, layer),)]
        out += [(name(EXPERTS[0], layer), name(EXPERTS[1], layer)), (name(EXPERTS[2], layer),)]
    return out


def norm_feeds(spec: ModelSpec, layer: int) -> dict[gguf.MODEL_TENSOR, list[str]]:
    """The weights each RMSNorm of block `layer` feeds, which read the (normed) residual: norm fusion multiplies
    the gain into them and R1 rotates their inputs. Latent attention: q_a (or q) and kv_a_mqa; a MoE block: the
    router, the routed experts' gate/up, the shared expert's gate/up and its sigmoid gate."""
    n = lambda t: name(t, layer)    # noqa: E731
    if spec.mla:
        attn = [n(T.ATTN_Q_A) if spec.q_lora_rank else n(T.ATTN_Q), n(T.ATTN_KV_A_MQA)]
    else:
        attn = [n(T.ATTN_Q), n(T.ATTN_K), n(T.ATTN_V)]
    if spec.moe_layer(layer):
        ffn = [n(ROUTER), n(T.FFN_GATE_EXP), n(T.FFN_UP_EXP)]
        if spec.shared_ffn:
            ffn += [n(T.FFN_GATE_SHEXP), n(T.FFN_UP_SHEXP)] + ([n(T.FFN_GATE_INP_SHEXP)] if shared_gate(spec) else [])
    else:
        ffn = [n(T.FFN_GATE), n(T.FFN_UP)]
    return {T.ATTN_NORM: attn, T.FFN_NORM: ffn}


def residual_writers(spec: ModelSpec, layer: int) -> list[str]:
    """The weights of block `layer` whose outputs are added to the residual (R1 rotates their rows)."""
    if spec.moe_layer(layer):
        ffn = [name(T.FFN_DOWN_EXP, layer)] + ([name(T.FFN_DOWN_SHEXP, layer)] if spec.shared_ffn else [])
    else:
        ffn = [name(T.FFN_DOWN, layer)]
    return [name(T.ATTN_OUT, layer), *ffn]


def name(t: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """Role name of a tensor: `name(T.ATTN_Q, 3)` -> `blk.3.attn_q.weight`."""
    base = _base(t).format(bid=layer) if layer is not None else _base(t)
    return f"{base}.{suffix}"


def block_tensor_names(spec: ModelSpec, layer: int) -> list[str]:
    """Every tensor name block `layer` of a model with `spec` holds, in a stable order."""
    names = [name(T.ATTN_NORM, layer)]
    if spec.mla:
        names += [name(t, layer) for t in (*(MLA_Q_LORA if spec.q_lora_rank else (T.ATTN_Q,)), *MLA_KV)]
    else:
        for lin in BLOCK_LINEARS[:3]:
            names.append(name(lin.tensor, layer))
            if spec.qkv_bias:
                names.append(name(lin.tensor, layer, "bias"))
    if spec.qk_norm:
        names += [name(T.ATTN_Q_NORM, layer), name(T.ATTN_K_NORM, layer)]
    names.append(name(T.ATTN_OUT, layer))
    names.append(name(T.FFN_NORM, layer))
    if spec.moe_layer(layer):
        names.append(name(ROUTER, layer))
        if spec.expert_bias:
            names.append(name(EXPERT_BIAS, layer, "bias"))
        names += [name(t, layer) for t in EXPERTS]
        if spec.shared_ffn:
            names += [name(t, layer) for t in (SHARED_EXPERT if shared_gate(spec) else SHARED_EXPERT[1:])]
    else:
        names += [name(lin.tensor, layer) for lin in BLOCK_LINEARS[4:]]
    return names


def global_tensor_names(spec: ModelSpec) -> list[str]:
    names = [name(T.TOKEN_EMBD), name(T.OUTPUT_NORM)]
    if not spec.tied_embeddings:
        names.append(name(T.OUTPUT))
    return names


def all_tensor_names(spec: ModelSpec) -> list[str]:
    """All tensors of a model, embeddings first, then blocks in layer order, then the head."""
    glob = global_tensor_names(spec)
    out = [glob[0]]
    for i in range(spec.n_layers):
        out += block_tensor_names(spec, i)
    return out + glob[1:]


def expected_shape(spec: ModelSpec, tensor_name: str) -> tuple[int, ...]:
    """Shape (HF orientation: [out, in] for linears) a role must have; used to validate loaded files."""
    parts = tensor_name.split(".")
    base = parts[2] if parts[0] == "blk" else parts[0]
    is_bias = parts[-1] == "bias"
    h, f, q, kv = spec.hidden, spec.intermediate, spec.q_dim, spec.kv_dim
    e, ef, sf = spec.n_experts, spec.expert_ffn, spec.shared_ffn
    shapes = {
        "token_embd": (spec.vocab, h), "output": (spec.vocab, h), "output_norm": (h,),
        "attn_norm": (h,), "ffn_norm": (h,),
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, spec.attn_out_dim),
        "attn_q_norm": (spec.head_dim,), "attn_k_norm": (spec.head_dim,),
        "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
        "ffn_gate_inp": (e, h), "ffn_gate_exps": (e, ef, h), "ffn_up_exps": (e, ef, h), "ffn_down_exps": (e, h, ef),
        "ffn_gate_inp_shexp": (1, h), "ffn_gate_shexp": (sf, h), "ffn_up_shexp": (sf, h), "ffn_down_shexp": (h, sf),
        "exp_probs_b": (e,),
    }
    if spec.mla:
        ql, r, heads = spec.q_lora_rank, spec.kv_lora_rank, spec.n_heads
        shapes.update({
            "attn_q_a": (ql, h), "attn_q_a_norm": (ql,), "attn_q_b": (q, ql),
            "attn_kv_a_mqa": (r + spec.rope_dim, h), "attn_kv_a_norm": (r,),
            "attn_k_b": (heads, r, spec.nope_dim), "attn_v_b": (heads, spec.v_head_dim, r)})
    shape = shapes[base]
    return shape[:1] if is_bias else shape
