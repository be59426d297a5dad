"""Decode steps that read their position from the device (`KVCache.at`, what a CUDA graph replays) against the
ordinary cached forward; the graph itself against eager decoding where CUDA runs."""

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import KVCache, forward
from twinquant.runtime.generate import generate
from twinquant.runtime.graph_decode import GraphStep, graph_ready

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "deepseek_v3"])
def test_device_position_steps_match_the_cached_forward(family, tmp_path):
    """Whole-cache attention under a mask, RoPE and cache writes indexed on the device: the same logits as the
    cached prefix (MLA included: deepseek_v3 caches one latent head)."""
    m = load_hf_dir(save_tiny(family, tmp_path))
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
