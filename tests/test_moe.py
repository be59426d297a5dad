"""Mixture-of-experts families (Qwen2-MoE with its shared expert, Qwen3-MoE): loaded from Hugging Face directories,
run by the one forward exactly as `transformers` runs them, written to and read from GGUF with llama.cpp's stacked
expert tensors, and run by stock llama.cpp; the stages without an MoE path yet refuse in one line."""

import json

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import MOE_FAMILIES, save_tiny, save_tiny_tokenizer, tiny_hf_model
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir, save_hf_dir
from twinquant.model.forward import KVCache, forward


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> float:
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= tol, rel
    return rel


def _stock_logits(path, toks: list[int]) -> torch.Tensor:
    """Stock llama.cpp's logits for `toks` (F32 KV cache: its default F16 cache alone costs ~1e-3)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks)
    return torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))


def _close_but_routing(theirs: torch.Tensor, ours: torch.Tensor, share: float = 0.75) -> None:
    """A quantized file in stock llama.cpp vs our forward: llama.cpp's CPU products round activations to 8 bits
    (close, not equal: 0.06 of the logit range, as for dense files), and where that moves a router's top-k across
    a near-tie the token goes to another expert: that position differs more, and so may some later ones (they
    attend to its keys and values; one flip at position 11 of 40 moved 5 more past 0.06 in a DeepSeek file).
    Most positions (`share`) may not: a file llama.cpp reads as another function (a misplaced expert, a wrong
    layout) is far off nearly everywhere."""
    rel = (theirs - ours).abs().amax(-1) / ours.abs().max()
    assert (rel <= 0.06).float().mean() >= share, [round(v, 3) for v in rel.tolist()]


@pytest.fixture(params=list(MOE_FAMILIES))
def family(request):
    return request.param


def test_forward_matches_transformers(family, tmp_path):
    ref = tiny_hf_model(family)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    s = ours.spec
    assert (s.arch, s.n_experts, s.n_experts_used, s.expert_ffn) == (family, 8, 2, 32)
    assert s.shared_ffn == (48 if family == "qwen2moe" else 0) and s.norm_topk == (family == "qwen3moe")
    assert ours.get("blk.1.ffn_down_exps.weight").shape == (8, 64, 32)     # stacked [experts, out, in]
    x = torch.randint(0, s.vocab, (2, 67))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(ours, x), want)


@pytest.mark.parametrize("experts,used,tokens", [(16, 2, 3), (4, 4, 9)])
def test_routing_extremes_match_transformers(family, tmp_path, experts, used, tokens):
    """Most experts receiving no token (16 experts, 3 tokens, top-2), and every token routed to every expert."""
    ref = tiny_hf_model(family, num_experts=experts, num_experts_per_tok=used)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    x = torch.randint(0, ours.spec.vocab, (1, tokens))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(ours, x), want)


def test_norm_topk_follows_the_config(tmp_path):
    """Qwen2-MoE with renormalized top-k weights (the config's choice) computes what transformers computes, and
    differs from the same weights without it: the flag is used, not assumed from the family."""
    ref = tiny_hf_model("qwen2moe", norm_topk_prob=True)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    assert ours.spec.norm_topk
    x = torch.randint(0, ours.spec.vocab, (1, 40))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(ours, x), want)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "norm_topk_prob": False}))
    assert (forward(load_hf_dir(tmp_path), x) - want).abs().max() > 1e-3


def test_cached_generation_equals_full_forward(family, tmp_path):
    m = load_hf_dir(save_tiny(family, tmp_path))
    x = torch.randint(0, m.spec.vocab, (1, 30))
    cache = KVCache.empty(m, 1, 30)
    parts = [forward(m, x[:, :11], cache=cache), forward(m, x[:, 11:12], cache=cache), forward(m, x[:, 12:], cache=cache)]
    _close(torch.cat(parts, 1), forward(m, x), 1e-5)


def test_per_expert_checkpoint_and_hf_round_trip(family, tmp_path):
    """A checkpoint with one tensor per expert (how models ship) loads into the same stacked tensors, and
    save_hf_dir writes that layout back for transformers."""
    m = load_hf_dir(save_tiny(family, tmp_path / "a"))
    save_hf_dir(m, tmp_path / "b")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys and "model.layers.0.mlp.gate.weight" in keys
    back = load_hf_dir(tmp_path / "b")
    for n in m.tensor_names():
        assert torch.equal(back.get(n), m.get(n)), n
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    x = torch.randint(0, m.spec.vocab, (1, 33))
    with torch.no_grad():
        want = ref(x).logits
    _close(forward(m, x), want)


def test_missing_expert_is_one_error(tmp_path):
    m = load_hf_dir(save_tiny("qwen3moe", tmp_path / "a"))
    save_hf_dir(m, tmp_path / "b")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "b" / "model.safetensors"))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(sd, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(TwinquantError, match=r"blk\.1\.ffn_up_exps.*expert\(s\) \[3\]"):
        load_hf_dir(tmp_path / "b")


@pytest.fixture
def with_tokenizer(family, tmp_path):
    path = save_tiny(family, tmp_path / "hf", tokenizer=True)
    return load_hf_dir(path)


def test_gguf_round_trip_is_exact(with_tokenizer, tmp_path):
    m = with_tokenizer
    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    r = gguf.GGUFReader(path)
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 32, 8)      # llama.cpp's ne order: [in, out, experts]
    assert r.fields[f"{m.spec.arch}.expert_count"].contents() == 8
    back = load_gguf(path)
    a, b = back.spec.to_dict(), m.spec.to_dict()
    assert abs(a.pop("rms_eps") - b.pop("rms_eps")) < 1e-12
    assert {**a, "name": ""} == {**b, "name": ""}
    x = torch.randint(0, m.spec.vocab, (2, 40))
    assert torch.equal(forward(back, x), forward(m, x))


def test_routers_stay_f32_in_a_half_precision_file(with_tokenizer, tmp_path):
    back = load_gguf(write_gguf(with_tokenizer, tmp_path / "m.gguf", "F16"))
    assert back.tensor_info("blk.0.ffn_gate_inp.weight").source_type == "F32"
    assert back.tensor_info("blk.0.ffn_up_exps.weight").source_type == "F16"
    if back.spec.shared_ffn:
        assert back.tensor_info("blk.0.ffn_gate_inp_shexp.weight").source_type == "F32"
        assert back.tensor_info("blk.0.ffn_up_shexp.weight").source_type == "F16"


def test_stock_llama_cpp_runs_the_export(with_tokenizer, tmp_path):
    m = with_tokenizer
    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    toks = torch.randint(3, m.spec.vocab, (40,)).tolist()
    theirs = _stock_logits(path, toks)
    _close(theirs, forward(m, torch.tensor([toks]))[0])


def test_export_refuses_a_routing_llama_cpp_does_not_compute(tmp_path):
    path = save_tiny("qwen2moe", tmp_path / "hf", norm_topk_prob=True)
    save_tiny_tokenizer(path)
    with pytest.raises(TwinquantError, match="does not renormalize"):
        write_gguf(load_hf_dir(path), tmp_path / "m.gguf", "F32")
    assert list(tmp_path.glob("m.gguf*")) == []


@pytest.mark.parametrize("argv", [
    ["quantize", "{m}", "-o", "{o}/q.gguf", "--rotation", "ro"],
    ["quantize", "{m}", "-o", "{o}/q.gguf", "--format", "Q4_0", "--target-bpw", "5", "--cost", "fisher"],
    ["quantize", "{m}", "-o", "{o}/q.gguf", "--pad"],
    ["measure", "{m}", "-o", "{o}/m.json", "--cost", "fisher"],
    ["measure", "{m}", "-o", "{o}/m.json", "--keep-blocks"],
    ["rotate", "{m}", "-o", "{o}/r.gguf", "--online", "r4"],
])
def test_stages_without_an_moe_path_refuse_in_one_line(tmp_path, argv, capsys):
    from twinquant.cli import main

    m = save_tiny("qwen3moe", tmp_path / "hf", tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    args = [a.format(m=m, o=tmp_path, t=text) for a in argv]
    capsys.readouterr()        # transformers' own progress lines while saving
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixture-of-experts" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "t.txt"]


def test_transformers5_fused_expert_checkpoint_loads(tmp_path):
    """transformers 5 holds experts as fused tensors (`experts.gate_up_proj` [experts, 2 * ffn, hidden], gate rows
    first; `experts.down_proj`): a checkpoint in that layout loads to the same stacked tensors."""
    from tests.tiny_models import save_fused_experts

    src = save_tiny("qwen2moe", tmp_path / "a")
    m = load_hf_dir(src)
    fused = load_hf_dir(save_fused_experts(src, tmp_path / "b"))
    for n in m.tensor_names():
        assert torch.equal(fused.get(n), m.get(n)), n


def test_quantized_expert_stacks_read_as_llama_cpp_dequantizes_them(with_tokenizer, tmp_path, bindir):
    """A file llama-quantize made (Q8_0 stacked experts, as published MoE GGUFs are K-/i-quant stacks): each
    expert's rows come back as gguf-py dequantizes them, and our forward on it agrees with stock llama.cpp's."""
    import subprocess

    m = with_tokenizer
    f32 = write_gguf(m, tmp_path / "m.gguf", "F32")
    subprocess.run([str(bindir / "llama-quantize"), str(f32), str(tmp_path / "q.gguf"), "Q8_0", "1"], check=True,
                   capture_output=True)
    q = load_gguf(tmp_path / "q.gguf")
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, 64, 32).copy())
    got = q.get("blk.1.ffn_down_exps.weight")
    assert torch.equal(got, want)
    assert 0 < (got - m.get("blk.1.ffn_down_exps.weight")).abs().max() < 0.05
    toks = torch.randint(3, m.spec.vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = _stock_logits(tmp_path / "q.gguf", toks)
    _close_but_routing(theirs, forward(q, torch.tensor([toks]))[0])


# --- quantization: GPTQ with per-expert Hessians ---------------------------------------------------------------------

def test_each_expert_sees_exactly_the_tokens_routed_to_it(tmp_path):
    """The forward hands a hook's `expert_input` each expert's own tokens: the ones whose top-k (transformers'
    router) holds that expert, in token order."""
    ref = tiny_hf_model("qwen3moe")
    ref.save_pretrained(tmp_path)
    m = load_hf_dir(tmp_path)
    x = torch.randint(0, m.spec.vocab, (1, 50))
    seen: dict = {}

    class Hook:
        def __call__(self, name, inp):
            if name == "blk.1.ffn_gate_inp.weight":
                seen["router_in"] = inp.reshape(-1, inp.shape[-1]).clone()

        def expert_input(self, name, e, inp):
            seen.setdefault(name, {})[e] = inp.clone()

    forward(m, x, hook=Hook())
    router = ref.model.layers[1].mlp.gate
    with torch.no_grad():
        _, _, chosen = router(seen["router_in"])
    gate_in = seen["blk.1.ffn_gate_exps.weight"]
    assert sorted(gate_in) == sorted(chosen.unique().tolist())
    for e, inp in gate_in.items():
        rows = (chosen == e).any(-1).nonzero().flatten()
        assert torch.equal(inp, seen["router_in"][rows])
        assert seen["blk.1.ffn_down_exps.weight"][e].shape == (len(rows), 32)


def test_rarely_reached_experts_fall_back_to_the_pooled_hessian():
    from twinquant.algorithms.gptq import accumulate_hessian
    from twinquant.calibration.blocks import HessianHook

    torch.manual_seed(0)
    hook = HessianHook({"w"})
    xs = {0: torch.randn(40, 8), 1: torch.randn(3, 8)}       # expert 0: 40 tokens, 1: 3 (< 8 inputs), 2: none
    for e, x in xs.items():
        hook.expert_input("w", e, x)
    hook.expert_input("other", 0, torch.randn(5, 8))          # not asked for: ignored
    Hs, tokens = hook.expert_hessians("w", 3, cols=8)
    assert tokens == [40, 3, 0]
    own = {e: accumulate_hessian(None, 0, x)[0] for e, x in xs.items()}
    pool = (own[0] * 40 + own[1] * 3) / 43
    assert torch.allclose(Hs[0], own[0])                              # enough tokens: its own
    assert torch.allclose(Hs[1], (own[1] * 3 + pool * 5) / 8)         # 3 of 8: blended with the pool
    assert torch.allclose(Hs[2], pool)                                # never reached: the pool
    assert torch.linalg.eigvalsh(Hs[1]).min() > 0                     # no longer singular


def _moe_quantize(src, out, method="gptq", stream=True, **changes):
    import dataclasses

    from twinquant.pipeline import Options, quantize
    from twinquant.pipeline.recipe import load_recipe

    recipe = dataclasses.replace(load_recipe("default"), method=method, mix=None, format="Q4_0",
                                 **{"rotation": "none", "calib_tokens": 512, "calib_ctx": 64, **changes})
    return quantize(str(src), out, recipe, Options(quiet=True, stream=stream))


def test_gptq_per_expert_file_runs_in_stock_llama_cpp(family, tmp_path):
    src = save_tiny(family, tmp_path / "hf", tokenizer=True)
    res = _moe_quantize(src, tmp_path / "q.gguf")
    reps = {t.name: t for t in res.report.tensors}
    gate = reps["blk.0.ffn_gate_exps.weight"]
    assert gate.type == "Q4_0" and gate.shape == (8, 32, 64)
    assert sum(gate.expert_tokens) == 512 * 2                   # every calibration token reaches 2 experts
    assert reps["blk.0.ffn_down_exps.weight"].expert_tokens == gate.expert_tokens
    assert "blk.0.ffn_gate_inp.weight" not in reps               # the router is never quantized
    r = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.1.ffn_gate_inp.weight"] == "F32" and types["blk.1.ffn_up_exps.weight"] == "Q4_0"
    q = load_gguf(res.path)
    toks = torch.randint(3, q.spec.vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = _stock_logits(res.path, toks)
    _close_but_routing(theirs, forward(q, torch.tensor([toks]))[0])


def test_gptq_per_expert_beats_rtn_and_streams_bit_for_bit(tmp_path):
    """GPTQ with each expert's Hessian ends closer to the float model than RTN into the same types (on tokens it
    was not calibrated on), and the streamed run writes the in-memory run's bytes."""
    src = save_tiny("qwen2moe", tmp_path / "hf", tokenizer=True, hidden_size=128, moe_intermediate_size=64)
    f = load_hf_dir(src)
    a = _moe_quantize(src, tmp_path / "gptq.gguf")
    b = _moe_quantize(src, tmp_path / "memory.gguf", stream=False)
    assert a.path.read_bytes() == b.path.read_bytes()
    rtn = _moe_quantize(src, tmp_path / "rtn.gguf", method="rtn")
    x = torch.randint(0, f.spec.vocab, (4, 64))
    ref = forward(f, x).log_softmax(-1)

    def kld(path):
        got = forward(load_gguf(path), x).log_softmax(-1)
        return (ref.exp() * (ref - got)).sum(-1).mean().item()

    assert kld(a.path) < 0.9 * kld(rtn.path), (kld(a.path), kld(rtn.path))


def test_each_expert_is_quantized_with_its_own_hessian(tmp_path):
    """A stacked tensor's packed bytes are, expert after expert, GPTQ of that expert's weights with that expert's
    Hessian (llama.cpp's expert-major rows)."""
    from twinquant.algorithms.backends import get_quantizer, quantize_to_format
    from twinquant.formats import codec_for
    from twinquant.pipeline.executor import quantize_tensor

    m = load_hf_dir(save_tiny("qwen3moe", tmp_path))
    name = "blk.0.ffn_down_exps.weight"
    W = m.get(name).clone()
    g = torch.Generator().manual_seed(0)
    Hs = []
    for e in range(8):        # a different input distribution per expert
        x = torch.randn(200, 32, generator=g) * torch.rand(32, generator=g) * (e + 1)
        Hs.append(2 * x.T @ x / 200)
    gptq = get_quantizer("gptq")
    rep = quantize_tensor(m, name, "Q4_0", gptq, None, None, Hs, [200] * 8)
    data = m.quantized[name].data
    assert data.shape == (8, 64, 18) and rep.expert_tokens == [200] * 8
    codec = codec_for("Q4_0", 32)
    for e in range(8):
        want, _ = quantize_to_format(gptq, W[e], codec, H=Hs[e], importance=torch.diagonal(Hs[e]).clone())
        assert np.array_equal(np.asarray(data[e]), np.asarray(want).reshape(64, 18)), e
    other, _ = quantize_to_format(gptq, W[0], codec, H=Hs[5], importance=torch.diagonal(Hs[5]).clone())
    assert not np.array_equal(np.asarray(data[0]), np.asarray(other).reshape(64, 18))   # the Hessian matters
    assert torch.equal(m.get(name)[3], codec.dequantize_bytes(np.asarray(data[3]), 32))


def test_cli_inspect_and_quantize_as_the_readme_shows(tmp_path, capsys):
    from twinquant.cli import main

    m = save_tiny("qwen2moe", tmp_path / "hf", tokenizer=True)
    capsys.readouterr()
    assert main(["inspect", str(m)]) == 0
    assert "experts 8, 2 per token, expert ffn 32, shared expert ffn 48" in capsys.readouterr().out
    out = tmp_path / "q.gguf"
    assert main(["quantize", str(m), "-o", str(out), "--format", "Q4_0", "--rotation", "none", "--calib-tokens",
                 "128", "--calib-ctx", "64", "--report", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "blk.0.ffn_gate_exps" in x)
    assert "experts: tokens" in line and "below 64 (pooled Hessian mixed in)" in line, line
    rep = json.loads((tmp_path / "r.json").read_text())
    tokens = {t["name"]: t["expert_tokens"] for t in rep["tensors"] if t.get("expert_tokens")}
    assert sorted(tokens) == sorted(f"blk.{i}.ffn_{r}_exps.weight" for i in range(2) for r in ("gate", "up", "down"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q4_0" and types["blk.0.ffn_gate_inp.weight"] == "F32"


@pytest.mark.parametrize("ftype,imatrix", [("Q2_K", False), ("Q4_K_M", False), ("IQ4_XS", False),
                                           ("Q2_K", True), ("Q3_K_S", True)])
def test_rtn_mix_is_byte_identical_to_llama_quantize(bindir, tmp_path, ftype, imatrix):
    """`quantize --mix llama.cpp:FTYPE --method rtn [--imatrix F]` of an 8-expert model writes llama-quantize's
    file's tensors byte for byte: its MoE type rules (8 experts: attn_v / attn_k Q8_0, attn_output Q5_K …), the
    stacked experts packed expert-major, and with an imatrix from stock llama-imatrix each expert weighted by its
    own data (experts no calibration token reached: llama.cpp's 1.0)."""
    import subprocess

    from twinquant.cli import main

    src = save_tiny("qwen3moe", tmp_path / "hf", tokenizer=True, hidden_size=256, head_dim=64,
                    moe_intermediate_size=256, num_hidden_layers=3)
    f32 = write_gguf(load_hf_dir(src), tmp_path / "m.gguf", "F32")
    extra = []
    if imatrix:
        (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog, twice: 12 and 345. " * 60)
        subprocess.run([str(bindir / "llama-imatrix"), "-m", str(f32), "-f", str(tmp_path / "t.txt"), "-c", "64",
                        "-t", "2", "-o", str(tmp_path / "im.gguf")], check=True, capture_output=True)
        extra = ["--imatrix", str(tmp_path / "im.gguf")]
    subprocess.run([str(bindir / "llama-quantize"), *extra, str(f32), str(tmp_path / "theirs.gguf"), ftype, "1"],
                   check=True, capture_output=True)
    assert main(["quantize", str(f32), "-o", str(tmp_path / "ours.gguf"), "--mix", f"llama.cpp:{ftype}",
                 "--method", "rtn", "-q", *extra]) == 0
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    ours = gguf.GGUFReader(tmp_path / "ours.gguf").tensors
    assert {t.name for t in ours} == set(theirs)
    assert theirs["blk.0.attn_v.weight"].tensor_type.name == "Q8_0"          # the 8-expert rule
    for t in ours:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), (t.name, t.tensor_type.name)


def test_quantize_refuses_a_routing_llama_cpp_does_not_compute_before_any_work(tmp_path, capsys):
    """The export check runs when quantize starts, not after the quantization (hours on a large model)."""
    from twinquant.cli import main

    path = save_tiny("qwen2moe", tmp_path / "hf", norm_topk_prob=True)
    save_tiny_tokenizer(path)
    capsys.readouterr()
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.gguf"), "--format", "Q4_0", "--calib-tokens", "128",
                 "--calib-ctx", "64"]) == 2
    err = capsys.readouterr().err
    assert "does not renormalize" in err and "[   1/" not in err       # nothing was quantized
    assert not list(tmp_path.glob("q.gguf*"))


def test_measured_target_size_treats_a_stacked_tensor_as_one_group(tmp_path):
    """measure (KL-priced) and quantize --target-bpw on a MoE model: each stacked expert tensor is one entry of the
    measurement (one type for all its experts, its cost from per-expert Hessians weighted by their tokens), the
    solver meets the target, and the file runs in stock llama.cpp."""
    from twinquant.allocation.measure import Measurement
    from twinquant.pipeline import Options, measure, quantize
    from twinquant.pipeline.recipe import load_recipe

    src = save_tiny("qwen3moe", tmp_path / "hf", tokenizer=True, hidden_size=128, moe_intermediate_size=64)
    recipe = load_recipe("default").replace(calib_tokens=512, calib_ctx=64)
    m = measure(str(src), tmp_path / "m.json", recipe, Options(quiet=True))
    entry = m.tensors["blk.1.ffn_down_exps.weight"]
    assert entry["shape"] == [8, 128, 64] and entry["anchor"] == "Q4_0"
    costs = [c["cost"] for c in entry["candidates"].values()]
    assert all(c >= 0 for c in costs) and max(costs) > 10 * min(costs)      # types really differ
    assert "kld" in entry["candidates"]["Q4_0"] and Measurement.load(tmp_path / "m.json").complete
    res = quantize(str(src), tmp_path / "q.gguf", recipe, Options(quiet=True, target_bpw=6.0,
                                                                  measurement=str(tmp_path / "m.json")))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(res.path).tensors}
    tensor_bits = 8 * sum(int(t.n_bytes) for t in gguf.GGUFReader(res.path).tensors) / res.n_params
    assert tensor_bits <= 6.0 + 1e-9
    assert len({types[f"blk.{i}.ffn_{r}_exps.weight"] for i in range(2) for r in ("gate", "up", "down")}) > 1
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    q = load_gguf(res.path)
    toks = torch.randint(3, q.spec.vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    _close_but_routing(_stock_logits(res.path, toks), forward(q, torch.tensor([toks]))[0])


@pytest.mark.parametrize("family,over", [
    ("qwen3moe", {}),
    ("deepseek_v3", dict(kv_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32, moe_intermediate_size=64,
                         q_lora_rank=64)),
])
def test_imatrix_matches_stock_llama_imatrix(bindir, tmp_path, family, over):
    """`twinquant imatrix` of a MoE model writes llama-imatrix's layout: per-expert sums and token counts for the
    stacked experts (gate's inputs are up's too), one count for DeepSeek's per-head attn_k_b / attn_v_b — the
    same entries as stock llama-imatrix's file on the same text, the same values up to rounding (a routing
    near-tie may move a token between two experts)."""
    import subprocess

    from twinquant.calibration.imatrix import Imatrix
    from twinquant.cli import main

    src = save_tiny(family, tmp_path / "hf", tokenizer=True, **over)
    f32 = write_gguf(load_hf_dir(src), tmp_path / "m.gguf", "F32")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, twice: 12 and 345. " * 60)
    subprocess.run([str(bindir / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-c", "64", "-t", "2", "-o",
                    str(tmp_path / "theirs.gguf")], check=True, capture_output=True)
    assert main(["imatrix", str(f32), "-f", str(text), "-c", "64", "-o", str(tmp_path / "ours.gguf")]) == 0
    theirs, ours = Imatrix.read(tmp_path / "theirs.gguf"), Imatrix.read(tmp_path / "ours.gguf")
    assert set(ours.names) == set(theirs.names)
    assert ours.counts["blk.1.ffn_gate_exps.weight"].shape == (8,)
    moved = 0
    for n in ours.names:
        a, b = ours.sums[n].reshape(-1), theirs.sums[n].reshape(-1)
        assert ours.counts[n].shape == theirs.counts[n].shape, n
        if ".ffn_gate_exps." in n:
            moved += int(np.abs(ours.counts[n] - theirs.counts[n]).sum()) // 2     # out of one expert, into another
        assert np.abs(a - b).max() <= 0.02 * np.abs(b).max(), n
    assert moved <= 4
    if family == "deepseek_v3":
        assert ours.counts["blk.1.attn_k_b.weight"].shape == (1,) and ours.sums["blk.1.attn_k_b.weight"].size == 128
