"""Architecture records: one small data record per supported family.

Each record says how the family differs from the common decoder (biases, q/k norm, GGUF row order of q/k)
and which `transformers` class / gguf-py `MODEL_ARCH` it corresponds to. Adding a family = adding a record here
(and, for new tensor roles, to `roles.py`); no `if arch == ...` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class Architecture:
    name: str                      # our name, also the GGUF `general.architecture` value
    hf_architectures: tuple[str, ...]
    hf_model_type: str
    gguf_arch: gguf.MODEL_ARCH
    qkv_bias: bool                 # default when the config does not say
    qk_norm: bool
    # llama.cpp's LLAMA graph applies RoPE to interleaved pairs, so convert_hf_to_gguf permutes the rows of
    # attn_q / attn_k for this family; Qwen2/3 use the NeoX (rotate-half) layout that HF uses, unpermuted.
    gguf_rope_permuted: bool
    moe: bool = False              # blocks route tokens to experts (ModelSpec.n_experts > 0)
    shared_expert: bool = False    # ... plus a shared expert behind a sigmoid gate (Qwen2-MoE)
    # llama.cpp's graph for the family renormalizes the chosen experts' weights or not: fixed per family there,
    # not read from the file, so a model whose config says otherwise cannot run in stock llama.cpp. None: the file
    # says (expert_weights_norm, DeepSeek).
    gguf_norm_topk: bool | None = False
    # Multi-head latent attention with DeepSeek's routing options (ModelSpec.kv_lora_rank > 0); its RoPE part is
    # laid out in interleaved pairs in the checkpoint and in llama.cpp alike (no row permutation).
    mla: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("llama", ("LlamaForCausalLM",), "llama", gguf.MODEL_ARCH.LLAMA,
                     qkv_bias=False, qk_norm=False, gguf_rope_permuted=True),
        Architecture("qwen2", ("Qwen2ForCausalLM",), "qwen2", gguf.MODEL_ARCH.QWEN2,
                     qkv_bias=True, qk_norm=False, gguf_rope_permuted=False),
        Architecture("qwen3", ("Qwen3ForCausalLM",), "qwen3", gguf.MODEL_ARCH.QWEN3,
                     qkv_bias=False, qk_norm=True, gguf_rope_permuted=False),
        Architecture("qwen2moe", ("Qwen2MoeForCausalLM",), "qwen2_moe", gguf.MODEL_ARCH.QWEN2MOE,
                     qkv_bias=True, qk_norm=False, gguf_rope_permuted=False, moe=True, shared_expert=True,
                     gguf_norm_topk=False),
        Architecture("qwen3moe", ("Qwen3MoeForCausalLM",), "qwen3_moe", gguf.MODEL_ARCH.QWEN3MOE,
                     qkv_bias=False, qk_norm=True, gguf_rope_permuted=False, moe=True, gguf_norm_topk=True),
        # DeepSeek-V2 / V2-Lite (softmax routing) and V3 / R1 (sigmoid routing with a selection bias): one llama.cpp
        # architecture, told apart by their configs' routing keys.
        Architecture("deepseek2", ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"), "deepseek_v2",
                     gguf.MODEL_ARCH.DEEPSEEK2, qkv_bias=False, qk_norm=False, gguf_rope_permuted=False, moe=True,
                     gguf_norm_topk=None, mla=True),
    )
}


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise TwinquantError(f"unsupported architecture {name!r}; supported: {supported()}") from None


def architecture_for_hf(config: dict) -> Architecture:
    """The record for a Hugging Face config.json (by `architectures`, else `model_type`)."""
    names = config.get("architectures") or []
    for arch in ARCHITECTURES.values():
        if any(n in arch.hf_architectures for n in names):
            return arch
    mt = config.get("model_type")
    for arch in ARCHITECTURES.values():
        if mt == arch.hf_model_type and not names:
            return arch
    shown = names[0] if names else mt
    raise TwinquantError(
        f"unsupported architecture {shown!r}; supported: "
        + ", ".join(n for a in ARCHITECTURES.values() for n in a.hf_architectures)
    )
