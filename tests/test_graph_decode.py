"""Decode steps that read their position from the device (`KVCache.at`, what a CUDA graph replays) against the
ordinary cached forward; the graph itself against eager decoding where CUDA runs."""

import warnings

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.io.hf import load_hf_dir
from twinquant.model.copies import ParamStore
from twinquant.model.forward import KVCache, forward
from twinquant.model.topology import parse_topology
from twinquant.runtime import generate as gen_mod
from twinquant.runtime import graph_decode
from twinquant.runtime.generate import generate
from twinquant.runtime.graph_decode import GraphStep, graph_ready
from twinquant.transforms.hadamard import RandomizedHadamard

CUDA = torch.cuda.is_available()


def _duplicated(m):
    """A twinquant file's full semantics: a serial copy (its own KV-cache entry), a parallel pair, 4-bit
    activation quantization in every copy, online R3/R4 transforms."""
    m.layout, m.dup_params = parse_topology({"layer_0": {"type": "serial", "copies": 2, "alpha": [0.5]},
                                             "layer_1": {"type": "parallel", "copies": 2}}, m.spec.n_layers,
                                            ParamStore(base={"act_bits": 4}))
    return _rotated(m)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "deepseek_v3", "llama-duplicated"])
def test_device_position_steps_match_the_cached_forward(family, tmp_path):
    """Whole-cache attention under a mask, RoPE and cache writes indexed on the device: the same logits as the
    cached prefix (MLA included: deepseek_v3 caches one latent head; duplicated layers with their own cache
    entries, activation quantization and online transforms)."""
    m = load_hf_dir(save_tiny(family.split("-")[0], tmp_path))
    if family.endswith("duplicated"):
        m = _duplicated(m.materialize())
        assert len(m.layout.executions()) == m.spec.n_layers + 2
    x = torch.randint(0, m.spec.vocab, (1, 14), generator=torch.Generator().manual_seed(0))
    plain, static = KVCache.empty(m, 1, 20), KVCache.empty(m, 1, 20)
    forward(m, x[:, :6], cache=plain)
    forward(m, x[:, :6], cache=static)
    static.at = torch.zeros((), dtype=torch.long)
    for t in range(6, 14):
        want = forward(m, x[:, t:t + 1], cache=plain)
        static.at.fill_(static.pos)
        got = forward(m, x[:, t:t + 1], cache=static)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert static.pos == plain.pos == 14
    # the untouched tail of the cache stays masked: garbage there changes nothing
    for k in static.k:
        k[:, :, 15:] = 1e4
    static.at.fill_(static.pos)
    torch.testing.assert_close(forward(m, x[:, :1], cache=static), forward(m, x[:, :1], cache=plain), rtol=0,
                               atol=2e-5)


def test_graph_ready_says_why_not(tmp_path):
    m = load_hf_dir(save_tiny("qwen2", tmp_path / "a"))
    if not CUDA:
        assert graph_ready(m) == "CUDA graphs need a CUDA device"
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            GraphStep(m, KVCache.empty(m, 1, 8))
    moe = load_hf_dir(save_tiny("deepseek_v3", tmp_path / "b"))
    if CUDA:
        moe = moe.to(device="cuda")
    assert graph_ready(moe) == ("routed experts choose their tokens on the host" if CUDA else
                                "CUDA graphs need a CUDA device")


def test_a_step_that_cannot_be_captured_decodes_eagerly_and_says_so(tmp_path, monkeypatch):
    m = load_hf_dir(save_tiny("qwen2", tmp_path))
    prompt = [5, 9, 2, 7]
    eager = list(generate(m, prompt, 6, graphs=False))

    def refuse(model, cache):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(graph_decode, "graph_ready", lambda model: None)
    monkeypatch.setattr(graph_decode, "GraphStep", refuse)
    with pytest.warns(UserWarning, match="without a CUDA graph.*RuntimeError: operation not permitted"):
        assert list(gen_mod.generate(m, prompt, 6)) == eager


def _rotated(m):
    """Online transforms as a rotated file carries them (R3 on q/k, R4 before ffn_down): captured too."""
    m.qk_transform = RandomizedHadamard(m.spec.head_dim, seed=1)
    for i in range(m.spec.n_layers):
        m.input_transforms[f"blk.{i}.ffn_down.weight"] = RandomizedHadamard(m.spec.intermediate, seed=2 + i)
    return m


@pytest.mark.skipif(not CUDA, reason="a CUDA graph needs a GPU (run on the lent device)")
@pytest.mark.parametrize("semantics", [_rotated, _duplicated])
def test_graph_decode_with_twinquant_semantics(semantics, tmp_path):
    m = semantics(load_hf_dir(save_tiny("qwen2", tmp_path)).materialize().to(device="cuda"))
    prompt = [3, 8, 1, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)         # a fallback to eager decoding would warn
        assert list(generate(m, prompt, 12, graphs=True)) == list(generate(m, prompt, 12, graphs=False))


@pytest.mark.skipif(not CUDA, reason="a CUDA graph needs a GPU (run on the lent device)")
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_graph_decode_generates_what_eager_decoding_does(family, tmp_path):
    m = load_hf_dir(save_tiny(family, tmp_path)).to(device="cuda")
    prompt = torch.randint(0, m.spec.vocab, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    eager = list(generate(m, prompt, 20, graphs=False))
    graph = list(generate(m, prompt, 20, graphs=True))
    assert graph == eager and len(graph) == 20
    cache = KVCache.empty(m, 1, 12)
    forward(m, torch.tensor([prompt]), cache=cache)
    step = GraphStep(m, cache)
    ref = KVCache.empty(m, 1, 12)
    forward(m, torch.tensor([prompt]), cache=ref)
    for t in (5, 9, 3):
        torch.testing.assert_close(step(t), forward(m, torch.tensor([[t]]), cache=ref)[0, -1], rtol=0, atol=1e-4)
    assert cache.pos == ref.pos == 10


@pytest.mark.skipif(not CUDA, reason="a CUDA graph needs a GPU (run on the lent device)")
def test_graph_decode_with_int8_x_handed_over_generates_what_eager_decoding_does(tmp_path, monkeypatch):
    """TWINQUANT_Q8=Q2_K on a Q2_K file: the captured step multiplies x quantized by the kernels that made it (the
    attention kernel's only at a device position, so only in the graph) and generates what eager decoding does,
    whose every GEMV quantizes its own x the same way."""
    from tests.tiny_models import save_q2k_gguf
    from twinquant.runtime.packed_weights import load_for_decode

    monkeypatch.setenv("TWINQUANT_Q8", "Q2_K")
    m, counts = load_for_decode(save_q2k_gguf(tmp_path), torch.float32, "cuda")
    assert counts["Q2_K"] == 7
    prompt = torch.randint(0, m.spec.vocab, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)         # a fallback to eager decoding would warn
        assert list(generate(m, prompt, 16, graphs=True)) == list(generate(m, prompt, 16, graphs=False))

