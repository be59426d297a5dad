"""Our forward against `transformers` on tiny random models, and generation with vs without the KV cache."""

import pytest
import torch

from tests.tiny_models import FAMILIES, save_tiny, tiny_hf_model
from twinquant.io.hf import load_hf_dir, save_hf_dir
from twinquant.model.forward import KVCache, LinearInputs, forward
from twinquant.runtime.generate import Sampling, generate


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_loader_forward_matches_transformers(family, tmp_path):
    ref = tiny_hf_model(family)
    ref.save_pretrained(tmp_path)
    ours = load_hf_dir(tmp_path)
    assert ours.spec.arch == family.split("-")[0]
    assert ours.spec.tied_embeddings == (family == "llama-tied")
    assert ours.spec.qkv_bias == (family == "qwen2")
    assert ours.spec.qk_norm == (family == "qwen3")
    x = torch.randint(0, ours.spec.vocab, (2, 67))
    with torch.no_grad():
        want = ref(x).logits
    got = forward(ours, x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * max(1.0, want.abs().max().item())


def test_sharded_checkpoint_loads_lazily(tmp_path):
    ref = tiny_hf_model("qwen2")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = load_hf_dir(tmp_path)
    assert ours.tensors == {}                       # nothing loaded yet
    blk = ours.block(1)                             # one block materialised alone
    assert set(ours.tensors) == set(blk) and "token_embd.weight" not in ours.tensors
    ours.release_block(1)
    assert ours.tensors == {}
    x = torch.randint(0, ours.spec.vocab, (1, 33))
    with torch.no_grad():
        want = ref(x).logits
    assert torch.allclose(forward(ours, x), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bfloat16_forward_close_to_float32(family, tmp_path):
    save_tiny(family, tmp_path)
    m32 = load_hf_dir(tmp_path)
    m16 = load_hf_dir(tmp_path).to(dtype=torch.bfloat16)
    x = torch.randint(0, m32.spec.vocab, (1, 40))
    a, b = forward(m32, x), forward(m16, x)
    assert b.dtype == torch.float32 and m16.get("blk.0.attn_q.weight").dtype == torch.bfloat16
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("family", ["llama-tied", "qwen2", "qwen3"])
def test_generation_with_cache_equals_without(family, tmp_path):
    save_tiny(family, tmp_path)
    m = load_hf_dir(tmp_path)
    prompt = torch.randint(0, m.spec.vocab, (9,)).tolist()
    for s in (Sampling(), Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=3)):
        with_cache = list(generate(m, prompt, 24, s, use_cache=True))
        without = list(generate(m, prompt, 24, s, use_cache=False))
        assert with_cache == without and len(with_cache) == 24


def test_cache_logits_match_full_forward(tmp_path):
    save_tiny("qwen2", tmp_path)
    m = load_hf_dir(tmp_path)
    x = torch.randint(0, m.spec.vocab, (2, 30))
    full = forward(m, x)
    cache = KVCache.empty(m, 2, 30)
    parts = [forward(m, x[:, :11], cache=cache), forward(m, x[:, 11:12], cache=cache),
             forward(m, x[:, 12:], cache=cache)]  # multi-token continuation uses the offset causal mask
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_linear_input_hooks_see_every_linear(tmp_path):
    save_tiny("qwen3", tmp_path)
    m = load_hf_dir(tmp_path)
    hook = LinearInputs()
    forward(m, torch.randint(0, m.spec.vocab, (1, 10)), hook=hook)
    linears = {n for n in m.tensor_names() if n.endswith(".weight") and m.get(n).ndim == 2} - {"token_embd.weight"}
    assert set(hook.inputs) == linears
    assert hook.inputs["blk.1.ffn_down.weight"][0].shape == (10, m.spec.intermediate)
    assert torch.equal(hook.inputs["blk.0.attn_q.weight"][0], hook.inputs["blk.0.attn_v.weight"][0])  # one input


def test_hf_directory_round_trip(tmp_path):
    save_tiny("qwen2", tmp_path / "a")
    m = load_hf_dir(tmp_path / "a")
    save_hf_dir(m, tmp_path / "b")
    m2 = load_hf_dir(tmp_path / "b")
    x = torch.randint(0, m.spec.vocab, (1, 20))
    assert torch.equal(forward(m, x), forward(m2, x))


def test_fused_shared_input_linears_match_separate(tmp_path):
    save_tiny("qwen2", tmp_path)
    m = load_hf_dir(tmp_path)
    x = torch.randint(0, m.spec.vocab, (1, 25))
    fused = forward(m, x)
    group = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight")
    assert m.fused(group) is not None
    m.set("blk.0.attn_k.weight", m.get("blk.0.attn_k.weight").clone())   # a stage replaces one member
    assert m.fused(group) is None                                           # -> separate matmuls
    assert torch.allclose(forward(m, x), fused, atol=1e-5)
    m.set("blk.0.attn_k.weight", m.get("blk.0.attn_k.weight") * 2)
    assert not torch.allclose(forward(m, x), fused, atol=1e-3)             # the replacement is used


def test_residual_hook_sees_every_slot(tmp_path):
    save_tiny("llama", tmp_path)
    m = load_hf_dir(tmp_path)
    seen = {}
    x = torch.randint(0, m.spec.vocab, (1, 12))
    forward(m, x, residual_hook=lambda i, h: seen.setdefault(i, h.clone()))
    assert sorted(seen) == [0, 1, 2] and seen[0].shape == (1, 12, m.spec.hidden)
    assert torch.equal(seen[0], m.get("token_embd.weight")[x])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_yarn_rope_matches_transformers_and_stock_llama_cpp(family, tmp_path):
    """YaRN RoPE scaling (as long-context Qwen2.5 configs set it): frequencies mixed by the ramp, cos/sin scaled by
    0.1·ln(factor) + 1 — transformers' logits, and stock llama.cpp's on the exported file."""
    import numpy as np

    from tests.tiny_models import save_tiny_tokenizer
    from twinquant.io.gguf_write import write_gguf

    yarn = {"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ref = tiny_hf_model(family, rope_scaling=yarn, max_position_embeddings=256)
    ref.save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    m = load_hf_dir(tmp_path)
    assert (m.spec.yarn_factor, m.spec.yarn_orig_ctx, m.spec.yarn_mscale) == (4.0, 64, 0.0)
    x = torch.randint(3, m.spec.vocab, (1, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits
    ours = forward(m, x)
    assert ((ours - want).abs().max() / want.abs().max()) < 1e-4
    import llama_cpp

    path = write_gguf(m, tmp_path / "m.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(x[0, :80].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:80], dtype=np.float32))
    assert ((theirs - ours[0, :80]).abs().max() / ours.abs().max()) < 1e-4
