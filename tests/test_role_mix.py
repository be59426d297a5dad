"""twinquant's own mix (allocation/role_mix.py): the measured role rules, never larger than llama.cpp's Q2_K mix,
and llama.cpp's own mix wherever a rule cannot hold."""

from __future__ import annotations

import math
import re

import gguf
import pytest

from twinquant.allocation import role_mix
from twinquant.allocation.mixes import needs_imatrix, use_more_bits
from twinquant.allocation.role_mix import assign as assign_types
from twinquant.errors import TwinquantError
from twinquant.io.hf import spec_from_hf_config
from twinquant.model import roles
from twinquant.runtime.roofline import SHAPES, shape_spec

Q = gguf.GGMLQuantizationType


def _names_bytes(spec, choices):
    n = 0
    for c in choices:
        block, size = gguf.GGML_QUANT_SIZES[c.type]
        n += math.prod(roles.expected_shape(spec, c.name)) // block * size
    return n


def _plan(spec, mix, **kw):
    return {c.name: c for c in assign_types(spec, roles.all_tensor_names(spec), mix=mix, **kw)}


def _shape(name, **changes):
    return spec_from_hf_config({"rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                                "hidden_act": "silu", **SHAPES[name], **changes})


@pytest.mark.parametrize("tied", [True, False])
def test_the_measured_rules_on_qwen25_coder_15b_within_q2_k_bytes(tied):
    spec = _shape("qwen2.5-coder-1.5b", tie_word_embeddings=tied)
    ours, theirs = _plan(spec, "twinquant:Q2_K", imatrix=True), _plan(spec, "llama.cpp:Q2_K", imatrix=True)
    assert _names_bytes(spec, ours.values()) <= _names_bytes(spec, theirs.values())
    want = {"attn_q": Q.IQ3_XXS, "attn_k": Q.Q5_K, "attn_v": Q.Q5_K, "attn_output": Q.IQ4_XS,
            "ffn_gate": Q.IQ3_XXS, "ffn_up": Q.IQ3_XXS}
    for i in range(spec.n_layers):
        for role, t in want.items():
            assert ours[f"blk.{i}.{role}.weight"].type == t, (i, role)
        assert ours[f"blk.{i}.ffn_down.weight"].type == (Q.Q4_K if i < spec.n_layers // 8 else Q.Q3_K)
    head = "token_embd.weight" if tied else "output.weight"
    assert ours[head].type == Q.Q3_K and ours["token_embd.weight"].type == Q.Q3_K
    assert ours["blk.3.attn_k.weight"].rule == "twinquant:Q2_K attn_k"
    assert ours["blk.0.ffn_down.weight"].rule == "twinquant:Q2_K ffn_down first 1/8"
    assert ours["blk.0.attn_norm.weight"].type == Q.F32
    # GPTQ's calibration is the importance data the i-quants need
    assert "blk.0.attn_q.weight" in needs_imatrix(ours.values(), "twinquant:Q2_K")


def test_a_larger_model_gets_ffn_gate_up_back_at_q2_k_layer_by_layer_until_it_fits():
    spec = shape_spec("qwen2.5-7b")
    names = roles.all_tensor_names(spec)
    ours, theirs = _plan(spec, "twinquant:Q2_K", imatrix=True), _plan(spec, "llama.cpp:Q2_K", imatrix=True)
    budget = _names_bytes(spec, theirs.values())
    assert _names_bytes(spec, ours.values()) <= budget
    low = [i for i in range(spec.n_layers) if ours[f"blk.{i}.ffn_gate.weight"].type == Q.Q2_K]
    assert 0 < len(low) < spec.n_layers
    assert all(ours[f"blk.{i}.ffn_up.weight"].type == (Q.Q2_K if i in low else Q.IQ3_XXS) for i in range(28))
    assert sorted(role_mix.demotion_order(spec.n_layers)[:len(low)]) == low       # in the stated order
    assert f"{len(low)} of 28 layers back at Q2_K" in ours[f"blk.{low[0]}.ffn_gate.weight"].rule
    # the fewest demotions that fit: one layer fewer is over the budget
    layer = (set(low) - set(role_mix.demotion_order(spec.n_layers)[:len(low) - 1])).pop()
    gate = roles.expected_shape(spec, f"blk.{layer}.ffn_gate.weight")
    per = {t: math.prod(gate) // gguf.GGML_QUANT_SIZES[t][0] * gguf.GGML_QUANT_SIZES[t][1] for t in (Q.Q2_K, Q.IQ3_XXS)}
    assert _names_bytes(spec, ours.values()) + 2 * (per[Q.IQ3_XXS] - per[Q.Q2_K]) > budget
    assert len(names) == len(ours)


def test_demotion_order_takes_the_layers_without_extra_bits_first_middle_first():
    for n in (8, 24, 28, 64):
        order = role_mix.demotion_order(n)
        assert sorted(order) == list(range(n))
        plain = [i for i in range(n) if not use_more_bits(i, n)]
        assert set(order[:len(plain)]) == set(plain)
        mid = [abs(2 * i - (n - 1)) for i in order[:len(plain)]]
        assert mid == sorted(mid)


@pytest.mark.parametrize("case", ["llama-2-7b", "576-wide", "no-importance", "experts"])
def test_where_a_rule_cannot_hold_the_mix_is_llama_cpps_own(case):
    imatrix = case != "no-importance"
    if case == "576-wide":        # SmolLM2-135M's shape: its rows fall back to 4.5-bit types
        spec = spec_from_hf_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
                                    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                                    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
                                    "rms_norm_eps": 1e-5, "rope_theta": 1e4, "hidden_act": "silu"})
        why = "256-blocks"
    elif case == "experts":
        spec = spec_from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                                    "hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 512,
                                    "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 4,
                                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128,
                                    "vocab_size": 4096, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
                                    "rope_theta": 1e6, "hidden_act": "silu"})
        why = "experts"
    else:
        spec = shape_spec("llama-2-7b" if case == "llama-2-7b" else "qwen2.5-coder-1.5b")
        why = "larger than" if case == "llama-2-7b" else "importance"
    ours = _plan(spec, "twinquant:Q2_K", imatrix=imatrix)
    theirs = _plan(spec, "llama.cpp:Q2_K", imatrix=imatrix)
    assert {n: c.type for n, c in ours.items()} == {n: c.type for n, c in theirs.items()}
    quantized = [c for c in ours.values() if c.type != Q.F32]
    assert quantized and all(why in c.rule and "twinquant:Q2_K" in c.rule for c in quantized), quantized[0].rule


def test_user_overrides_and_options_win_over_the_role_rules():
    spec = _shape("qwen2.5-coder-1.5b", tie_word_embeddings=False)
    ours = _plan(spec, "twinquant:Q2_K", imatrix=True, overrides=[r"blk\.1\.attn_k=Q8_0"], embedding_type="Q2_K")
    assert ours["blk.1.attn_k.weight"].type == Q.Q8_0 and ours["blk.1.attn_k.weight"].rule.startswith("override")
    assert ours["blk.2.attn_k.weight"].type == Q.Q5_K and ours["output.weight"].type == Q.Q3_K
    assert ours["token_embd.weight"].type == Q.Q2_K
    # the budget is llama.cpp's mix with the user's options: an output type of one's own forfeits the head's bytes
    ours = _plan(spec, "twinquant:Q2_K", imatrix=True, output_type="Q6_K")
    assert ours["output.weight"].type == Q.Q6_K and "larger than" in ours["blk.0.attn_k.weight"].rule
    assert _plan(spec, "twinquant:Q2_K", imatrix=True, embedding_type="Q4_K")["token_embd.weight"].type == Q.Q4_K
    with pytest.raises(TwinquantError, match="role rules"):
        assign_types(spec, roles.all_tensor_names(spec), mix="twinquant:Q2_K", pure=True)
    with pytest.raises(TwinquantError, match="unknown mix"):
        assign_types(spec, roles.all_tensor_names(spec), mix="twinquant:Q9_K")
    assert re.fullmatch(r"twinquant:Q2_K", next(iter(role_mix.ROLE_MIXES)))
