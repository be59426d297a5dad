"""DeepSeek-V2 / V3 (llama.cpp's deepseek2): multi-head latent attention, dense leading blocks, shared experts and
DeepSeek's routing (softmax or sigmoid scores, the selection bias, group-limited choice, scaling) — run by the one
forward exactly as `transformers` runs them, written to and read from GGUF with llama.cpp's split attn_k_b /
attn_v_b, run by stock llama.cpp, and quantized (per-expert and per-head Hessians, llama.cpp's mixes byte for
byte)."""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from tests.test_moe import _close, _close_but_routing, _moe_quantize, _stock_logits
from tests.tiny_models import DEEPSEEK_FAMILIES, save_tiny, tiny_hf_model
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir, save_hf_dir
from twinquant.model.forward import KVCache, forward

# the families stock llama.cpp computes as transformers does (V2's group-limited choice it does not)
STOCK = ("deepseek_v3", "deepseek_v2_lite")


@pytest.fixture(params=list(DEEPSEEK_FAMILIES))
def family(request):
    return request.param


def _ids(n: int, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def test_forward_matches_transformers(family, tmp_path):
    ref = tiny_hf_model(family)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    s = ours.spec
    assert (s.arch, s.mla, s.kv_lora_rank, s.rope_dim, s.head_dim, s.v_head_dim) == ("deepseek2", True, 32, 8, 24, 24)
    assert (s.n_dense_lead, s.shared_ffn, s.n_kv_heads) == (1, 64, 4)
    assert s.q_lora_rank == (0 if family == "deepseek_v2_lite" else 48)
    assert (s.gating, s.expert_bias) == (("sigmoid", True) if family == "deepseek_v3" else ("softmax", False))
    assert ours.get("blk.1.attn_k_b.weight").shape == (4, 32, 16)      # [heads, latent, nope] as llama.cpp
    assert ours.get("blk.1.attn_v_b.weight").shape == (4, 24, 32)
    assert ours.get("blk.0.ffn_down.weight").shape == (64, 96)          # the dense first block
    x = torch.randint(0, s.vocab, (2, 67))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(ours, x), want)


def test_routing_options_are_used(tmp_path):
    """Each routing option changes the function (so the match above is not by accident): the selection bias, the
    groups, the scale, the renormalization."""
    ref = tiny_hf_model("deepseek_v3")
    ref.save_pretrained(tmp_path)
    m = load_hf_dir(tmp_path)
    x = _ids(40)
    base = forward(m, x)
    for change in (dict(expert_bias=False), dict(groups_used=2), dict(expert_scale=1.0), dict(norm_topk=False)):
        m2 = load_hf_dir(tmp_path)
        m2.spec = dataclasses.replace(m.spec, **change)
        assert (forward(m2, x) - base).abs().max() > 1e-3, change


@pytest.mark.parametrize("experts,used,tokens", [(16, 2, 3), (4, 4, 9)])
def test_routing_extremes_match_transformers(family, tmp_path, experts, used, tokens):
    """Most experts receiving no token (16 experts, 3 tokens), and every token routed to every expert."""
    groups = {} if family == "deepseek_v2_lite" else dict(n_group=2 if used < experts else 1,
                                                           topk_group=1 if used < experts else 1)
    ref = tiny_hf_model(family, n_routed_experts=experts, num_experts_per_tok=used, **groups)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    x = torch.randint(0, ours.spec.vocab, (1, tokens))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(ours, x), want)


def test_cached_generation_equals_full_forward(family, tmp_path):
    m = load_hf_dir(save_tiny(family, tmp_path))
    x = torch.randint(0, m.spec.vocab, (1, 30))
    cache = KVCache.empty(m, 1, 30)
    assert cache.k[0].shape == (1, 1, 30, 32 + 8)          # one latent + RoPE key per position, not per head
    parts = [forward(m, x[:, :11], cache=cache), forward(m, x[:, 11:12], cache=cache), forward(m, x[:, 12:], cache=cache)]
    _close(torch.cat(parts, 1), forward(m, x), 1e-5)


def test_hf_round_trip(family, tmp_path):
    """save_hf_dir writes kv_b_proj back from attn_k_b / attn_v_b and the per-expert layout; transformers runs it."""
    m = load_hf_dir(save_tiny(family, tmp_path / "a"))
    save_hf_dir(m, tmp_path / "b")
    back = load_hf_dir(tmp_path / "b")
    assert back.spec == m.spec
    for n in m.tensor_names():
        assert torch.equal(back.get(n), m.get(n)), n
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    x = _ids(33)
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(m, x), want)


def test_multi_token_prediction_layer_is_skipped(tmp_path):
    """DeepSeek-V3 checkpoints carry an extra multi-token-prediction layer after the last block: not part of the
    model (llama.cpp's converter skips it too); any other tensor without a role is still an error."""
    from safetensors.torch import save_file

    path = save_tiny("deepseek_v3", tmp_path)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(64, 128)}, str(tmp_path / "mtp.safetensors"))
    load_hf_dir(path).get("blk.2.attn_q_b.weight")
    save_file({"model.layers.2.eh_proj.weight": torch.zeros(64, 128)}, str(tmp_path / "mtp.safetensors"))
    with pytest.raises(TwinquantError, match="has no role"):
        load_hf_dir(path)


@pytest.mark.parametrize("change,message", [
    (dict(n_routed_experts=None), "without routed experts"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(topk_method="noaux_tc"), "expert routing"),
])
def test_unsupported_configs_are_one_line(tmp_path, change, message):
    path = save_tiny("deepseek_v2_lite" if "topk_method" in change else "deepseek_v3", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(TwinquantError, match=message):
        load_hf_dir(path)


@pytest.fixture
def with_tokenizer(family, tmp_path):
    return load_hf_dir(save_tiny(family, tmp_path / "hf", tokenizer=True))


def test_gguf_round_trip_and_stock_llama_cpp(with_tokenizer, family, tmp_path):
    """The F32 file reads back to the same spec and tensors (llama.cpp's keys: one kv head of latent + RoPE width,
    key_length_mla, the routing keys); stock llama.cpp computes our logits — or, for DeepSeek-V2's group-limited
    choice, which llama.cpp's graph does not have, the export is refused in one line with nothing written."""
    m = with_tokenizer
    if family not in STOCK:
        with pytest.raises(TwinquantError, match="best two"):
            write_gguf(m, tmp_path / "m.gguf", "F32")
        assert not list(tmp_path.glob("m.gguf*"))
        return
    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    r = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("tokenizer")}
    assert kv["deepseek2.attention.head_count_kv"] == 1 and kv["deepseek2.attention.key_length"] == 40
    assert kv["deepseek2.attention.key_length_mla"] == 24 and kv["deepseek2.leading_dense_block_count"] == 1
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert "blk.1.attn_kv_b.weight" not in types and types["blk.1.attn_k_b.weight"] == "F32"
    g = load_gguf(path)
    assert dataclasses.replace(g.spec, rms_eps=m.spec.rms_eps, name=m.spec.name) == m.spec
    for n in m.tensor_names():
        assert torch.equal(g.get(n), m.get(n)), n
    toks = _ids(40)
    ours = forward(m, toks)[0]
    _close(_stock_logits(path, toks[0].tolist()), ours)
    f16 = write_gguf(m, tmp_path / "h.gguf", "F16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(f16).tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.attn_q_a.weight" if family == "deepseek_v3"
                                                                  else "blk.1.attn_q.weight"] == "F16"
    if family == "deepseek_v3":
        assert types["blk.1.exp_probs_b.bias"] == "F32"


# --- quantization ------------------------------------------------------------------------------------------------

def test_each_head_of_k_b_and_v_b_sees_its_own_inputs(tmp_path):
    """attn_k_b's head h reads that head's non-RoPE query, attn_v_b's head h that head's attention output in the
    latent space: a hook's `expert_input` gets one input per head, and they differ."""
    m = load_hf_dir(save_tiny("deepseek_v3", tmp_path))
    seen: dict = {}

    class Hook:
        def __call__(self, name, inp):
            pass

        def expert_input(self, name, h, inp):
            seen.setdefault(name, {})[h] = inp

    forward(m, _ids(20), hook=Hook())
    k_in, v_in = seen["blk.1.attn_k_b.weight"], seen["blk.1.attn_v_b.weight"]
    assert sorted(k_in) == sorted(v_in) == [0, 1, 2, 3]
    assert k_in[0].shape == (20, 16) and v_in[0].shape == (20, 32)
    assert not torch.allclose(k_in[0], k_in[1]) and not torch.allclose(v_in[0], v_in[1])


@pytest.mark.parametrize("family", STOCK)
def test_gptq_file_runs_in_stock_llama_cpp(family, tmp_path):
    """GPTQ (per-expert and per-head Hessians) into Q4_0 where rows allow: the router, the selection bias and the
    norms stay F32, the file runs in stock llama.cpp close to our forward of the same weights."""
    src = save_tiny(family, tmp_path / "hf", tokenizer=True, kv_lora_rank=64, qk_nope_head_dim=32,
                    v_head_dim=32, moe_intermediate_size=64, q_lora_rank=64 if family == "deepseek_v3" else None)
    res = _moe_quantize(src, tmp_path / "q.gguf")
    reps = {t.name: t for t in res.report.tensors}
    assert reps["blk.1.attn_k_b.weight"].shape == (4, 64, 32) and reps["blk.1.attn_k_b.weight"].type == "Q4_0"
    assert reps["blk.1.attn_v_b.weight"].expert_tokens is None      # heads see every token: no coverage to report
    assert sum(reps["blk.1.ffn_gate_exps.weight"].expert_tokens) == 512 * 2
    assert "blk.1.ffn_gate_inp.weight" not in reps and "blk.1.exp_probs_b.bias" not in reps
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(res.path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["blk.1.ffn_gate_inp.weight"] == "F32"
    q = load_gguf(res.path)
    toks = _ids(40, q.spec.vocab)[0].tolist()
    _close_but_routing(_stock_logits(res.path, toks), forward(q, torch.tensor([toks]))[0])
    # Q4_0's weight error, every tensor (a tiny random model's logits are too chaotic under routing to say more)
    assert all(0.01 < r.rel_error < 0.15 for r in reps.values()), {n: r.rel_error for n, r in reps.items()}


@pytest.mark.parametrize("ftype", ["Q2_K", "Q4_K_M", "IQ4_XS"])
def test_rtn_mix_is_byte_identical_to_llama_quantize(bindir, tmp_path, ftype):
    """`quantize --mix llama.cpp:FTYPE --method rtn` of a DeepSeek-V3-shaped model (256-wide rows) writes
    llama-quantize's tensors byte for byte: latent-attention tensors at the default type, attn_k_b's 32-wide rows
    falling back, 8 experts' attn_output rule, the dense first block, routers and the selection bias F32."""
    import subprocess

    from twinquant.cli import main

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True, hidden_size=256, intermediate_size=256,
                    moe_intermediate_size=256, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=32,
                    qk_rope_head_dim=32, v_head_dim=64, num_attention_heads=4, num_key_value_heads=4)
    f32 = write_gguf(load_hf_dir(src), tmp_path / "m.gguf", "F32")
    subprocess.run([str(bindir / "llama-quantize"), str(f32), str(tmp_path / "theirs.gguf"), ftype, "1"],
                   check=True, capture_output=True)
    assert main(["quantize", str(f32), "-o", str(tmp_path / "ours.gguf"), "--mix", f"llama.cpp:{ftype}",
                 "--method", "rtn", "-q"]) == 0
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    ours = gguf.GGUFReader(tmp_path / "ours.gguf").tensors
    assert {t.name for t in ours} == set(theirs)
    assert theirs["blk.1.exp_probs_b.bias"].tensor_type.name == "F32"
    for t in ours:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), (t.name, t.tensor_type.name)


def test_quantize_refuses_group_limited_v2_before_any_work(tmp_path, capsys):
    from twinquant.cli import main

    path = save_tiny("deepseek_v2_grouped", tmp_path / "hf", tokenizer=True)
    capsys.readouterr()
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.gguf"), "--format", "Q4_0", "--calib-tokens", "128",
                 "--calib-ctx", "64"]) == 2
    err = capsys.readouterr().err
    assert "best two" in err and "[   1/" not in err
    assert not list(tmp_path.glob("q.gguf*"))


def test_large_expert_hessians_are_built_a_chunk_at_a_time(tmp_path, monkeypatch):
    """Per-expert Hessians past EXPERT_HESSIAN_BYTES (DeepSeek-V3's need 53 GB) are rebuilt a chunk of experts at a
    time from the routed inputs the block pass kept (`measure`'s path; `quantize` goes expert-major instead,
    tests/test_moe_streaming.py): the same Hessians as the ones collected at once (up to summation order), each
    chunk built once per tensor."""
    from twinquant.calibration import blocks

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True)
    m = load_hf_dir(src)
    x = torch.randn(3, 32, 64)
    held = blocks.block_hessians(m, 1, x, {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"})
    assert not held.chunked
    want, tokens = held.expert_hessians("blk.1.ffn_gate_exps.weight", 8, 64)
    monkeypatch.setattr(blocks, "EXPERT_HESSIAN_BYTES", 3 * 4 * 64 * 64)     # 3 experts of 64 inputs a chunk
    hooks = blocks.block_hessians(m, 1, x, {"blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"})
    assert hooks.chunked == {"blk.1.ffn_gate_exps.weight"}          # down's 32-wide Hessians still fit
    got, got_tokens = hooks.expert_hessians("blk.1.ffn_gate_exps.weight", 8, 64,
                                            recollect=blocks.recollector(m, 1, hooks))
    assert got_tokens == tokens and sum(tokens) == 3 * 32 * 2
    for e in range(8):
        assert torch.allclose(got.diagonal(e), torch.diagonal(want[e]), rtol=1e-4, atol=1e-6), e
        assert torch.allclose(got[e], want[e], rtol=1e-4, atol=1e-6), e
    assert got.chunks_built == 3                                     # experts 0-2, 3-5, 6-7: each once


YARN = dict(rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
            max_position_embeddings=2560)


@pytest.mark.parametrize("family", STOCK)
def test_yarn_rope_matches_transformers_and_stock_llama_cpp(family, tmp_path):
    """DeepSeek's releases use YaRN RoPE (V2-Lite: factor 40, mscale = mscale_all_dim = 0.707): our forward computes
    what transformers computes, on positions past the original context too, the GGUF keeps it, and stock llama.cpp
    computes it as well."""
    ref = tiny_hf_model(family, **YARN)
    ref.save_pretrained(tmp_path / "hf")
    from tests.tiny_models import save_tiny_tokenizer

    save_tiny_tokenizer(tmp_path / "hf")
    m = load_hf_dir(tmp_path / "hf")
    assert (m.spec.yarn_factor, m.spec.yarn_orig_ctx, m.spec.yarn_mscale_all_dim) == (40.0, 64, 0.707)
    x = _ids(150)
    with torch.no_grad():
        want = ref(x).logits
    ours = forward(m, x)
    _close(ours, want)
    plain = load_hf_dir(save_tiny(family, tmp_path / "plain"))      # same seed, no YaRN: another function
    assert (forward(plain, x) - want).abs().max() > 1e-2
    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    g = load_gguf(path)
    assert abs(g.spec.yarn_mscale_all_dim - 0.707) < 1e-6 and g.spec.yarn_factor == 40.0
    _close(forward(g, x), ours, 1e-5)
    _close(_stock_logits(path, x[0, :60].tolist()), ours[0, :60])


def test_yarn_llama_cpp_cannot_compute_is_refused(tmp_path):
    m = load_hf_dir(save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True,
                              **{**YARN, "rope_scaling": {**YARN["rope_scaling"], "mscale": 1.0}}))
    with pytest.raises(TwinquantError, match="mscale"):
        write_gguf(m, tmp_path / "m.gguf", "F32")
    assert not list(tmp_path.glob("m.gguf*"))


def test_measured_target_size_on_deepseek(tmp_path):
    """measure + --target-bpw on DeepSeek: per-head k_b / v_b and stacked experts priced as one entry each; the
    file meets the target and runs in stock llama.cpp."""
    from twinquant.pipeline import Options, measure, quantize
    from twinquant.pipeline.recipe import load_recipe

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True, kv_lora_rank=64, qk_nope_head_dim=32,
                    v_head_dim=32, moe_intermediate_size=64, q_lora_rank=64)
    recipe = load_recipe("default").replace(calib_tokens=512, calib_ctx=64)
    m = measure(str(src), tmp_path / "m.json", recipe, Options(quiet=True))
    assert m.tensors["blk.1.attn_k_b.weight"]["shape"] == [4, 64, 32]
    assert m.tensors["blk.1.ffn_gate_exps.weight"]["candidates"]["Q4_0"]["kld"] >= 0
    res = quantize(str(src), tmp_path / "q.gguf", recipe, Options(quiet=True, target_bpw=5.0,
                                                                  measurement=str(tmp_path / "m.json")))
    r = gguf.GGUFReader(res.path)
    assert 8 * sum(int(t.n_bytes) for t in r.tensors) / res.n_params <= 5.0 + 1e-9
    q = load_gguf(res.path)
    toks = _ids(40, q.spec.vocab)[0].tolist()
    _close_but_routing(_stock_logits(res.path, toks), forward(q, torch.tensor([toks]))[0])


def test_cli_inspect_shows_latent_attention_and_routing(tmp_path, capsys):
    from twinquant.cli import main

    path = save_tiny("deepseek_v2_lite", tmp_path / "hf", tokenizer=True)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture: deepseek2" in out
    assert "latent attention: kv rank 32, q rank - (direct), rope dims 8 of 24, value dims 24" in out
    assert "experts 8, 2 per token, expert ffn 32, shared expert ffn 64, softmax scores" in out
    assert "x 1.5" in out and "first 1 blocks dense" in out


def test_measure_with_chunked_expert_hessians(tmp_path, monkeypatch):
    """measure prices a stack whose Hessians are built a chunk at a time as it prices one held whole."""
    from twinquant.calibration import blocks
    from twinquant.pipeline import Options, measure
    from twinquant.pipeline.recipe import load_recipe

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True)
    recipe = load_recipe("default").replace(calib_tokens=256, calib_ctx=64)
    held = measure(str(src), tmp_path / "a.json", recipe, Options(quiet=True))
    monkeypatch.setattr(blocks, "EXPERT_HESSIAN_BYTES", 3 * 4 * 64 * 64)
    chunked = measure(str(src), tmp_path / "b.json", recipe, Options(quiet=True))
    for n in ("blk.1.ffn_gate_exps.weight", "blk.2.ffn_up_exps.weight"):
        a, b = held.tensors[n]["candidates"], chunked.tensors[n]["candidates"]
        for ty in a:
            assert b[ty]["out_error"] == pytest.approx(a[ty]["out_error"], rel=0.05), (n, ty)
