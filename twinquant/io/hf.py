"""Hugging Face directories: `config.json` + `*.safetensors` (single file or sharded with an index).

Tensors load lazily, one at a time (`safetensors.safe_open`), so a block can be materialised alone. Source names
map to roles through gguf-py's `TensorNameMap`; writing an HF directory (for `transformers` oracles and users who
want one) uses the canonical HF module names below.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twinquant.errors import TwinquantError, one_line
from twinquant.model import roles
from twinquant.model.architectures import Architecture, architecture_for_hf, get_architecture
from twinquant.model.model import Model, TensorInfo
from twinquant.model.spec import ModelSpec

T = gguf.MODEL_TENSOR

# Canonical HF module name per role (llama / qwen2 / qwen3 share these); used when writing a directory.
HF_NAMES: dict[gguf.MODEL_TENSOR, str] = {
    T.TOKEN_EMBD: "model.embed_tokens",
    T.OUTPUT_NORM: "model.norm",
    T.OUTPUT: "lm_head",
    T.ATTN_NORM: "model.layers.{bid}.input_layernorm",
    T.ATTN_Q: "model.layers.{bid}.self_attn.q_proj",
    T.ATTN_K: "model.layers.{bid}.self_attn.k_proj",
    T.ATTN_V: "model.layers.{bid}.self_attn.v_proj",
    T.ATTN_OUT: "model.layers.{bid}.self_attn.o_proj",
    T.ATTN_Q_NORM: "model.layers.{bid}.self_attn.q_norm",
    T.ATTN_K_NORM: "model.layers.{bid}.self_attn.k_norm",
    T.FFN_NORM: "model.layers.{bid}.post_attention_layernorm",
    T.FFN_GATE: "model.layers.{bid}.mlp.gate_proj",
    T.FFN_UP: "model.layers.{bid}.mlp.up_proj",
    T.FFN_DOWN: "model.layers.{bid}.mlp.down_proj",
    T.FFN_GATE_INP: "model.layers.{bid}.mlp.gate",
    T.FFN_GATE_EXP: "model.layers.{bid}.mlp.experts.{xid}.gate_proj",     # written one expert at a time
    T.FFN_UP_EXP: "model.layers.{bid}.mlp.experts.{xid}.up_proj",
    T.FFN_DOWN_EXP: "model.layers.{bid}.mlp.experts.{xid}.down_proj",
    T.FFN_GATE_INP_SHEXP: "model.layers.{bid}.mlp.shared_expert_gate",
    T.FFN_GATE_SHEXP: "model.layers.{bid}.mlp.shared_expert.gate_proj",
    T.FFN_UP_SHEXP: "model.layers.{bid}.mlp.shared_expert.up_proj",
    T.FFN_DOWN_SHEXP: "model.layers.{bid}.mlp.shared_expert.down_proj",
    # DeepSeek: latent attention, the selection bias (a bare parameter), kv_b_proj (our attn_k_b + attn_v_b)
    T.ATTN_Q_A: "model.layers.{bid}.self_attn.q_a_proj",
    T.ATTN_Q_A_NORM: "model.layers.{bid}.self_attn.q_a_layernorm",
    T.ATTN_Q_B: "model.layers.{bid}.self_attn.q_b_proj",
    T.ATTN_KV_A_MQA: "model.layers.{bid}.self_attn.kv_a_proj_with_mqa",
    T.ATTN_KV_A_NORM: "model.layers.{bid}.self_attn.kv_a_layernorm",
    T.ATTN_KV_B: "model.layers.{bid}.self_attn.kv_b_proj",
    T.FFN_EXP_PROBS_B: "model.layers.{bid}.mlp.gate.e_score_correction",
}
# DeepSeek names its shared experts in the plural
_HF_NAMES_MLA = {t: HF_NAMES[t].replace("shared_expert.", "shared_experts.") for t in roles.SHARED_EXPERT[1:]}
_BASE_TO_TENSOR = {gguf.TENSOR_NAMES[t]: t for t in HF_NAMES}


def hf_name(role_name: str, expert: int | None = None, spec: ModelSpec | None = None) -> str:
    """`blk.3.attn_q.bias` -> `model.layers.3.self_attn.q_proj.bias`; a stacked expert tensor names one expert's."""
    parts = role_name.split(".")
    if parts[0] == "blk":
        t, bid = _BASE_TO_TENSOR["blk.{bid}." + parts[2]], int(parts[1])
    else:
        t, bid = _BASE_TO_TENSOR[parts[0]], None
    names = {**HF_NAMES, **_HF_NAMES_MLA} if spec is not None and spec.mla else HF_NAMES
    return names[t].format(bid=bid, xid=expert) + ("_" if t == T.FFN_EXP_PROBS_B else ".") + parts[-1]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TwinquantError(f"{path}: not found") from None
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
        raise TwinquantError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None



def _get(cfg: dict, key: str, kind: type, default=...):
    """config.json's `key` as `kind` (int, float, bool, str, dict, list); absent or null: `default` (required
    without one). An int is a float too; a bool is no int; a float must be finite."""
    v = cfg.get(key)
    if v is None:
        if default is ...:
            raise TwinquantError(f"config.json: missing required key {key!r}")
        return default
    ok = (int, float) if kind is float else (kind,)
    if not isinstance(v, ok) or (kind in (int, float) and isinstance(v, bool)) or \
            (kind is float and not math.isfinite(v)):
        raise TwinquantError(f"config.json: {key} is {str(v)[:40]!r}, expected {kind.__name__}")
    return float(v) if kind is float else v


def _rope(cfg: dict) -> dict:
    """ModelSpec's RoPE fields: rope_theta, and YaRN's (transformers 5's rope_parameters or the older
    rope_scaling; default RoPE or YaRN only)."""
    params = _get(cfg, "rope_parameters", dict, {})
    scaling = _get(cfg, "rope_scaling", dict, {})
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in ("default", "yarn"):
        raise TwinquantError(f"RoPE scaling type {str(kind)[:40]!r} is not supported yet (default RoPE or YaRN)")
    theta = _get(params, "rope_theta", float, None)
    out = {"rope_theta": theta if theta is not None else _get(cfg, "rope_theta", float, 10000.0)}
    if kind == "yarn":
        y = {**scaling, **params}
        if y.get("attention_factor") is not None or y.get("truncate", True) is not True:
            raise TwinquantError("config: YaRN with an explicit attention_factor or truncate=false is not supported")
        orig = _get(y, "original_max_position_embeddings", int)
        out.update(yarn_factor=_get(y, "factor", float, None) or _get(cfg, "max_position_embeddings", int) / orig,
                   yarn_orig_ctx=orig, yarn_beta_fast=_get(y, "beta_fast", float, None) or 32.0,
                   yarn_beta_slow=_get(y, "beta_slow", float, None) or 1.0,
                   yarn_mscale=_get(y, "mscale", float, 0.0), yarn_mscale_all_dim=_get(y, "mscale_all_dim", float, 0.0))
    return out


def _experts(cfg: dict, arch: Architecture) -> dict:
    """ModelSpec's expert fields from a MoE family's config (Qwen2-MoE / Qwen3-MoE key names)."""
    if not arch.moe:
        return {}
    mlp_only = _get(cfg, "mlp_only_layers", list, [])
    if mlp_only or _get(cfg, "decoder_sparse_step", int, 1) != 1:
        raise TwinquantError("config: dense FFN layers between MoE layers (mlp_only_layers / decoder_sparse_step) "
                             "are not supported (llama.cpp's graph for this family has none either)")
    n_experts = _get(cfg, "num_experts", int, None)       # transformers 5 writes num_local_experts for Qwen3-MoE
    out = dict(n_experts=n_experts if n_experts is not None else _get(cfg, "num_local_experts", int),
               n_experts_used=_get(cfg, "num_experts_per_tok", int),
               expert_ffn=_get(cfg, "moe_intermediate_size", int), norm_topk=_get(cfg, "norm_topk_prob", bool, False))
    if arch.shared_expert:
        out["shared_ffn"] = _get(cfg, "shared_expert_intermediate_size", int)
    return out


def _deepseek(cfg: dict) -> dict:
    """ModelSpec's latent-attention and routing fields from a DeepSeek-V2 / V3 config (the original checkpoints'
    keys, which transformers keeps)."""
    v3 = "DeepseekV3ForCausalLM" in _get(cfg, "architectures", list, []) or cfg.get("model_type") == "deepseek_v3"
    n_experts = _get(cfg, "n_routed_experts", int, None)
    if not n_experts:
        raise TwinquantError("config: a DeepSeek model without routed experts (n_routed_experts) is not supported")
    if not _get(cfg, "rope_interleave", bool, True):
        raise TwinquantError("config: rope_interleave=false is not supported (llama.cpp's DeepSeek graph rotates "
                             "interleaved pairs)")
    gating = _get(cfg, "scoring_func", str, "sigmoid" if v3 else "softmax")
    method = _get(cfg, "topk_method", str, "noaux_tc" if v3 else "greedy")
    known = {"noaux_tc"} if v3 else {"greedy", "group_limited_greedy"}
    if gating not in ("softmax", "sigmoid") or method not in known:
        raise TwinquantError(f"config: expert routing {gating!r} / {method!r} is not supported "
                             f"(DeepSeek-{'V3: sigmoid / noaux_tc' if v3 else 'V2: softmax / greedy or group_limited_greedy'})")
    groups = _get(cfg, "n_group", int, 1) if method != "greedy" else 1
    ffn, nope, rope = _get(cfg, "moe_intermediate_size", int), _get(cfg, "qk_nope_head_dim", int), \
        _get(cfg, "qk_rope_head_dim", int)
    return dict(
        n_experts=n_experts, n_experts_used=_get(cfg, "num_experts_per_tok", int), expert_ffn=ffn,
        shared_ffn=_get(cfg, "n_shared_experts", int, 0) * ffn, norm_topk=_get(cfg, "norm_topk_prob", bool, v3),
        gating=gating, expert_bias=v3, n_groups=groups,
        groups_used=_get(cfg, "topk_group", int, groups) if groups > 1 else 1,
        group_score="max" if groups > 1 and not v3 else "sum_top2", expert_scale=_get(cfg, "routed_scaling_factor", float, 1.0),
        n_dense_lead=_get(cfg, "first_k_dense_replace", int, 0),
        q_lora_rank=_get(cfg, "q_lora_rank", int, 0), kv_lora_rank=_get(cfg, "kv_lora_rank", int),
        rope_dim=rope, v_head_dim=_get(cfg, "v_head_dim", int), head_dim=nope + rope,
        n_kv_heads=_get(cfg, "num_attention_heads", int))


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    if not isinstance(cfg, dict):
        raise TwinquantError("config.json: not a JSON object")
    names = _get(cfg, "architectures", list, [])
    if not all(isinstance(n, str) for n in names) or not isinstance(cfg.get("model_type") or "", str):
        raise TwinquantError("config.json: architectures must be a list of strings and model_type a string")
    arch = architecture_for_hf(cfg)
    if cfg.get("mlp_bias"):
        raise TwinquantError("config: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise TwinquantError("config: sliding-window attention is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise TwinquantError(f"config: activation {str(cfg.get('hidden_act'))[:40]!r} is not supported (only silu)")
    hidden, heads = _get(cfg, "hidden_size", int), _get(cfg, "num_attention_heads", int)
    rope, rms_eps = _rope(cfg), _get(cfg, "rms_norm_eps", float, 1e-6)
    for key, v in (("rope_theta", rope["rope_theta"]), ("rms_norm_eps", rms_eps)):
        if v <= 0:
            raise TwinquantError(f"config.json: {key} is {v}, must be positive")
    fields = dict(n_kv_heads=_get(cfg, "num_key_value_heads", int, 0) or heads,
                  head_dim=_get(cfg, "head_dim", int, 0) or (hidden // heads if heads > 0 else 0))
    fields.update(_deepseek(cfg) if arch.mla else _experts(cfg, arch))
    fields.update(rope)
    return ModelSpec(
        arch=arch.name,
        **fields,
        n_layers=_get(cfg, "num_hidden_layers", int),
        hidden=hidden,
        intermediate=_get(cfg, "intermediate_size", int),
        n_heads=heads,
        vocab=_get(cfg, "vocab_size", int),
        rms_eps=rms_eps,
        tied_embeddings=_get(cfg, "tie_word_embeddings", bool, False),
        qkv_bias=_get(cfg, "attention_bias", bool, arch.qkv_bias),
        qk_norm=arch.qk_norm,
        context_length=_get(cfg, "max_position_embeddings", int, 4096),
        name=str(cfg.get("_name_or_path", ""))[:200],
    )


# A checkpoint's per-expert linears (`model.layers.3.mlp.experts.7.gate_proj.weight`) and transformers 5's fused
# gate/up of all experts (`model.layers.3.mlp.experts.gate_up_proj`).
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
_FUSED_GATE_UP = re.compile(r"^model\.layers\.(?P<bid>\d+)\.mlp\.experts\.gate_up_proj$")
_LAYER = re.compile(r"^model\.layers\.(?P<bid>\d+)\.")
_EXPERT_BIAS = re.compile(r"^model\.layers\.(?P<bid>\d+)\.mlp\.gate\.e_score_correction_bias$")


@dataclass(frozen=True)
class _Stored:
    """Where a role's tensor is: one (shard, name); one per expert, stacked in expert order; or one half (0: gate,
    1: up) of a fused gate_up tensor along its rows."""

    parts: tuple[tuple[Path, str], ...]
    stacked: bool = False
    half: int | None = None
    # DeepSeek's kv_b_proj [heads * (nope + v), latent] as llama.cpp splits it: 0: attn_k_b [heads, latent, nope]
    # (each head's key rows, transposed), 1: attn_v_b [heads, v, latent]; with (heads, nope, v)
    kv_b: tuple[int, int, int, int] | None = None


class SafetensorsSource:
    """Lazy tensors of an HF directory, addressed by role name."""

    def __init__(self, path: Path, arch: Architecture, spec: ModelSpec):
        n_layers = spec.n_layers
        self.path = str(path)
        self._handles: dict[Path, object] = {}
        index = path / "model.safetensors.index.json"
        if index.exists():
            doc = _read_json(index)
            weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(weight_map, dict):
                raise TwinquantError(f"{index}: no weight_map")
            if not all(isinstance(f, str) and f and f.isprintable() for f in weight_map.values()):
                raise TwinquantError(f"{index}: weight_map values must be file names")
            files = {hf: path / f for hf, f in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise TwinquantError(f"{path}: no *.safetensors files")
            files = {}
            for shard in shards:
                for hf in self._open(shard).keys():
                    files[hf] = shard
        if n_layers > len(files):      # before TensorNameMap builds names for n_layers blocks
            raise TwinquantError(f"{path}: num_hidden_layers is {n_layers}, but there are {len(files)} tensors")
        names = gguf.TensorNameMap(arch.gguf_arch, n_layers)
        self._where: dict[str, _Stored] = {}
        experts: dict[str, dict[int, tuple[Path, str]]] = {}
        for hf, shard in files.items():
            m = _LAYER.match(hf) if arch.mla else None
            if m and int(m["bid"]) >= n_layers:
                continue    # DeepSeek-V3's multi-token-prediction layer: not part of the model (as in llama.cpp)
            m = _EXPERT_BIAS.match(hf) if arch.mla else None
            if m:
                self._where[roles.name(roles.EXPERT_BIAS, int(m["bid"]), "bias")] = _Stored(((shard, hf),))
                continue
            m = _PER_EXPERT.match(hf) if arch.moe else None
            if m:       # one expert's linear: stacked with the others of its tensor (llama.cpp's layout)
                role = names.get_name(f"{m['prefix']}.{m['proj']}.weight", try_suffixes=(".weight",))
                if role is not None:
                    experts.setdefault(role, {})[int(m["expert"])] = (shard, hf)
                    continue
            m = _FUSED_GATE_UP.match(hf) if arch.moe else None
            if m:       # transformers 5's fused [experts, 2 * ffn, hidden] gate_up: gate rows first
                for half, t in enumerate(roles.EXPERTS[:2]):
                    self._where[roles.name(t, int(m["bid"]))] = _Stored(((shard, hf),), half=half)
                continue
            role = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if role is None:
                if hf.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from rope_theta
                raise TwinquantError(f"{path}: tensor {hf!r} has no role in the {arch.name} architecture")
            if not role.endswith((".weight", ".bias")):     # a bare parameter (transformers 5's fused down_proj)
                role += ".weight"
            if spec.mla and role.startswith("blk.") and role.split(".")[2] == "attn_kv_b":
                split = (spec.n_heads, spec.nope_dim, spec.v_head_dim)
                for part, t in enumerate(roles.PER_HEAD):
                    self._where[roles.name(t, int(role.split(".")[1]))] = _Stored(((shard, hf),), kv_b=(part, *split))
                continue
            self._where[role] = _Stored(((shard, hf),))
        for role, by_expert in experts.items():
            if sorted(by_expert) != list(range(len(by_expert))):
                missing = sorted(set(range(max(by_expert) + 1)) - set(by_expert))
                raise TwinquantError(f"{path}: {role}: no tensor for expert(s) {missing[:5]}")
            self._where[role] = _Stored(tuple(by_expert[e] for e in range(len(by_expert))), stacked=True)

    def _open(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(shard), framework="pt")
            except FileNotFoundError:
                raise TwinquantError(f"{shard}: not found (listed in the index)") from None
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise TwinquantError(f"{shard}: not a valid safetensors file ({one_line(e)})") from None
            self._handles[shard] = h
        return h

    def release(self) -> None:
        """Close the shards (unmapping them): their touched pages leave the resident set."""
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice_info(self, shard: Path, hf: str) -> tuple[tuple[int, ...], str]:
        try:
            sl = self._open(shard).get_slice(hf)
            return tuple(sl.get_shape()), sl.get_dtype()
        except TwinquantError:
            raise
        except Exception as e:  # safetensors' own error types: a name the index lists but the shard lacks
            raise TwinquantError(f"{shard}: cannot read tensor {hf!r} ({one_line(e)})") from None

    def info(self, name: str) -> TensorInfo:
        st = self._lookup(name)
        shape, dtype = self._slice_info(*st.parts[0])
        for part in st.parts[1:]:
            other = self._slice_info(*part)[0]
            if other != shape:
                raise TwinquantError(f"{self.path}: {part[1]} has shape {other}, {st.parts[0][1]} has {shape}")
        if st.stacked:
            shape = (len(st.parts), *shape)
        if st.half is not None:
            shape = (shape[0], shape[1] // 2, *shape[2:])
        if st.kv_b is not None:
            part, heads, nope, v = st.kv_b
            if len(shape) != 2 or shape[0] != heads * (nope + v):
                raise TwinquantError(f"{self.path}: {st.parts[0][1]} has shape {shape}, the config says "
                                     f"[{heads * (nope + v)}, kv_lora_rank]")
            shape = (heads, shape[1], nope) if part == 0 else (heads, v, shape[1])
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name, shape, dtype, n * size)

    def _lookup(self, name: str) -> "_Stored":
        try:
            return self._where[name]
        except KeyError:
            raise TwinquantError(f"{self.path}: missing tensor for role {name}") from None

    def _tensor(self, shard: Path, hf: str) -> torch.Tensor:
        try:
            return self._open(shard).get_tensor(hf).float()
        except TwinquantError:
            raise
        except Exception as e:
            raise TwinquantError(f"{shard}: cannot read tensor {hf!r} ({one_line(e)})") from None

    def load_expert(self, name: str, expert: int) -> torch.Tensor:
        """One expert's [out, in] of a stacked tensor, without reading the others (a DeepSeek-V3 stack is 15 GB in
        float32): its own tensor, or its slice of a fused one."""
        st = self._lookup(name)
        if st.stacked:
            return self._tensor(*st.parts[expert])
        shard, hf = st.parts[0]
        try:
            t = self._open(shard).get_slice(hf)[expert].float()
        except TwinquantError:
            raise
        except Exception as e:
            raise TwinquantError(f"{shard}: cannot read expert {expert} of {hf!r} ({one_line(e)})") from None
        return t if st.half is None else t.chunk(2, dim=0)[st.half].contiguous()

    def load(self, name: str) -> torch.Tensor:
        st = self._lookup(name)
        if st.stacked:
            return torch.stack([self._tensor(*part) for part in st.parts])
        t = self._tensor(*st.parts[0])
        if st.kv_b is not None:
            part, heads, nope, v = st.kv_b
            k, val = t.reshape(heads, nope + v, -1).split([nope, v], dim=1)
            return (k.transpose(1, 2) if part == 0 else val).contiguous()
        return t if st.half is None else t.chunk(2, dim=1)[st.half].contiguous()


def load_hf_dir(path: str | os.PathLike, load_tokenizer: bool = True) -> Model:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    spec = spec_from_hf_config(cfg)
    arch = get_architecture(spec.arch)
    source = SafetensorsSource(path, arch, spec)
    if not spec.tied_embeddings and not source.has(roles.name(T.OUTPUT)):
        raise TwinquantError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    for n in roles.all_tensor_names(spec):  # fail now, not half-way through a forward
        shape, want = source.info(n).shape, roles.expected_shape(spec, n)
        if shape != want:
            raise TwinquantError(f"{path}: tensor {source._lookup(n).parts[0][1]} has shape {shape}, "
                                 f"config.json says {want}")
    tokenizer = None
    if load_tokenizer and (path / "tokenizer.json").exists():
        from twinquant.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(path)
    return Model(spec=spec, source=source, tokenizer=tokenizer)


def hf_config(spec: ModelSpec) -> dict:
    """A `config.json` dict for `spec` that `transformers` loads."""
    arch = get_architecture(spec.arch)
    cfg = {
        "architectures": [arch.hf_architectures[0]],
        "model_type": arch.hf_model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.n_layers,
        "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "rope_theta": spec.rope_theta,
        **({"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": spec.yarn_factor,
                             "original_max_position_embeddings": spec.yarn_orig_ctx,
                             "beta_fast": spec.yarn_beta_fast, "beta_slow": spec.yarn_beta_slow,
                             **({"mscale": spec.yarn_mscale} if spec.yarn_mscale else {}),
                             **({"mscale_all_dim": spec.yarn_mscale_all_dim} if spec.yarn_mscale_all_dim else {})}}
           if spec.yarn_factor else {}),
        "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tied_embeddings,
        "max_position_embeddings": spec.context_length,
        "hidden_act": "silu",
    }
    if arch.name not in ("qwen2", "qwen2moe"):  # Qwen2 always has q/k/v biases; the others say so
        cfg["attention_bias"] = spec.qkv_bias
    if arch.mla:
        v3 = spec.gating == "sigmoid"
        cfg.update(architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
                   model_type="deepseek_v3" if v3 else "deepseek_v2", head_dim=spec.rope_dim,
                   n_routed_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_used,
                   moe_intermediate_size=spec.expert_ffn, n_shared_experts=spec.shared_ffn // spec.expert_ffn,
                   norm_topk_prob=spec.norm_topk, routed_scaling_factor=spec.expert_scale,
                   scoring_func=spec.gating, n_group=spec.n_groups, topk_group=spec.groups_used,
                   topk_method="noaux_tc" if v3 else ("group_limited_greedy" if spec.n_groups > 1 else "greedy"),
                   first_k_dense_replace=spec.n_dense_lead, q_lora_rank=spec.q_lora_rank or None,
                   kv_lora_rank=spec.kv_lora_rank, qk_nope_head_dim=spec.nope_dim, qk_rope_head_dim=spec.rope_dim,
                   v_head_dim=spec.v_head_dim, rope_interleave=True)
    elif spec.moe:
        cfg.update(num_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_used,
                   moe_intermediate_size=spec.expert_ffn, norm_topk_prob=spec.norm_topk, decoder_sparse_step=1,
                   mlp_only_layers=[])
        if arch.shared_expert:
            cfg["shared_expert_intermediate_size"] = spec.shared_ffn
    return cfg


def hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """HF names -> tensors; stacked expert tensors as one tensor per expert (how checkpoints ship them)."""
    out, s = {}, model.spec
    for n in model.tensor_names():
        t = model.get(n)
        if roles.is_expert_stack(n):
            out.update({hf_name(n, e, s): t[e].clone() for e in range(t.shape[0])})
        elif roles.block_tensor(n) == T.ATTN_K_B:      # with attn_v_b, back into one kv_b_proj
            v = model.get(n.replace("attn_k_b", "attn_v_b"))
            kv_b = n.replace("attn_k_b", "attn_kv_b")
            out[hf_name(kv_b, None, s)] = torch.cat((t.transpose(1, 2), v), dim=1).reshape(-1, s.kv_lora_rank)
        elif roles.block_tensor(n) != T.ATTN_V_B:
            out[hf_name(n, None, s)] = t
    return out


def save_hf_dir(model: Model, path: str | os.PathLike) -> None:
    """Write config.json + model.safetensors (atomically: temp names, then rename)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in hf_state_dict(model).items()}
    tmp = path / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    cfg_tmp = path / "config.json.tmp"
    cfg_tmp.write_text(json.dumps(hf_config(model.spec), indent=2))
    os.replace(tmp, path / "model.safetensors")
    os.replace(cfg_tmp, path / "config.json")
