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
    arch: str                 # architecture record name (model/architectures.py): "llama", "qwen2", "deepseek2" …
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
    # shared expert of width `shared_ffn` (0: none; behind a sigmoid gate in Qwen2-MoE, DeepSeek's shared experts
    # have none); `norm_topk`: the chosen experts' weights are renormalized to sum to 1.
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    norm_topk: bool = False
    # DeepSeek's routing: `gating` "softmax" or "sigmoid" scores; `expert_bias`: a per-expert bias (exp_probs_b) added
    # to the scores for the choice only; experts in `n_groups` groups of which only the best `groups_used` are
    # eligible (a group's score: the sum of its best two, or with `group_score` "max" its best one, DeepSeek-V2's
    # group_limited_greedy); the chosen weights times `expert_scale`; the first `n_dense_lead` blocks have a dense
    # FFN of width `intermediate` instead of experts.
    gating: str = "softmax"
    expert_bias: bool = False
    n_groups: int = 1
    groups_used: int = 1
    group_score: str = "sum_top2"
    expert_scale: float = 1.0
    n_dense_lead: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3; kv_lora_rank 0: ordinary attention). Queries come from the hidden
    # state directly or through a rank-`q_lora_rank` bottleneck with its RMSNorm; keys and values from one shared
    # rank-`kv_lora_rank` latent (RMS-normed) that attn_k_b / attn_v_b expand per head, plus a `rope_dim`-wide key
    # part shared by all heads that carries RoPE (on interleaved pairs). head_dim (= nope + rope_dim) is the q/k
    # width per head, `v_head_dim` the value width.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0
    # YaRN RoPE scaling (yarn_factor 0: none): each frequency a mix of the original and the interpolated (/factor)
    # one, by a ramp over the dimensions between beta_fast and beta_slow rotations within the original context;
    # cos/sin scaled by an attention factor (from mscale / mscale_all_dim); latent attention's softmax scale also
    # by mscale_all_dim's factor squared (DeepSeek), as transformers computes them.
    yarn_factor: float = 0.0
    yarn_orig_ctx: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0

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
        if not self.n_experts and (self.n_experts_used or self.expert_ffn or self.shared_ffn or self.n_dense_lead):
            raise TwinquantError("model spec: expert settings without experts")
        if self.gating not in ("softmax", "sigmoid") or self.group_score not in ("sum_top2", "max"):
            raise TwinquantError(f"model spec: unknown expert gating {self.gating!r} / group score {self.group_score!r}")
        if self.n_experts and not (0 < self.groups_used <= self.n_groups and self.n_experts % self.n_groups == 0
                                   and self.n_experts_used <= self.groups_used * (self.n_experts // self.n_groups)):
            raise TwinquantError(f"model spec: {self.n_experts} experts in {self.n_groups} groups, {self.groups_used} "
                                 f"of them used, cannot supply {self.n_experts_used} experts per token")
        if self.group_score == "sum_top2" and self.n_groups > 1 and self.n_experts // self.n_groups < 2:
            raise TwinquantError("model spec: a group's score is the sum of its best two experts; groups of one")
        if not 0 <= self.n_dense_lead <= self.n_layers or self.expert_scale <= 0:
            raise TwinquantError("model spec: dense leading blocks must be within the model and the expert scale "
                                 "positive")
        if self.kv_lora_rank:
            if not (0 < self.rope_dim < self.head_dim and self.rope_dim % 2 == 0 and self.v_head_dim > 0
                    and self.q_lora_rank >= 0 and self.n_kv_heads == self.n_heads):
                raise TwinquantError(f"model spec: latent attention needs an even RoPE part narrower than the head "
                                     f"({self.rope_dim} of {self.head_dim}), a value width ({self.v_head_dim}) and as "
                                     "many key/value heads as heads")
        elif self.q_lora_rank or self.rope_dim or self.v_head_dim:
            raise TwinquantError("model spec: latent-attention settings without kv_lora_rank")
        if self.yarn_factor and not (self.yarn_factor > 0 and self.yarn_orig_ctx > 0
                                     and self.yarn_beta_fast > self.yarn_beta_slow > 0):
            raise TwinquantError(f"model spec: YaRN needs a positive factor ({self.yarn_factor}), the original "
                                 f"context ({self.yarn_orig_ctx}) and beta_fast > beta_slow > 0")

    @property
    def moe(self) -> bool:
        """Blocks route tokens to experts (stacked expert tensors) instead of one dense FFN."""
        return self.n_experts > 0

    def moe_layer(self, layer: int) -> bool:
        """Block `layer` routes to experts (a MoE model's leading dense blocks do not)."""
        return self.n_experts > 0 and layer >= self.n_dense_lead

    @property
    def rope_width(self) -> int:
        """Dimensions per head that RoPE rotates."""
        return self.rope_dim if self.mla else self.head_dim

    @property
    def mla(self) -> bool:
        """Multi-head latent attention (DeepSeek) instead of q/k/v projections."""
        return self.kv_lora_rank > 0

    @property
    def nope_dim(self) -> int:
        """Per-head q/k width without RoPE (MLA)."""
        return self.head_dim - self.rope_dim

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

    @property
    def attn_out_dim(self) -> int:
        """Width of attn_output's input: the heads' values."""
        return self.n_heads * (self.v_head_dim if self.mla else self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
