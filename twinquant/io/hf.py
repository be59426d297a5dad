"""Hugging Face directories: `config.json` + `*.safetensors` (single file or sharded with an index).

Tensors load lazily, one at a time (`safetensors.safe_open`), so a block can be materialised alone. Source names
map to roles through gguf-py's `TensorNameMap`; writing an HF directory (for `transformers` oracles and users who
want one) uses the canonical HF module names below.
"""

from __future__ import annotations

import json
import math
import os
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


def _rope_theta(cfg: dict) -> float:
    params = _get(cfg, "rope_parameters", dict, {})
    scaling = _get(cfg, "rope_scaling", dict, {})
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise TwinquantError(f"RoPE scaling type {str(kind)[:40]!r} is not supported yet (only default RoPE)")
    theta = _get(params, "rope_theta", float, None)
    return theta if theta is not None else _get(cfg, "rope_theta", float, 10000.0)


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
    rope_theta, rms_eps = _rope_theta(cfg), _get(cfg, "rms_norm_eps", float, 1e-6)
    for key, v in (("rope_theta", rope_theta), ("rms_norm_eps", rms_eps)):
        if v <= 0:
            raise TwinquantError(f"config.json: {key} is {v}, must be positive")
    return ModelSpec(
        arch=arch.name,
        n_layers=_get(cfg, "num_hidden_layers", int),
        hidden=hidden,
        intermediate=_get(cfg, "intermediate_size", int),
        n_heads=heads,
        n_kv_heads=_get(cfg, "num_key_value_heads", int, 0) or heads,
        head_dim=_get(cfg, "head_dim", int, 0) or (hidden // heads if heads > 0 else 0),
        vocab=_get(cfg, "vocab_size", int),
        rope_theta=rope_theta,
        rms_eps=rms_eps,
        tied_embeddings=_get(cfg, "tie_word_embeddings", bool, False),
        qkv_bias=_get(cfg, "attention_bias", bool, arch.qkv_bias),
        qk_norm=arch.qk_norm,
        context_length=_get(cfg, "max_position_embeddings", int, 4096),
        name=str(cfg.get("_name_or_path", ""))[:200],
    )


class SafetensorsSource:
    """Lazy tensors of an HF directory, addressed by role name."""

    def __init__(self, path: Path, arch: Architecture, n_layers: int):
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
                raise TwinquantError(f"{shard}: not a valid safetensors file ({one_line(e)})") from None
            self._handles[shard] = h
        return h

    def release(self) -> None:
        """Close the shards (unmapping them): their touched pages leave the resident set."""
        self._handles.clear()

    def has(self, name: str) -> bool:
        return name in self._where

    def info(self, name: str) -> TensorInfo:
        shard, hf = self._lookup(name)
        try:
            sl = self._open(shard).get_slice(hf)
            shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        except TwinquantError:
            raise
        except Exception as e:  # safetensors' own error types: a name the index lists but the shard lacks
            raise TwinquantError(f"{shard}: cannot read tensor {hf!r} ({one_line(e)})") from None
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
        except TwinquantError:
            raise
        except Exception as e:
            raise TwinquantError(f"{shard}: cannot read tensor {hf!r} ({one_line(e)})") from None
        return t.float()


def load_hf_dir(path: str | os.PathLike, load_tokenizer: bool = True) -> Model:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    spec = spec_from_hf_config(cfg)
    arch = get_architecture(spec.arch)
    source = SafetensorsSource(path, arch, spec.n_layers)
    if not spec.tied_embeddings and not source.has(roles.name(T.OUTPUT)):
        raise TwinquantError(f"{path}: tie_word_embeddings is false but there is no lm_head.weight")
    for n in roles.all_tensor_names(spec):  # fail now, not half-way through a forward
        shape, want = source.info(n).shape, roles.expected_shape(spec, n)
        if shape != want:
            raise TwinquantError(f"{path}: tensor {source._lookup(n)[1]} has shape {shape}, config.json says {want}")
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
