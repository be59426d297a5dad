"""Evaluation protocols, saved reference log-probs and KL statistics."""

import math

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.eval.logits_file import LogitsFile
from twinquant.eval.perplexity import compute_logprobs, evaluate, make_windows, window_logprobs
from twinquant.eval.stats import Accumulator, format_kld
from twinquant.io.hf import load_hf_dir


def test_llama_cpp_protocol_windows():
    ids = list(range(100, 100 + 1000))
    w = make_windows(ids, 128, None, "llama.cpp", bos_id=1, add_bos=True)
    assert w.tokens.shape == (7, 128)               # 1000 // 128 windows
    assert (w.tokens[:, 0] == 1).all()              # BOS replaces each window's first token
    assert w.tokens[1, 1].item() == 100 + 129
    assert w.first == 64 and w.scored == 63         # second half, last position predicts nothing
    assert w.targets(2).tolist() == ids[2 * 128 + 65: 3 * 128]
    w2 = make_windows(ids, 128, 3, "llama.cpp", bos_id=1, add_bos=False)
    assert w2.tokens.shape == (3, 128) and w2.tokens[1, 0].item() == 228


def test_skip_chunks_starts_later_in_the_same_cut():
    ids = list(range(100, 100 + 1000))
    whole = make_windows(ids, 128, None, "llama.cpp", bos_id=1, add_bos=True)
    later = make_windows(ids, 128, 2, "llama.cpp", bos_id=1, add_bos=True, skip=3)
    assert torch.equal(later.tokens, whole.tokens[3:5])
    assert later.tokens[0, 1].item() == 100 + 3 * 128 + 1
    assert make_windows(ids, 128, None, "sliding", skip=6).tokens.shape == (1, 128)
    with pytest.raises(TwinquantError, match="none is left after skipping 7"):
        make_windows(ids, 128, None, "llama.cpp", skip=7)
    with pytest.raises(TwinquantError, match="--skip-chunks"):
        make_windows(ids, 128, None, "llama.cpp", skip=-1)


def test_skip_chunks_scores_a_measurements_held_out_windows(tmp_path):
    """`perplexity --skip-chunks N` with N = the calibration windows scores the windows `measure` holds out."""
    from tests.paths import CALIB
    from twinquant.calibration.windows import load_calibration
    from twinquant.eval.perplexity import windows_for_text

    model = load_hf_dir(save_tiny("llama", tmp_path / "m", tokenizer=True, hidden_size=64,
                                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                  num_hidden_layers=1))
    cal = load_calibration(model, CALIB, n_tokens=640, ctx=64, heldout=4)
    assert cal.windows.shape[0] == 10 and cal.heldout.shape[0] == 4
    w = windows_for_text(model, CALIB.read_text(encoding="utf-8", errors="replace"), 64, 4, "llama.cpp", skip=10)
    assert torch.equal(w.tokens, cal.heldout)


def test_sliding_protocol_scores_every_token():
    ids = list(range(300))
    w = make_windows(ids, 100, None, "sliding")
    assert w.tokens.shape == (3, 100) and w.first == 0 and w.scored == 99
    assert w.tokens[2, 0].item() == 200


@pytest.mark.parametrize("n,protocol", [(150, "llama.cpp"), (99, "sliding")])
def test_text_shorter_than_needed_is_an_error(n, protocol):
    with pytest.raises(TwinquantError, match="needs at least"):
        make_windows(list(range(n)), 100, None, protocol)


def test_bad_protocol_and_chunks():
    with pytest.raises(TwinquantError, match="unknown protocol"):
        make_windows(list(range(1000)), 100, None, "strided")
    with pytest.raises(TwinquantError, match="chunks"):
        make_windows(list(range(1000)), 100, 0, "sliding")


@pytest.fixture()
def tiny(tmp_path):
    save_tiny("qwen2", tmp_path / "m")
    return load_hf_dir(tmp_path / "m")


def test_perplexity_is_exp_of_mean_nll(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.spec.vocab, (700,)).tolist()
    w = make_windows(ids, 64, None, "sliding")
    res = evaluate(tiny, w, progress=False)
    nll = []
    for i in range(w.tokens.shape[0]):
        lp = window_logprobs(tiny, w, i)
        nll.append(-lp.gather(1, w.targets(i)[:, None])[:, 0])
    assert res["tokens_scored"] == 10 * 63
    assert math.isclose(res["ppl"], math.exp(torch.cat(nll).double().mean().item()), rel_tol=1e-9)
    assert res["ppl_err"] > 0


def test_saved_reference_round_trip_and_kld(tiny, tmp_path):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny.spec.vocab, (600,)).tolist()
    w = make_windows(ids, 64, 5, "llama.cpp")
    base = tmp_path / "ref.logprobs"
    res0 = evaluate(tiny, w, save_logprobs=str(base), progress=False)
    ref = LogitsFile.open(base)
    assert ref.header["chunks"] == 5 and ref.logprobs.shape == (5, 31, tiny.spec.vocab)
    assert torch.allclose(ref.chunk(0), window_logprobs(tiny, w, 0), atol=2e-2)   # float16 storage

    same = evaluate(tiny, w, ref=ref, progress=False)                # a model against itself
    assert same["kld_mean"] < 1e-4 and same["same_top"] == 1.0
    assert math.isclose(same["ref_ppl"], res0["ppl"], rel_tol=1e-3)

    noisy = load_hf_dir(tiny.source.path)                            # perturbed weights -> positive KLD
    noisy.set("blk.0.ffn_down.weight", noisy.get("blk.0.ffn_down.weight") * 1.5)
    res = evaluate(noisy, w, ref=ref, progress=False)
    assert res["kld_mean"] > 100 * same["kld_mean"] and res["kld_p99"] >= res["kld_median"] >= 0
    assert 0 <= res["same_top"] < 1
    direct = evaluate(noisy, w, ref=tiny, progress=False)           # reference model run alongside
    assert math.isclose(direct["kld_mean"], res["kld_mean"], rel_tol=0.05)
    in_memory = compute_logprobs(tiny, w)                          # the same reference without a file
    assert in_memory.header == ref.header and (in_memory.logprobs == ref.logprobs[:]).all()


def test_reference_made_on_other_tokens_is_refused(tiny, tmp_path):
    ids = list(range(10, 10 + 256))
    w = make_windows(ids, 64, None, "sliding")
    evaluate(tiny, w, save_logprobs=str(tmp_path / "r"), progress=False)
    other = make_windows(list(range(20, 20 + 256)), 64, None, "sliding")
    with pytest.raises(TwinquantError, match="different tokens"):
        evaluate(tiny, other, ref=LogitsFile.open(tmp_path / "r"), progress=False)
    with pytest.raises(TwinquantError, match="protocol"):
        evaluate(tiny, make_windows(ids, 64, None, "llama.cpp"), ref=LogitsFile.open(tmp_path / "r"), progress=False)


def test_kld_statistics_against_direct_formula():
    torch.manual_seed(0)
    a = torch.log_softmax(torch.randn(50, 11), -1)
    b = torch.log_softmax(torch.randn(50, 11), -1)
    tgt = torch.randint(0, 11, (50,))
    acc = Accumulator()
    acc.add(a, b, tgt)
    s = acc.summary()
    kld = (b.exp() * (b - a)).sum(-1)
    assert math.isclose(s["kld_mean"], kld.mean().item(), rel_tol=1e-5)
    assert math.isclose(s["kld_max"], kld.max().item(), rel_tol=1e-5)
    assert math.isclose(s["same_top"], (a.argmax(-1) == b.argmax(-1)).double().mean().item())
    assert "Same top p" in format_kld(s)
