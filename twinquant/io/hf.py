"""Hugging Face directories: `config.json` + `*.safetensors` (single file or sharded with an index).

Tensors load lazily, one at a time (`safetensors.safe_open`), so a block can be materialised alone. Source names
map to roles through gguf-py's `TensorNameMap`; writing an HF directory (for `transformers` oracles and users who
want one) uses the canonical HF module names below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twinquant.errors import TwinquantError
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
}
_BASE_TO_TENSOR = {gguf.TENSOR_NAMES[t]: t for t in HF_NAMES}


def hf_name(role_name: str) -> str:
    """`blk.3.attn_q.bias` -> `model.layers.3.self_attn.q_proj.bias`."""
    parts = role_name.split(".")
    if parts[0] == "blk":
        t, bid = _BASE_TO_TENSOR["blk.{bid}." + parts[2]], int(parts[1])
    else:
        t, bid = _BASE_TO_TENSOR[parts[0]], None
    return HF_NAMES[t].format(bid=bid) + "." + parts[-1]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TwinquantError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TwinquantError(f"{path}: not valid JSON ({e})") from None


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise TwinquantError(f"RoPE scaling type {kind!r} is not supported yet (only default RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    arch = architecture_for_hf(cfg)
    if cfg.get("mlp_bias"):
        raise TwinquantError("config: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise TwinquantError("config: sliding-window attention is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise TwinquantError(f"config: activation {cfg.get('hidden_act')!r} is not supported (only silu)")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelSpec(
            arch=arch.name,
            n_layers=int(cfg["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(cfg["intermediate_size"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            rope_theta=_rope_theta(cfg),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", arch.qkv_bias)),
            qk_norm=arch.qk_norm,
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            name=str(cfg.get("_name_or_path", "")),
        )
    except KeyError as e:
        raise TwinquantError(f"config.json: missing required key {e.args[0]!r}") from None


class SafetensorsSource:
    """Lazy tensors of an HF directory, addressed by role name."""

    def __init__(self, path: Path, arch: Architecture, n_layers: int):
        self.path = str(path)
        self._handles: dict[Path, object] = {}
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise TwinquantError(f"{index}: no weight_map")
            files = {hf: path / f for hf, f in weight_map.items()}
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise TwinquantError(f"{path}: no *.safetensors files")
            files = {}
            for shard in shards:
                for hf in self._open(shard).keys():
                    files[hf] = shard
        names = gguf.TensorNameMap(arch.gguf_arch, n_layers)
        self._where: dict[str, tuple[Path, str]] = {}
        for hf, shard in files.items():
            role = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if role is None:
                if hf.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from rope_theta
                raise TwinquantError(f"{path}: tensor {hf!r} has no role in the {arch.name} architecture")
            self._where[role] = (shard, hf)

    def _open(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            try:
                h = safe_open(str(shard), framework="pt")
            except FileNotFoundError:
                raise TwinquantError(f"{shard}: not found (listed in the index)") from None
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise TwinquantError(f"{shard}: not a valid safetensors file ({e})") from None
            self._handles[shard] = h
        return h

    def release(self) -> None:
        """Close the shards (unmapping them): their touched pages leave the resident set."""
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        shard, hf = self._lookup(name)
        sl = self._open(shard).get_slice(hf)
        shape = tuple(sl.get_shape())
        dtype = sl.get_dtype()
        size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}.get(dtype, 4)
        n = 1
        for d in shape:
            n *= d
        return TensorInfo(name, shape, dtype, n * size)

    def _lookup(self, name: str) -> tuple[Path, str]:
        try:
            return self._where[name]
        except KeyError:
            raise TwinquantError(f"{self.path}: missing tensor for role {name}") from None

    def load(self, name: str) -> torch.Tensor:
        shard, hf = self._lookup(name)
        try:
            t = self._open(shard).get_tensor(hf)
        except Exception as e:
            raise TwinquantError(f"{shard}: cannot read tensor {hf!r} ({e})") from None
        return t.float()


def load_hf_dir(path: str | os.PathLike, load_tokenizer: bool = True) -> Model:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    spec = spec_from_hf_config(cfg)
    arch = get_architecture(spec.arch)
    source = SafetensorsSource(path, arch, spec.n_layers)
    if not spec.tied_embeddings and not source.has(roles.name(T.OUTPUT)):
        raise TwinquantError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    for n in roles.all_tensor_names(spec):
        source._lookup(n)  # fail now, not half-way through a forward
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
        "rms_norm_eps": spec.rms_eps,
        "tie_word_embeddings": spec.tied_embeddings,
        "max_position_embeddings": spec.context_length,
        "hidden_act": "silu",
    }
    if arch.name != "qwen2":  # Qwen2 always has q/k/v biases; llama/qwen3 say so with attention_bias
        cfg["attention_bias"] = spec.qkv_bias
    return cfg


def hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    return {hf_name(n): model.get(n) for n in model.tensor_names()}


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
