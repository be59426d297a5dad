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
    import llama_cpp

    m = with_tokenizer
    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    toks = torch.randint(3, m.spec.vocab, (40,)).tolist()
    llm.eval(toks)
    theirs = torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))
    _close(theirs, forward(m, torch.tensor([toks]))[0])


def test_export_refuses_a_routing_llama_cpp_does_not_compute(tmp_path):
    path = save_tiny("qwen2moe", tmp_path / "hf", norm_topk_prob=True)
    save_tiny_tokenizer(path)
    with pytest.raises(TwinquantError, match="does not renormalize"):
        write_gguf(load_hf_dir(path), tmp_path / "m.gguf", "F32")
    assert list(tmp_path.glob("m.gguf*")) == []


@pytest.mark.parametrize("argv", [
    ["quantize", "{m}", "-o", "{o}/q.gguf"],
    ["measure", "{m}", "-o", "{o}/m.json"],
    ["rotate", "{m}", "-o", "{o}/r.gguf"],
    ["imatrix", "{m}", "-f", "{t}", "-o", "{o}/i.gguf"],
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
