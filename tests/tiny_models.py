"""Tiny random Llama / Qwen2 / Qwen3 (and Qwen2-MoE / Qwen3-MoE, DeepSeek-V2 / V3) models from `transformers` config classes: the
oracles for our forward."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama": dict(cls="LlamaConfig"),
    "llama-tied": dict(cls="LlamaConfig", tie_word_embeddings=True),
    "qwen2": dict(cls="Qwen2Config"),
    "qwen3": dict(cls="Qwen3Config", head_dim=24),   # head_dim != hidden / heads, as in real Qwen3
}
# Mixture-of-experts families (not in FAMILIES: the dense-only stages refuse them). Norms of the top-k weights as
# llama.cpp's graph for each family has them (Qwen2-MoE: none; Qwen3-MoE: renormalized).
MOE_FAMILIES = {
    "qwen2moe": dict(cls="Qwen2MoeConfig", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3moe": dict(cls="Qwen3MoeConfig", head_dim=24, num_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=32, norm_topk_prob=True),
}
# DeepSeek (llama.cpp's deepseek2): latent attention with a q bottleneck (V3) or without (V2-Lite), a first dense
# block, two shared experts; V3's sigmoid routing with a selection bias over the best 1 of 2 groups, scaled and
# renormalized; V2's softmax routing (greedy; or group-limited by each group's best expert).
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=2,
            first_k_dense_replace=1, num_hidden_layers=3)
DEEPSEEK_FAMILIES = {
    "deepseek_v3": dict(cls="DeepseekV3Config", **_MLA, q_lora_rank=48, n_group=2, topk_group=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "deepseek_v2_lite": dict(cls="DeepseekV2Config", **_MLA, q_lora_rank=None, topk_method="greedy",
                             routed_scaling_factor=1.5),
    "deepseek_v2_grouped": dict(cls="DeepseekV2Config", **_MLA, q_lora_rank=48, topk_method="group_limited_greedy",
                                n_group=4, topk_group=2),
}


def tiny_config(family: str, vocab: int = 320, **over):
    import transformers

    kw = dict({**FAMILIES, **MOE_FAMILIES, **DEEPSEEK_FAMILIES}[family])
    cls = getattr(transformers, kw.pop("cls"))
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    base.update(kw)
    base.update(over)
    return cls(**base)


def tiny_hf_model(family: str, seed: int = 0, **over):
    """A transformers model with weights and norm gains randomised (so norms, biases and q/k norms matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):     # DeepSeek-V3's selection bias (a buffer)
                b.copy_(0.1 * torch.randn_like(b))
    return model


def save_tiny(family: str, path: Path, seed: int = 0, tokenizer: bool = False, **over) -> Path:
    """Save a tiny random model as an HF directory (with a tiny tokenizer if asked)."""
    model = tiny_hf_model(family, seed, **over)
    model.save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path, model.config.vocab_size)
    return path


def save_tiny_tokenizer(path: Path, vocab: int = 320) -> Path:
    """A small byte-level BPE tokenizer (gpt-2 pre-tokenizer) in HF files, so tiny models can be exported."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 8, special_tokens=["<|endoftext|>", "<|im_start|>",
                                  "<|im_end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog, twice: 12 and 345."] * 10, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False}))
    return path


def save_fused_experts(src: Path, dst: Path) -> Path:
    """The MoE checkpoint at `src` rewritten in transformers 5's layout (experts.gate_up_proj [experts, 2 * ffn,
    hidden], gate rows first; experts.down_proj) at `dst`."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((src / "config.json").read_text())
    experts = cfg.get("num_experts") or cfg["n_routed_experts"]
    sd = load_file(str(src / "model.safetensors"))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj.weight" not in sd:
            continue
        per = {k: torch.stack([sd.pop(f"{p}.{e}.{k}.weight") for e in range(experts)])
               for k in ("gate_proj", "up_proj", "down_proj")}
        sd[f"{p}.gate_up_proj"] = torch.cat([per["gate_proj"], per["up_proj"]], dim=1)
        sd[f"{p}.down_proj"] = per["down_proj"]
    dst.mkdir(parents=True)
    save_file(sd, str(dst / "model.safetensors"))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def save_q2k_gguf(path: Path) -> Path:
    """A one-block qwen2 of 256-wide rows with every block linear in Q2_K (round to nearest), as a GGUF: what the
    int8-x decode path (TWINQUANT_Q8=Q2_K) multiplies."""
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.hf import load_hf_dir
    from twinquant.pipeline.executor import quantize_model

    model = load_hf_dir(save_tiny("qwen2", path / "hf", tokenizer=True, hidden_size=256, intermediate_size=512,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1))
    model.materialize()
    types = {n: "Q2_K" for n in model.tensor_names() if n.startswith("blk.") and n.endswith("weight")
             and n.split(".")[2] in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    quantize_model(model, types, "rtn", progress=False)
    return write_gguf(model, path / "q.gguf", "F32")

