"""Importance matrices against stock llama.cpp: llama-imatrix is the oracle for what is collected and for the file
formats, llama-quantize for acceptance; on a tiny random llama (256-wide, so K-quants apply) exported to f32 GGUF.

Tolerance of our sums against llama-imatrix's (run with `-fa off -ctk f32 -ctv f32`, i.e. an fp32 computation like
ours): ggml adds x² token by token into a float32 accumulator, we sum in float64. For N positive terms a float32
running sum is within N·2⁻²⁴ (relative) of the exact sum, which bounds the difference (N = 2112 tokens: 1.3e-4);
the per-token activations themselves agree to ~1e-6 (same fp32 math, other operation order). Observed: ~1e-5.
With llama-imatrix's defaults (F16 KV cache, flash attention) the values move by ~1e-3: checked loosely.
"""

import random
import shutil
import struct
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from tests.paths import ROOT
from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.calibration.imatrix import (
    Imatrix,
    collect_imatrix,
    coverage,
    format_statistics,
    statistics,
)

pytestmark = pytest.mark.slow
CTX = 64
EXACT = ["-fa", "off", "-ctk", "f32", "-ctv", "f32"]   # fp32 attention and KV cache, as our forward
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _run(cmd, cwd, ok=True):
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if ok:
        assert p.returncode == 0, (cmd, p.stdout[-3000:], p.stderr[-3000:])
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny model as f32 GGUF, a calibration text of a few KB, and the model loaded by twinquant."""
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.load import load_model

    d = tmp_path_factory.mktemp("imatrix")
    hf = save_tiny("llama", d / "hf", tokenizer=True, hidden_size=256, intermediate_size=512,
                   num_attention_heads=4, num_key_value_heads=2)
    write_gguf(load_model(hf), d / "m.gguf", "F32")
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "twice", "and", "12", "345", "river",
             "mountain", "cloud", "paper", "stone", "light", "music"]
    lines = [" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(60)]
    (d / "calib.txt").write_text("\n".join(lines) + "\n")
    model = load_model(d / "m.gguf", materialize=True)
    return d, model


@pytest.fixture(scope="module")
def llama_runs(bindir, work):
    """llama-imatrix twice on the same text: fp32 attention with --process-output, and its defaults."""
    d, _ = work
    imx = bindir / "llama-imatrix"
    _run([imx, "-m", "m.gguf", "-f", "calib.txt", "-c", CTX, "-t", 1, "-o", "exact.gguf", "--process-output",
          *EXACT], d)
    _run([imx, "-m", "m.gguf", "-f", "calib.txt", "-c", CTX, "-t", 1, "-o", "default.gguf"], d)
    return d / "exact.gguf", d / "default.gguf"


def _windows(model, text_path):
    from twinquant.eval.perplexity import make_windows

    text = text_path.read_text()
    text = text.removesuffix("\n")        # llama.cpp's -f drops one trailing newline
    ids = model.tokenizer.encode(text)
    return ids, make_windows(ids, CTX, None, "llama.cpp", model.tokenizer.bos_id, model.tokenizer.add_bos).tokens


@pytest.fixture(scope="module")
def ours(work):
    d, model = work
    _, windows = _windows(model, d / "calib.txt")
    return collect_imatrix(model, windows, progress=False, process_output=True, datasets=["calib.txt"])


def test_reads_llama_imatrix_gguf_and_rewrites_it_byte_for_byte(llama_runs, tmp_path):
    exact, default = llama_runs
    imx = Imatrix.read(default)
    blk = {f"blk.{i}.{t}.weight" for i in range(2) for t in LINEARS}
    assert set(imx.names) == blk                              # output.weight only with --process-output
    assert set(Imatrix.read(exact).names) == blk | {"output.weight"}
    n_tok = imx.counts["blk.0.attn_q.weight"][0]
    assert n_tok % CTX == 0 and imx.chunk_count == n_tok // CTX and imx.chunk_size == CTX
    assert all(list(c) == [n_tok] for c in imx.counts.values())
    assert imx.datasets == ["calib.txt"]
    s = imx.sums
    assert s["blk.0.attn_q.weight"].shape == (256,) and s["blk.1.ffn_down.weight"].shape == (512,)
    assert np.array_equal(s["blk.1.attn_q.weight"], s["blk.1.attn_v.weight"])      # shared inputs
    assert np.array_equal(s["blk.0.ffn_gate.weight"], s["blk.0.ffn_up.weight"])
    np.testing.assert_array_equal(imx.importance("blk.0.attn_q.weight"),
                                  s["blk.0.attn_q.weight"] / np.float32(n_tok))
    imx.write_gguf(tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == default.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_collect_matches_llama_imatrix(llama_runs, work, ours):
    import llama_cpp

    d, model = work
    exact, default = llama_runs
    ids, windows = _windows(model, d / "calib.txt")
    ll = llama_cpp.Llama(model_path=str(d / "m.gguf"), vocab_only=True, verbose=False)
    text = (d / "calib.txt").read_text()[:-1]
    assert ids == ll.tokenize(text.encode(), add_bos=True, special=False)   # same tokens as llama-imatrix's
    theirs = Imatrix.read(exact)
    n_tok = windows.numel()
    assert ours.names == theirs.names and ours.chunk_count == theirs.chunk_count == windows.shape[0]
    assert ours.chunk_size == CTX
    rtol = n_tok * 2.0 ** -24 + 1e-5
    for name in theirs.names:
        assert ours.counts[name][0] == theirs.counts[name][0] == n_tok, name
        np.testing.assert_allclose(ours.sums[name], theirs.sums[name], rtol=rtol, err_msg=name)
        np.testing.assert_allclose(ours.importance(name), theirs.importance(name), rtol=rtol, err_msg=name)
    loose = Imatrix.read(default)
    for name in loose.names:
        np.testing.assert_allclose(ours.sums[name], loose.sums[name], rtol=1e-2, err_msg=name)
    cov = coverage(ours, model.tensor_names())
    assert cov["blk.1.ffn_down.weight"] == {"present": True, "count": n_tok, "partial": False}
    assert not cov["token_embd.weight"]["present"] and cov["output.weight"]["present"]
    without_head = collect_imatrix(model, windows[:2], progress=False)
    assert "output.weight" not in without_head and without_head.chunk_count == 2


def test_llama_quantize_accepts_ours_and_matches_on_identical_values(bindir, llama_runs, work, ours, tmp_path):
    d, _ = work
    _, default = llama_runs
    q = bindir / "llama-quantize"
    # our own values: accepted, and they change the quantization
    (tmp_path / "own").mkdir()
    ours.write_gguf(tmp_path / "own" / "imatrix.gguf")
    p = _run([q, "--imatrix", "imatrix.gguf", d / "m.gguf", "out.gguf", "Q4_K", 1], tmp_path / "own")
    assert "loaded 15 importance matrix entries" in p.stdout + p.stderr
    _run([q, d / "m.gguf", "plain.gguf", "Q4_K", 1], tmp_path / "own")
    with_imx = gguf.GGUFReader(tmp_path / "own" / "out.gguf")
    plain = gguf.GGUFReader(tmp_path / "own" / "plain.gguf")
    a = {t.name: t for t in with_imx.tensors}["blk.0.ffn_up.weight"]
    b = {t.name: t for t in plain.tensors}["blk.0.ffn_up.weight"]
    assert a.tensor_type.name == "Q4_K" and not np.array_equal(a.data, b.data)
    del with_imx, plain
    # llama-imatrix's values written back by us: the same quantized file, byte for byte
    for sub in ("theirs", "rewritten"):
        (tmp_path / sub).mkdir()
    shutil.copy(default, tmp_path / "theirs" / "imatrix.gguf")
    Imatrix.read(default).write_gguf(tmp_path / "rewritten" / "imatrix.gguf")
    for sub in ("theirs", "rewritten"):
        _run([q, "--imatrix", "imatrix.gguf", d / "m.gguf", "out.gguf", "Q4_K", 1], tmp_path / sub)
    assert (tmp_path / "theirs" / "out.gguf").read_bytes() == (tmp_path / "rewritten" / "out.gguf").read_bytes()


def test_legacy_dat(bindir, llama_runs, work, tmp_path):
    d, _ = work
    _, default = llama_runs
    g = Imatrix.read(default)
    # llama-imatrix converting its GGUF to .dat == our writer
    _run([bindir / "llama-imatrix", "-m", d / "m.gguf", "--in-file", default, "-c", CTX, "--output-format", "dat",
          "-o", tmp_path / "theirs.dat"], tmp_path)
    g.write_dat(tmp_path / "ours.dat")
    assert (tmp_path / "ours.dat").read_bytes() == (tmp_path / "theirs.dat").read_bytes()
    dat = Imatrix.read(tmp_path / "theirs.dat")
    assert dat.names == g.names and dat.chunk_count == g.chunk_count and dat.datasets == ["calib.txt"]
    assert dat.counts["blk.0.attn_q.weight"][0] == g.chunk_count            # ncall
    for n in g.names:
        np.testing.assert_allclose(dat.importance(n), g.importance(n), rtol=1e-6)
    # read as llama-imatrix's --in-file does: sums and counts scaled by its chunk size
    scaled = Imatrix.read(tmp_path / "theirs.dat", chunk_size=CTX)
    assert scaled.counts["blk.0.attn_q.weight"][0] == g.counts["blk.0.attn_q.weight"][0]
    np.testing.assert_allclose(scaled.sums["blk.1.ffn_down.weight"], g.sums["blk.1.ffn_down.weight"], rtol=1e-6)
    # round trip: .dat -> Imatrix -> .dat
    dat.write_dat(tmp_path / "again.dat")
    again = Imatrix.read(tmp_path / "again.dat")
    for n in g.names:
        np.testing.assert_allclose(again.importance(n), dat.importance(n), rtol=1e-6)
    # llama-quantize reads our .dat too
    _run([bindir / "llama-quantize", "--imatrix", tmp_path / "ours.dat", d / "m.gguf", tmp_path / "q.gguf",
          "Q4_K", 1], tmp_path)


def test_dat_round_trip_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    imx = Imatrix({"blk.0.attn_q.weight": rng.random(32, dtype=np.float32) * 100,
                   "blk.0.ffn_down.weight": rng.random(64, dtype=np.float32),
                   "blk.0.unused.weight": np.zeros(8, np.float32)},
                  {"blk.0.attn_q.weight": np.array([640]), "blk.0.ffn_down.weight": np.array([640]),
                   "blk.0.unused.weight": np.array([0])}, ["a.txt", "b.txt"], 10, 64)
    imx.write_dat(tmp_path / "x.dat")
    back = Imatrix.read(tmp_path / "x.dat")
    assert back.names == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]    # no data: skipped, as llama.cpp
    assert back.datasets == ["b.txt"] and back.chunk_count == 10
    for n in back.names:
        np.testing.assert_allclose(back.importance(n), imx.importance(n), rtol=1e-6)
    assert np.array_equal(imx.importance("blk.0.unused.weight"), np.ones(8, np.float32))


def test_merge(bindir, llama_runs, work, tmp_path):
    d, _ = work
    exact, default = llama_runs
    a, b = Imatrix.read(default), Imatrix.read(exact)
    m = a.merge(b)
    n = a.counts["blk.0.attn_q.weight"][0]
    assert m.counts["blk.0.attn_q.weight"][0] == 2 * n and m.chunk_count == 2 * n // CTX
    assert "output.weight" in m and m.counts["output.weight"][0] == n
    assert m.datasets == ["calib.txt", "calib.txt"]
    # llama-imatrix merging the same two files writes the same bytes
    _run([bindir / "llama-imatrix", "-m", d / "m.gguf", "--in-file", f"{default},{exact}", "-c", CTX,
          "-o", tmp_path / "theirs.gguf"], tmp_path)
    m.write_gguf(tmp_path / "ours.gguf")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()
    # per-matrix counts broadcast against a single count; sizes must agree
    experts = Imatrix({"x.weight": np.ones((2, 4), np.float32)}, {"x.weight": np.array([3, 5])}, [], 0, 1)
    dense = Imatrix({"x.weight": np.ones(8, np.float32)}, {"x.weight": np.array([2])}, [], 0, 1)
    both = dense.merge(experts)
    assert list(both.counts["x.weight"]) == [5, 7] and both.sums["x.weight"].shape == (2, 4)
    np.testing.assert_array_equal(both.importance("x.weight"), np.array([[2 / 5] * 4, [2 / 7] * 4], np.float32))
    with pytest.raises(TwinquantError, match="x.weight"):
        dense.merge(Imatrix({"x.weight": np.ones(4, np.float32)}, {"x.weight": np.array([1])}, [], 0, 1))


def test_expert_shaped_gguf_round_trip(tmp_path):
    imx = Imatrix({"blk.0.ffn_up_exps.weight": np.arange(12, dtype=np.float32).reshape(3, 4)},
                  {"blk.0.ffn_up_exps.weight": np.array([4, 0, 2])}, [], 1, 4)
    imx.write_gguf(tmp_path / "e.gguf")        # empty datasets array is still written (llama-quantize needs it)
    r = gguf.GGUFReader(tmp_path / "e.gguf")
    assert "imatrix.datasets" in r.fields and "general.architecture" not in r.fields
    assert [list(t.shape) for t in r.tensors] == [[4, 3], [1, 3]]
    del r
    back = Imatrix.read(tmp_path / "e.gguf")
    assert back.datasets == [] and list(back.counts["blk.0.ffn_up_exps.weight"]) == [4, 0, 2]
    imp = back.importance("blk.0.ffn_up_exps.weight")
    np.testing.assert_array_equal(imp[1], np.ones(4, np.float32))
    np.testing.assert_array_equal(imp[2], np.arange(8, 12, dtype=np.float32) / 2)
    assert coverage(back, ["blk.0.ffn_up_exps.weight"])["blk.0.ffn_up_exps.weight"]["partial"]


def test_corrupt_files(llama_runs, work, tmp_path):
    d, _ = work
    _, default = llama_runs
    good = default.read_bytes()
    cases = {"cut.gguf": good[: len(good) - 100], "header.gguf": good[:40], "garbage.gguf": b"\x07" * 64,
             "empty.dat": b"", "huge.dat": struct.pack("<i", 10 ** 8) + b"\0" * 20}
    g = Imatrix.read(default)
    g.write_dat(tmp_path / "ok.dat")
    dat = (tmp_path / "ok.dat").read_bytes()
    cases["cut.dat"] = dat[: len(dat) // 2]
    cases["trailer.dat"] = dat[:-3]
    bad_len = bytearray(dat)
    bad_len[4:8] = struct.pack("<i", 1 << 30)
    cases["badlen.dat"] = bytes(bad_len)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TwinquantError):
            Imatrix.read(tmp_path / name)
    with pytest.raises(TwinquantError, match="not an imatrix"):
        Imatrix.read(d / "m.gguf")                       # a model, not an imatrix
    with pytest.raises(TwinquantError, match="no such"):
        Imatrix.read(tmp_path / "missing.gguf")


def test_streamed_collection_is_byte_identical(work, tmp_path):
    """A lazily loaded model is run block by block (`every` windows at a time, each block read and released per
    group): the sums, counts and written bytes equal the window-by-window run on the materialized model; the
    snapshots come at the group ends and hold every tensor for the windows done so far."""
    from twinquant.io.load import load_model

    d, model = work
    _, windows = _windows(model, d / "calib.txt")
    ours = collect_imatrix(model, windows, progress=False, process_output=True, datasets=["calib.txt"],
                           stream=False)
    lazy = load_model(d / "m.gguf")
    assert lazy.source is not None and not lazy.tensors
    seen = []
    streamed = collect_imatrix(lazy, windows, progress=False, process_output=True, datasets=["calib.txt"],
                               every=3, on_chunk=lambda done, snap: seen.append((done, snap())))
    assert not lazy.tensors                                # every block released after its group
    assert [done for done, _ in seen] == [min(k, windows.shape[0]) for k in range(3, windows.shape[0] + 3, 3)]
    assert streamed.names == ours.names and streamed.chunk_count == ours.chunk_count
    for name in ours.names:
        assert np.array_equal(streamed.sums[name], ours.sums[name]), name
        assert np.array_equal(streamed.counts[name], ours.counts[name]), name
    ours.write_gguf(tmp_path / "a.gguf")
    streamed.write_gguf(tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    first = seen[0][1]                                     # the first group's save: 3 windows, all tensors
    assert first.chunk_count == 3 and first.names == ours.names
    alone = collect_imatrix(model, windows[:3], progress=False, process_output=True, datasets=["calib.txt"],
                            stream=False)
    for name in ours.names:
        assert np.array_equal(first.sums[name], alone.sums[name]), name


def _parser():
    from twinquant.cli import build_parser

    return build_parser()


def test_cli_command(llama_runs, work, tmp_path, capsys):
    d, _ = work
    _, default = llama_runs
    out = tmp_path / "imx.gguf"
    args = _parser().parse_args(["imatrix", str(d / "m.gguf"), "-f", str(d / "calib.txt"), "-c", str(CTX),
                                 "-o", str(out), "--chunks", "20", "--output-frequency", "5", "--in-file",
                                 str(default), "--show-statistics", "-q"])
    args.func(args)
    res = Imatrix.read(out)
    base = Imatrix.read(default)
    n_base = base.counts["blk.0.attn_q.weight"][0]
    assert res.counts["blk.0.attn_q.weight"][0] == n_base + 20 * CTX
    assert res.chunk_count == n_base // CTX + 20 and res.chunk_size == CTX
    assert res.datasets == ["calib.txt", str(d / "calib.txt")] and "output.weight" not in res
    text = capsys.readouterr().out
    assert "stored 14 entries" in text and "ffn_down" in text and "weighted averages per layer" in text
    stats = {r["name"]: r for r in statistics(res)}
    r = stats["blk.1.attn_q.weight"]
    acts = res.importance("blk.1.attn_q.weight").astype(np.float64)
    assert r["n"] == 256 and abs(r["sum"] - acts.sum()) < 1e-6 * acts.sum() and r["max"] == pytest.approx(acts.max())
    assert 0.99 < r["active"] <= 1 and 0 < r["cossim"] <= 1
    assert "attn_q" in format_statistics(res)
    # legacy output, and a text too short for two windows
    args = _parser().parse_args(["imatrix", str(d / "m.gguf"), "-f", str(d / "calib.txt"), "-c", str(CTX),
                                 "-o", str(tmp_path / "x.dat"), "--output-format", "dat", "--chunks", "2", "-q"])
    args.func(args)
    assert Imatrix.read(tmp_path / "x.dat").chunk_count == 2
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    args = _parser().parse_args(["imatrix", str(d / "m.gguf"), "-f", str(short), "-c", str(CTX), "-q",
                                 "-o", str(tmp_path / "no.gguf")])
    with pytest.raises(TwinquantError, match="needs at least"):
        args.func(args)
    assert not (tmp_path / "no.gguf").exists()


@pytest.mark.parametrize("ftype", ["IQ2_XS", "IQ2_M", "IQ3_XXS", "IQ1_M"])
def test_rtn_iquant_mix_with_imatrix_is_byte_identical_to_llama_quantize(bindir, llama_runs, work, tmp_path, ftype):
    """`quantize --mix llama.cpp:FTYPE --method rtn --imatrix F` writes llama-quantize's tensors byte for byte."""
    from tests.test_cli import run

    d, _ = work
    _, default = llama_runs
    _run([bindir / "llama-quantize", "--imatrix", default, d / "m.gguf", tmp_path / "theirs.gguf", ftype, 1], tmp_path)
    run("quantize", d / "m.gguf", "-o", tmp_path / "ours.gguf", "--mix", f"llama.cpp:{ftype}", "--method", "rtn",
        "--rotation", "none", "--imatrix", default, "-q")
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    ours = gguf.GGUFReader(tmp_path / "ours.gguf").tensors
    assert {t.name for t in ours} == set(theirs)
    assert any(t.tensor_type.name.startswith("IQ") for t in ours)
    for t in ours:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), (t.name, t.tensor_type.name)


def test_imatrix_in_the_rotated_basis_and_quantize_checks_it(bindir, llama_runs, work, tmp_path):
    """`twinquant imatrix --rotation rh` collects the statistics of the model `quantize --rotation rh` quantizes
    (equal to the imatrix of that model rotated eagerly, in float64) and records the basis; `quantize --imatrix`
    refuses an imatrix of another basis (llama-imatrix's on a rotated run, ours in rh on an unrotated one) in one
    line before any work, and takes the matching one. The llama.cpp tools still read the file."""
    from tests.test_cli import assert_user_error, run
    from twinquant.io.load import load_model
    from twinquant.pipeline.prepare import Preparation, apply

    d, model = work
    _, default = llama_runs
    rh = tmp_path / "rh.gguf"
    run("imatrix", d / "m.gguf", "-f", d / "calib.txt", "-c", CTX, "-o", rh, "--chunks", 6, "--rotation", "rh",
        "--seed", 3, "-q")
    got = Imatrix.read(rh)
    assert got.basis == {"rotation": "rh", "seed": 3, "pad": False, "pad_multiple": None}
    rotated = apply(load_model(d / "m.gguf", materialize=True), Preparation("rh", 3), stream=False)
    _, windows = _windows(model, d / "calib.txt")
    oracle = collect_imatrix(rotated, windows[:6], progress=False, stream=False)
    plain = collect_imatrix(model, windows[:6], progress=False, stream=False)
    name = "blk.1.ffn_gate.weight"
    assert np.allclose(got.importance(name), oracle.importance(name), rtol=1e-4, atol=1e-7)
    assert not np.allclose(got.importance(name), plain.importance(name), rtol=1e-2)     # another basis
    q = ["quantize", d / "m.gguf", "--mix", "llama.cpp:Q4_K_M", "--method", "rtn", "-q"]
    p = run(*q, "-o", tmp_path / "a.gguf", "--rotation", "rh", "--seed", 3, "--imatrix", default, ok=False)
    assert_user_error(p, "as stored", "rotated rh with seed 3", "--rotation rh --seed 3")
    p = run(*q, "-o", tmp_path / "b.gguf", "--rotation", "none", "--imatrix", rh, ok=False)
    assert_user_error(p, "rotated rh with seed 3", "--rotation none")
    p = run(*q, "-o", tmp_path / "c.gguf", "--rotation", "rh", "--seed", 4, "--imatrix", rh, ok=False)
    assert_user_error(p, "seed 4")
    assert not list(tmp_path.glob("[abc].gguf*"))
    run(*q, "-o", tmp_path / "ok.gguf", "--rotation", "rh", "--seed", 3, "--imatrix", rh)
    _run([bindir / "llama-quantize", "--imatrix", rh, d / "m.gguf", tmp_path / "lq.gguf", "Q4_K_M", 1], tmp_path)
    with pytest.raises(TwinquantError, match="different bases"):
        got.merge(Imatrix.read(default))
    p = run("imatrix", d / "m.gguf", "-f", d / "calib.txt", "-c", CTX, "-o", tmp_path / "x.dat", "--output-format",
            "dat", "--rotation", "rh", "-q", ok=False)
    assert_user_error(p, "gguf")
