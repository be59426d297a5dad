"""`ModelSpec`: the architecture family and dimensions of a decoder model, apart from its tensors.

Built from data (a Hugging Face `config.json` or GGUF metadata) by typed reads that fail on a missing or
unsupported value; never guessed from a name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    arch: str                 # architecture record name: "llama", "qwen2", "qwen3"
    n_layers: int
    hidden: int               # residual width
    intermediate: int         # FFN width
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool     # output head reads token_embd (no separate output.weight)
    qkv_bias: bool            # q/k/v projections carry biases (Qwen2)
    qk_norm: bool             # per-head RMSNorm on q and k before RoPE (Qwen3)
    context_length: int = 4096
    name: str = ""

    def __post_init__(self) -> None:
        from twinquant.errors import TwinquantError

        for f in ("n_layers", "hidden", "intermediate", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            if getattr(self, f) <= 0:
                raise TwinquantError(f"model spec: {f} must be positive, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise TwinquantError(f"model spec: {self.n_heads} heads not divisible by {self.n_kv_heads} kv heads")
        if self.head_dim % 2:
            raise TwinquantError(f"model spec: head_dim {self.head_dim} must be even for RoPE")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
