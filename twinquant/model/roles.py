"""Tensor roles and the facts rotation and GPTQ need about them.

A role is named exactly as llama.cpp names the tensor (gguf-py's `TENSOR_NAMES` templates, e.g.
`blk.{bid}.attn_q` + `.weight`), so GGUF needs no renaming and only the Hugging Face loader maps names.

Spaces: `residual` (hidden), `head` (per-head q/k/v space), `ffn` (intermediate), `vocab`.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

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

# Which linears each RMSNorm feeds (norm fusion multiplies the norm weight into these).
NORM_FEEDS: dict[gguf.MODEL_TENSOR, tuple[gguf.MODEL_TENSOR, ...]] = {
    T.ATTN_NORM: (T.ATTN_Q, T.ATTN_K, T.ATTN_V),
    T.FFN_NORM: (T.FFN_GATE, T.FFN_UP),
    T.OUTPUT_NORM: (T.OUTPUT,),
}


def shared_input_groups(layer: int) -> list[tuple[str, ...]]:
    """Weight names of block `layer` that read one input, in execution order: (q, k, v), (o), (gate, up), (down)."""
    groups: dict[str, list[str]] = {}
    for lin in BLOCK_LINEARS:
        groups.setdefault(lin.input_group, []).append(name(lin.tensor, layer))
    return [tuple(g) for g in groups.values()]


def name(t: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """Role name of a tensor: `name(T.ATTN_Q, 3)` -> `blk.3.attn_q.weight`."""
    base = _base(t).format(bid=layer) if layer is not None else _base(t)
    return f"{base}.{suffix}"


def block_tensor_names(spec: ModelSpec, layer: int) -> list[str]:
    """Every tensor name block `layer` of a model with `spec` holds, in a stable order."""
    names = [name(T.ATTN_NORM, layer)]
    for lin in BLOCK_LINEARS[:3]:
        names.append(name(lin.tensor, layer))
        if spec.qkv_bias:
            names.append(name(lin.tensor, layer, "bias"))
    if spec.qk_norm:
        names += [name(T.ATTN_Q_NORM, layer), name(T.ATTN_K_NORM, layer)]
    names.append(name(T.ATTN_OUT, layer))
    names.append(name(T.FFN_NORM, layer))
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
    shapes = {
        "token_embd": (spec.vocab, h), "output": (spec.vocab, h), "output_norm": (h,),
        "attn_norm": (h,), "ffn_norm": (h,),
        "attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
        "attn_q_norm": (spec.head_dim,), "attn_k_norm": (spec.head_dim,),
        "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f),
    }
    shape = shapes[base]
    return shape[:1] if is_bias else shape
