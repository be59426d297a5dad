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
    # Mixture of experts (0 experts: a dense FFN in every block). Every block of a MoE model routes each token to
    # `n_experts_used` of `n_experts` experts of width `expert_ffn` (stacked [experts, out, in] tensors), plus a
    # shared expert of width `shared_ffn` (0: none) behind a sigmoid gate; `norm_topk`: the chosen experts'
    # softmax weights are renormalized to sum to 1.
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    norm_topk: bool = False

    def __post_init__(self) -> None:
        from twinquant.errors import TwinquantError

        for f in ("n_layers", "hidden", "intermediate", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            if getattr(self, f) <= 0:
                raise TwinquantError(f"model spec: {f} must be positive, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise TwinquantError(f"model spec: {self.n_heads} heads not divisible by {self.n_kv_heads} kv heads")
        if self.head_dim % 2:
            raise TwinquantError(f"model spec: head_dim {self.head_dim} must be even for RoPE")
        if self.n_experts < 0 or self.shared_ffn < 0:
            raise TwinquantError("model spec: expert counts and widths cannot be negative")
        if self.n_experts and not (0 < self.n_experts_used <= self.n_experts and self.expert_ffn > 0):
            raise TwinquantError(f"model spec: {self.n_experts} experts need 1..{self.n_experts} experts per token "
                                 f"(got {self.n_experts_used}) and a positive expert width (got {self.expert_ffn})")
        if not self.n_experts and (self.n_experts_used or self.expert_ffn or self.shared_ffn):
            raise TwinquantError("model spec: expert settings without experts")

    @property
    def moe(self) -> bool:
        """Blocks route tokens to experts (stacked expert tensors) instead of one dense FFN."""
        return self.n_experts > 0

    def require_dense(self, what: str) -> None:
        """One clear line where a stage has no mixture-of-experts path yet (before any long work)."""
        if self.moe:
            from twinquant.errors import TwinquantError

            raise TwinquantError(f"{what} is not supported for mixture-of-experts models ({self.arch}) yet; "
                                 "loading, running, evaluating and float GGUF export are")

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
