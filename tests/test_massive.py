"""The massive-activation detector finds planted massive activations and nothing on clean data."""

import torch

from tests.tiny_models import save_tiny
from twinquant.io.hf import load_hf_dir
from twinquant.rotation.massive import detect_massive, massive_token_mask, quantize_keeping_massive
from twinquant.rotation.optimize import int_rtn_rows


def test_clean_model_has_no_massive_activations(tmp_path):
    m = load_hf_dir(save_tiny("llama", tmp_path / "m", hidden_size=128, intermediate_size=256))
    torch.manual_seed(0)
    windows = torch.randint(0, m.spec.vocab, (4, 64))
    report = detect_massive(m, windows, progress=False)
    assert not report.any and report.channels() == []
    assert len(report.layers) == m.spec.n_layers + 1


def test_planted_massive_activation_is_found(tmp_path):
    m = load_hf_dir(save_tiny("qwen2", tmp_path / "m", hidden_size=128, intermediate_size=256)).materialize()
    token, channel = 17, 42
    emb = m.get("token_embd.weight").clone()
    emb[token, channel] = 500.0 * emb.abs().max()           # one token, one channel, far above the rest
    m.set("token_embd.weight", emb)
    torch.manual_seed(0)
    windows = torch.randint(20, m.spec.vocab, (4, 64))
    windows[1, 5] = token
    windows[3, 0] = token
    report = detect_massive(m, windows, progress=False)
    first = report.layers[0]
    assert {(f["window"], f["position"]) for f in first.flagged} == {(1, 5), (3, 0)}
    assert all(f["channel"] == channel and f["token"] == token for f in first.flagged)
    assert report.channels() == [channel]
    report.write_json(tmp_path / "r.json")
    report.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_quantization_keeps_massive_tokens_apart():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[3, 7] = 1000.0
    q = int_rtn_rows(4)

    def per_tensor(t):   # one scale for the whole tensor: the massive token would crush the others
        s = t.abs().max() / 7
        return (t / s).round().clamp(-8, 7) * s

    mask = massive_token_mask(x, 100.0)
    assert mask.tolist() == [i == 3 for i in range(64)]
    naive = per_tensor(x)
    kept = quantize_keeping_massive(x, per_tensor, 100.0, "keep")
    own = quantize_keeping_massive(x, per_tensor, 100.0, "own_scale")
    err = lambda y: (y - x)[~mask].pow(2).mean()  # noqa: E731
    assert err(kept) < 0.05 * err(naive) and torch.equal(kept[3], x[3])
    assert torch.allclose(own[~mask], kept[~mask]) and not torch.equal(own[3], x[3])
    assert q(x).shape == x.shape
