"""The runtime's Triton kernels against their references: K-quant and i-quant dequant-GEMV / dequantize against
gguf-py's dequantization of the same bytes, the fast Hadamard transform against float64.

Without a GPU they run through Triton's interpreter (TRITON_INTERPRET=1 from conftest, TWINQUANT_TRITON_CPU=1
here); with one, the same tests run the compiled kernels on CUDA too (and bfloat16, which the interpreter's dot
does not compute)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from twinquant.errors import TwinquantError
from twinquant.formats.ggml import get_codec
from twinquant.formats.ggml.packed import (BYTE_ORDER_TYPES, GEMV_MAX_ROWS, KERNEL_TYPES, WORDS_TYPES, GemvConfig,
                                           PackedWeight, dequantize, gemv, qlinear, random_blocks)
from twinquant.transforms.hadamard import (KernelConfig, RandomizedHadamard, _kernel_factors, _kernel_runs, fwht,
                                          hadamard_plan, launch_fwht)

CUDA = torch.cuda.is_available()
DEVICES = ["cuda"] if CUDA else ["cpu"]     # the CPU runs them through the interpreter, set only without a GPU
# the interpreter converts float32 to bfloat16 by truncation, not rounding: bfloat16 results are checked on CUDA
FLOATS = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TWINQUANT_TRITON_CPU", "1")


def reference(ggml_type: str, data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type]),
                                       dtype=np.float32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ggml_type", list(KERNEL_TYPES))
def test_dequantize_and_gemv_read_every_bit_of_the_blocks_as_gguf_py_does(ggml_type, device):
    rows, cols = 13, 4096                      # rows not a multiple of the 8 per program; 16 super-blocks: split 2
    data = random_blocks(ggml_type, rows, cols)
    ref = reference(ggml_type, data)
    w = PackedWeight.from_bytes(ggml_type, data, cols, device)
    assert torch.equal(dequantize(w).cpu(), ref)
    g = torch.Generator().manual_seed(1)
    for m in (1, 3, GEMV_MAX_ROWS + 5):         # GEMV rows, and the dequantize + matmul path above GEMV_MAX_ROWS
        x = torch.randn(m, cols, generator=g)
        want = x.double() @ ref.double().T
        got = qlinear(x.to(device), w).cpu().double()
        assert got.shape == (m, rows)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (m, (got - want).abs().max())
    if ggml_type in BYTE_ORDER_TYPES:           # the other kernel: generic for Q2_K, the own-order one for the rest
        got = gemv(x[:3].to(device), w, byte_order=ggml_type != "Q2_K").cpu().double()
        want = x[:3].double() @ ref.double().T
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    else:
        with pytest.raises(TwinquantError, match="no byte-order kernel"):
            gemv(x[:1].to(device), w, byte_order=True)
    if ggml_type in WORDS_TYPES:                # the word-lane kernels (Q2_K, Q3_K, Q6_K)
        got = gemv(x[:3].to(device), w, words=True).cpu().double()
        want = x[:3].double() @ ref.double().T
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    else:
        with pytest.raises(TwinquantError, match="no word-lane kernel"):
            gemv(x[:1].to(device), w, words=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ggml_type,byte_order", [("Q2_K", True), ("Q2_K", False), ("Q2_K", "words"), ("Q3_K", True),
                                                  ("Q3_K", None), ("Q3_K", "words"), ("Q6_K", None), ("Q6_K", "words"),
                                                  ("IQ2_XS", None),
                                                  ("IQ2_XS", True), ("IQ2_XXS", True)])
def test_every_gemv_launch_shape_gives_the_same_product(ggml_type, byte_order, device):
    """Rows per program, super-blocks per step, column split and warps change only the launch: 7 super-blocks
    (no multiple of U·SPLIT), 13 rows (no multiple of BR), the bias added once however the columns are split,
    the output in x's dtype."""
    rows, cols = 13, 7 * 256
    data = random_blocks(ggml_type, rows, cols, seed=3)
    ref = reference(ggml_type, data).double()
    w = PackedWeight.from_bytes(ggml_type, data, cols, device)
    g = torch.Generator().manual_seed(4)
    x, bias = torch.randn(2, cols, generator=g), torch.randn(rows, generator=g)
    want = x.double() @ ref.T + bias.double()
    for cfg in (GemvConfig(4, 1, 1, 4), GemvConfig(4, 4, 1, 4), GemvConfig(2, 2, 4, 2), GemvConfig(16, 4, 2, 8),
                GemvConfig(8, 2, 8, 4)):
        for dtype in (torch.float32, torch.float16):
            kernel = {"words": True} if byte_order == "words" else {"byte_order": byte_order}
            got = gemv(x.to(device, dtype), w, bias.to(device, dtype), dtype, config=cfg, **kernel)
            assert got.dtype == dtype
            tol = (1e-5 if dtype == torch.float32 else 2e-3) * want.abs().max()
            assert (got.cpu().double() - want).abs().max() <= tol, (cfg, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nb", [7, 6, 4])          # row alignment: 4, 8 and 16 bytes (the loads' widths)
def test_q2k_planes_hold_the_same_bytes_and_give_the_same_products(nb, device):
    """packed.planes regroups each Q2_K row (codes, scales, d|dmin) and ggml_bytes undoes it; both word-lane kernels
    (float x, int8 x) read planes at every launch shape and give what they give on GGUF's layout; dequantize and
    the prefill path read them too; planes have no other kernel. The int8 kernel with its loads one step ahead
    (prefetch) gives the same sums."""
    from twinquant.formats.ggml.packed import PackedRun, gemv_q8, ggml_bytes, planes

    rows, cols = 13, nb * 256
    data = random_blocks("Q2_K", rows, cols, seed=nb)
    w = PackedWeight.from_bytes("Q2_K", data, cols, device)
    wp = planes(w)
    assert wp.layout == "planes" and wp.data.shape == w.data.shape and planes(wp) is wp
    assert not torch.equal(wp.data, w.data) and torch.equal(ggml_bytes(wp), w.data)
    assert torch.equal(wp.data[:, :nb * 64].cpu(), torch.from_numpy(data.reshape(rows, nb, 84)[:, :, 16:80].copy()
                                                                     ).reshape(rows, -1))
    assert torch.equal(dequantize(wp), dequantize(w))
    g = torch.Generator().manual_seed(nb)
    x, bias = torch.randn(2, cols, generator=g).to(device), torch.randn(rows, generator=g).to(device)
    for cfg in (GemvConfig(4, 1, 1, 4), GemvConfig(16, 4, 2, 8), GemvConfig(8, 2, 8, 4)):
        for dtype in (torch.float32, torch.float16):
            want = gemv(x.to(dtype), w, bias.to(dtype), dtype, config=cfg, words=True)
            torch.testing.assert_close(gemv(x.to(dtype), wp, bias.to(dtype), dtype, config=cfg), want,
                                       rtol=1e-6, atol=1e-6 * want.abs().max().item())
        want = gemv_q8(x, w, words=True, config=cfg, bias=bias)
        for wi, pf in ((wp, False), (wp, True), (w, True)):          # prefetch: the next step's loads first
            torch.testing.assert_close(gemv_q8(x, wi, words=True, config=cfg, bias=bias, prefetch=pf), want,
                                       rtol=1e-6, atol=1e-6 * want.abs().max().item())
    cfg = GemvConfig(4, 1, 2, 4)                      # several steps a column part: prefetch's step is SPLIT·U
    want = gemv_q8(x, w, words=True, config=cfg)
    for wi in (wp, w):
        torch.testing.assert_close(gemv_q8(x, wi, words=True, config=cfg, prefetch=True), want, rtol=1e-6,
                                   atol=1e-6 * want.abs().max().item())
    torch.testing.assert_close(qlinear(x.repeat(6, 1), wp, bias), qlinear(x.repeat(6, 1), w, bias))   # prefill
    run = PackedRun.join(("a", "b"), [wp, planes(PackedWeight.from_bytes("Q2_K", data[:5], cols, device))])
    assert run.whole.layout == "planes" and all(v.layout == "planes" for v in run.views)
    torch.testing.assert_close(run.product(x, False)[1], gemv(x, w, words=True)[:, :5], rtol=1e-6, atol=1e-5)
    with pytest.raises(TwinquantError, match="different layouts"):
        PackedRun.join(("a", "b"), [wp, w])
    with pytest.raises(TwinquantError, match="only its word-lane kernel"):
        gemv(x, wp, byte_order=True)
    with pytest.raises(TwinquantError, match="only the word-lane kernel"):
        gemv_q8(x, wp)
    with pytest.raises(TwinquantError, match="no planes layout"):
        planes(PackedWeight.from_bytes("Q3_K", random_blocks("Q3_K", 2, 256), 256, device))


def _count_launches(monkeypatch, module, name: str) -> list:
    """module.name's launches (kernel[grid](...)) from here on: the grids, in a list that grows."""
    calls = []
    real = getattr(module, name)

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(module, name, Spy())
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_twinquant_words_makes_the_word_lane_kernels_the_default(device, monkeypatch):
    """TWINQUANT_WORDS names the types gemv sends to their word-lane kernel when not told (unset: all of them, the
    measured default); their launches then come from the table's "T:words" keys; an explicit kernel still wins."""
    from twinquant.formats.ggml import triton_kquants
    from twinquant.formats.ggml.packed import kernel_key, words_default

    calls = _count_launches(monkeypatch, triton_kquants, "gemv_q2k_words_kernel")
    w = PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", 5, 512), 512, device)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(2)).to(device)
    monkeypatch.setenv("TWINQUANT_WORDS", "Q2_K,Q4_K,nonsense")
    assert words_default() == ("Q2_K",) and kernel_key("Q2_K") == "Q2_K:words" and kernel_key("Q3_K") == "Q3_K"
    y = gemv(x, w)
    assert len(calls) == 1
    gemv(x, w, byte_order=True)                     # told: the byte-order kernel
    assert len(calls) == 1 and kernel_key("Q2_K", byte_order=True) == "Q2_K"
    monkeypatch.setenv("TWINQUANT_WORDS", "")         # set and empty: none (Q2_K's default other kernel)
    assert words_default() == () and kernel_key("Q2_K") == "Q2_K"
    torch.testing.assert_close(gemv(x, w), y, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    monkeypatch.delenv("TWINQUANT_WORDS")             # unset: the measured default, every word-lane type
    assert words_default() == WORDS_TYPES and kernel_key("Q6_K") == "Q6_K:words"
    gemv(x, w)
    assert len(calls) == 2


def test_gemv_launch_comes_from_the_nearest_swept_shape(tmp_path, monkeypatch):
    """packed.gemv_config: the packaged sweep's launch for a measured shape; the nearest measured shape's (log rows,
    log columns) for another, with fewer column parts for a shorter row; a type the sweep did not take uses the
    "generic" entries; without an entry, the fill-the-GPU rule."""
    import json

    from twinquant.formats.ggml.packed import LAUNCH_TABLE, gemv_config

    shipped = json.loads(LAUNCH_TABLE.read_text())["launches"]
    rows, nb, *cfg = shipped["Q2_K"][0]
    assert gemv_config("Q2_K", rows, nb) == GemvConfig(*cfg)
    table = {"launches": {"Q2_K": [[1536, 6, 4, 4, 1, 4], [8960, 35, 8, 8, 8, 8]],
                          "generic": [[4096, 16, 2, 2, 4, 4]]}}
    (tmp_path / "t.json").write_text(json.dumps(table))
    monkeypatch.setenv("TWINQUANT_GEMV_TABLE", str(tmp_path / "t.json"))
    assert gemv_config("Q2_K", 2048, 8) == GemvConfig(4, 4, 1, 4)
    assert gemv_config("Q2_K", 9000, 70) == GemvConfig(8, 8, 8, 8)
    assert gemv_config("Q2_K", 9000, 20) == GemvConfig(8, 8, 2, 8)         # u·split ≤ super-blocks a row
    assert gemv_config("Q5_K", 4096, 16) == GemvConfig(2, 2, 4, 4)
    monkeypatch.setenv("TWINQUANT_GEMV_TABLE", str(tmp_path / "none.json"))
    cfg = gemv_config("Q5_K", 64, 16)
    assert cfg.u * cfg.split <= 16 and cfg.split > 1                       # few rows: columns split


@pytest.mark.parametrize("device", DEVICES)
def test_qlinear_on_real_codes_with_bias_and_leading_axes(device):
    codec = get_codec("Q2_K")
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(2))
    data = codec.pack(*codec.quantize(w))
    wq = codec.dequantize_bytes(data, 512).float()
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(24, generator=g)
    x = torch.randn(2, 1, 512, generator=g)
    got = qlinear(x.to(device), PackedWeight.from_bytes("Q2_K", data, 512, device), bias.to(device)).cpu().double()
    want = torch.nn.functional.linear(x.double(), wq.double(), bias.double())
    # float32 sums of 512 products (the byte-order kernel's Σ(1 + c/4)·x − Σx cancels): rounding of the terms' size
    assert (got - want).abs().max() <= 1e-6 * (x.double().abs() @ wq.double().abs().T).max()


def test_launch_table_merges_per_kernel_and_shape_and_serves_the_word_lane_kernels():
    """gemv_configs --emit-table / kernel_ptx --launches merge into the shipped table: a new entry replaces the one
    of its key and shape only, every key says where it came from; the shipped table holds launches for each
    word-lane kernel at the 32B shapes, and gemv takes them."""
    import importlib
    import json
    import sys

    from tests.paths import ROOT
    from twinquant.formats.ggml.packed import LAUNCH_TABLE, gemv_config

    sys.path.insert(0, str(ROOT / "benchmarks"))
    merge_tables = importlib.import_module("gemv_configs").merge_tables
    old = {"source": "a.json", "gpu": "G", "commit": "c",
           "launches": {"Q2_K": [[256, 6, 4, 4, 1, 4], [512, 6, 8, 1, 1, 4]], "Q3_K": [[256, 6, 1, 2, 1, 4]]}}
    new = {"source": "b.json", "gpu": None, "commit": "0123456789",
           "launches": {"Q2_K": [[512, 6, 16, 2, 2, 8]], "Q6_K": [[256, 6, 2, 2, 1, 4]]}}
    got = merge_tables(old, new)
    assert got["launches"] == {"Q2_K": [[256, 6, 4, 4, 1, 4], [512, 6, 16, 2, 2, 8]], "Q3_K": [[256, 6, 1, 2, 1, 4]],
                               "Q6_K": [[256, 6, 2, 2, 1, 4]]}
    assert got["sources"] == {"Q2_K": "b.json (0123456) for its shapes; a.json for the others", "Q3_K": "a.json",
                              "Q6_K": "b.json (0123456)"}
    assert got["source"] == "a.json" and got["gpu"] == "G"
    shipped = json.loads(LAUNCH_TABLE.read_text())
    twice = merge_tables(got, {**new, "source": "c.json", "launches": {"Q2_K": [[256, 6, 8, 8, 1, 8]]}})
    assert twice["sources"]["Q2_K"] == ("c.json (0123456) for its shapes; b.json (0123456) for its shapes; "
                                        "a.json for the others")             # one "for the others", however often
    for key in ("Q2_K:words", "Q3_K:words", "Q6_K:words", "Q2_K:q8words", "Q2_K:planes", "Q2_K:q8planes"):
        entry = next(e for e in shipped["launches"][key] if e[:2] == [27648, 20])
        assert gemv_config(key, 27648, 20) == GemvConfig(*entry[2:]) and key in shipped["sources"]


@pytest.mark.parametrize("device", DEVICES)
def test_int8_activation_gemv_computes_llama_cpp_arithmetic_exactly(device):
    """gemv_q8 (dp4a on CUDA, the same integer sums byte by byte in the interpreter; both kernels, the word-lane one
    at several launches) against its own arithmetic in float64: the codes times int8 x per 32 with its scale, minus
    the mins times the float sums of x per 16."""
    from twinquant.formats.ggml.packed import gemv_q8, quantize_q8

    rows, cols = 70, 2048                      # rows not a multiple of the rows per program; 8 super-blocks
    data = random_blocks("Q2_K", rows, cols, seed=3)
    w = PackedWeight.from_bytes("Q2_K", data, cols, device)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(4)) * 3
    x[0, :32] = 0                              # a block of zeros: scale 0, codes 0
    got = gemv_q8(x.to(device), w).cpu().double()
    lanes = [gemv_q8(x.to(device), w, words=True, config=c).cpu().double()       # the word-lane kernel
             for c in (GemvConfig(16, 2, 2, 4), GemvConfig(8, 1, 1, 2), GemvConfig(32, 4, 4, 4))]
    xq, xd, xs = (t.cpu() for t in quantize_q8(x.to(device)))
    xint = xq.view(torch.int8).double().reshape(2, -1, 32)
    assert xint.abs().max() <= 127 and torch.all(xint[0, 0] == 0)
    blk = data.reshape(rows, -1, 84)
    d = torch.from_numpy(blk[:, :, 80:82].copy().view(np.float16).astype(np.float64)[..., 0])
    dmin = torch.from_numpy(blk[:, :, 82:84].copy().view(np.float16).astype(np.float64)[..., 0])
    sc = torch.from_numpy(blk[:, :, :16].astype(np.int64))
    mins = (dmin[..., None] * (sc >> 4)).reshape(rows, -1)                      # [rows, sub-blocks]
    codes = reference("Q2_K", data).double() + mins.repeat_interleave(16, 1)   # d·sc·q: the weight plus its min
    want = (xint * xd.double()[..., None]).reshape(2, -1) @ codes.T - xs.double() @ mins.T
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    for y in lanes:
        assert (y - want).abs().max() <= 1e-6 * want.abs().max()
    exact = x.double() @ reference("Q2_K", data).double().T                       # and close to the float product
    assert (got - exact).abs().max() <= 2e-2 * exact.abs().max()
    b = torch.randn(rows, generator=torch.Generator().manual_seed(5))
    for c in (GemvConfig(16, 2, 1, 4), GemvConfig(16, 2, 4, 4)):                 # stored once; split: atomics
        yb = gemv_q8(x.to(device), w, words=True, config=c, bias=b.to(device), out_dtype=torch.float16)
        assert yb.dtype == torch.float16
        torch.testing.assert_close(yb.cpu().double(), (want + b.double()).half().double(), rtol=2e-3, atol=2e-3)
    with pytest.raises(TwinquantError, match="only Q2_K"):
        gemv_q8(x.to(device), PackedWeight.from_bytes("Q4_K", random_blocks("Q4_K", 8, 256), 256, device))
    with pytest.raises(TwinquantError, match="word-lane kernel adds a bias"):
        gemv_q8(x.to(device), w, bias=b.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_twinquant_q8_sends_the_runtime_products_through_int8_activations(device, monkeypatch):
    """TWINQUANT_Q8=Q2_K: qlinear quantizes x to int8 per 32 and runs the word-lane dp4a kernel (llama.cpp's
    arithmetic, with the bias and x's dtype), other types keep the float kernels; unset, the float kernel again."""
    from twinquant.formats.ggml import triton_kquants
    from twinquant.formats.ggml.packed import gemv_q8, q8_default, qlinear

    calls = _count_launches(monkeypatch, triton_kquants, "gemv_q2k_q8_words_kernel")
    w = PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", 37, 512, seed=6), 512, device)
    w6 = PackedWeight.from_bytes("Q6_K", random_blocks("Q6_K", 9, 512, seed=6), 512, device)
    x = torch.randn(3, 1, 512, generator=torch.Generator().manual_seed(7)).to(device)
    b = torch.randn(37, generator=torch.Generator().manual_seed(8)).to(device)
    exact = qlinear(x, w, b)
    monkeypatch.setenv("TWINQUANT_Q8", "Q2_K,Q6_K")
    assert q8_default() == ("Q2_K",)
    y = qlinear(x, w, b)
    assert len(calls) == 1 and y.shape == (3, 1, 37)
    torch.testing.assert_close(y.reshape(3, 37), gemv_q8(x.reshape(3, 512), w, words=True, bias=b), rtol=0, atol=0)
    assert len(calls) == 2
    torch.testing.assert_close(y, exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
    assert not torch.equal(y, exact)                # int8 x: not the float product
    qlinear(x, w6)
    assert len(calls) == 2                          # Q6_K has no int8 kernel: the float one
    monkeypatch.delenv("TWINQUANT_Q8")
    torch.testing.assert_close(qlinear(x, w, b), exact, rtol=0, atol=0)
    assert len(calls) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 21])
def test_int2_int8_tensor_core_gemm_computes_its_integer_arithmetic_exactly(device, m):
    """gemm_i8 (Q2_K codes times per-token int8 activations, int8 tensor-core products) against its own arithmetic
    in float64 — the dequantized weights times x's int8 values and scale — and close to the float product; rows and
    tokens not multiples of the tiles, a zero token."""
    from twinquant.formats.ggml.packed import gemm_i8, quantize_tokens_i8

    rows, cols = 70, 1024
    data = random_blocks("Q2_K", rows, cols, seed=6)
    w = PackedWeight.from_bytes("Q2_K", data, cols, device)
    x = torch.randn(m, cols, generator=torch.Generator().manual_seed(7)) * 2
    x[-1] = 0 if m > 1 else x[-1]
    got = gemm_i8(x.to(device), w, bm=16, bn=32).cpu().double()
    q, s = (t.cpu() for t in quantize_tokens_i8(x.to(device)))
    assert q.abs().max() == 127 and (m == 1 or (torch.all(q[-1] == 0) and s[-1] == 0))
    want = (q.double() * s.double()[:, None]) @ reference("Q2_K", data).double().T
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    exact = x.double() @ reference("Q2_K", data).double().T
    assert (got - exact).norm() <= 2e-2 * exact.norm()
    with pytest.raises(TwinquantError, match="only Q2_K"):
        gemm_i8(x.to(device), PackedWeight.from_bytes("Q4_K", random_blocks("Q4_K", 8, 256), 256, device))


@pytest.mark.parametrize("device", DEVICES)
def test_activation_quantization_kernel_matches_torch(device, monkeypatch):
    """quantize_q8's kernel against its torch path, with the sums per 16 in either order (lanes: the word-lane
    kernels' order, sum 8h + 2j + q of each super-block at 8h + 4q + j)."""
    from twinquant.formats.ggml.packed import quantize_q8

    x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(5))
    x[1, 64:96] = 0
    x[2, 5] = 1e30                              # one huge value: the rest of its block rounds to 0
    kq, kd, ks = (t.cpu() for t in quantize_q8(x.to(device)))
    kl = quantize_q8(x.to(device), lanes=True)[2].cpu()
    monkeypatch.setenv("TWINQUANT_TRITON_CPU", "0")
    tq, td, ts = quantize_q8(x)                 # the torch path (on the CPU, with Triton off)
    assert torch.equal(kq, tq) and torch.equal(kd, td)
    torch.testing.assert_close(ks, ts, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(kl, quantize_q8(x, lanes=True)[2], rtol=1e-6, atol=1e-4)
    assert kq.view(torch.int8)[2, 5] == 127 and torch.all(kq.view(torch.int8)[1, 64:96] == 0)
    b, h, j, q = 3, 1, 2, 1
    assert kl[0, 16 * b + 8 * h + 4 * q + j] == ks[0, 16 * b + 8 * h + 2 * j + q] != ks[0, 16 * b + 8 * h + 4 * q + j]
    assert torch.equal(kl.sort().values, ks.sort().values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_norm_and_swiglu_kernels_hand_over_their_output_quantized(dtype, device):
    """RMSNorm (alone and after the residual add) and SwiGLU with q8: their output carries exactly what
    quantize_q8(output, lanes=True) makes of it (`packed.q8_of`), so the GEMV after them skips its quantize launch;
    SwiGLU on the strided halves of a joined output, a width of whole super-blocks but not of its column blocks."""
    from twinquant.formats.ggml.packed import q8_of, quantize_q8
    from twinquant.model import triton_norm, triton_swiglu

    g = torch.Generator().manual_seed(3)
    x, r = ((2 * torch.randn(3, 1, 1280, generator=g)).to(dtype).to(device) for _ in range(2))
    x[1, 0, 256:288] = 0                                        # a zero block: d = 0, q = 0
    w = (1 + 0.1 * torch.randn(1280, generator=g)).to(dtype).to(device)
    gate, up = (4 * torch.randn(2, 1, 2 * 1280, generator=g)).to(dtype).to(device).split(1280, dim=-1)
    plain = [triton_norm.rms_norm(x, w, 1e-6), triton_norm.rms_norm(x, w, 1e-6, res=r)[1],
             triton_swiglu.silu_mul(gate, up)]
    fused = [triton_norm.rms_norm(x, w, 1e-6, q8=True), triton_norm.rms_norm(x, w, 1e-6, res=r, q8=True)[1],
             triton_swiglu.silu_mul(gate, up, q8=True)]
    for a, b in zip(plain, fused):
        assert q8_of(a) is None and torch.equal(a, b)           # the same output, now with its int8 form
        want = quantize_q8(b.reshape(-1, b.shape[-1]), lanes=True)
        q, d, sums = q8_of(b)
        assert torch.equal(q, want[0]) and torch.equal(d, want[1])
        torch.testing.assert_close(sums, want[2], rtol=1e-6, atol=1e-5)
    assert torch.all(q8_of(fused[0])[1].reshape(3, -1)[1, 8] == 0)
    assert q8_of(fused[0].reshape(3, 1280)) is None             # another tensor object: quantized again


def test_packed_weight_rejects_what_it_cannot_hold():
    with pytest.raises(TwinquantError, match="no packed-weight kernel for IQ4_NL"):
        PackedWeight.from_bytes("IQ4_NL", np.zeros((2, 144), np.uint8), 256, "cpu")
    with pytest.raises(TwinquantError, match="do not hold"):
        PackedWeight.from_bytes("Q2_K", np.zeros((2, 80), np.uint8), 256, "cpu")
    w = PackedWeight.from_bytes("Q2_K", np.zeros((2, 84), np.uint8), 256, "cpu")
    with pytest.raises(TwinquantError, match="input width 128"):
        qlinear(torch.zeros(1, 128), w)


WIDTHS = [256, 896, 1536, 4096, 5120, 8960, 14336, 27648]   # Sylvester and Paley m = 28, 12, 20, 140, 108
# whose tiles do not fit the shared memory in float32 (the transform takes the torch path for those)
TOO_BIG_F32 = {8960, 27648}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_kernel_matches_float64_for_real_widths(n, device):
    plan = hadamard_plan(n)
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    assert _kernel_runs(x.to(device, torch.float16), plan)
    assert _kernel_runs(x.to(device), plan) == (n not in TOO_BIG_F32)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    for transpose in (False, True):
        want = fwht(x.double(), transpose=transpose, plan=plan)
        for dt in dtypes:
            got = fwht(x.to(device, dt), transpose=transpose, plan=plan).cpu().double()
            tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dt]
            assert (got - want).abs().max() <= tol * want.abs().max(), (dt, transpose, (got - want).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,cfg", [(1536, KernelConfig(rows=4, warps=4, stages=2, per_sm=1)),
                                   (5120, KernelConfig(rows=1, warps=4, stages=3, per_sm=1)),
                                   (4096, KernelConfig(rows=2, warps=8, stages=1, per_sm=0))])
def test_hadamard_kernel_launches_loop_over_tiles(n, cfg, device):
    """Every launch the benchmarks sweep computes the same transform: several rows per tile (the last one partial),
    fewer programs than tiles (each loops), pipelining stages; signs on both sides."""
    plan = hadamard_plan(n)
    rh = RandomizedHadamard(n, seed=3)
    x = torch.randn(4 * 5 + 3, n, generator=torch.Generator().manual_seed(1)).to(device)
    for transpose in (False, True):
        factors = _kernel_factors(plan, transpose, x.dtype, str(x.device))
        y = torch.full_like(x, float("nan"))
        launch_fwht(x, y, plan, factors, rh._s(x), transpose, 1 / n ** 0.5, cfg)
        Q = rh.matrix(torch.float64)
        want = x.cpu().double() @ (Q.T if transpose else Q)
        torch.testing.assert_close(y.cpu().double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_hadamard_applies_its_signs_inside_the_kernel(device):
    n = 5120
    rh = RandomizedHadamard(n, seed=7)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    Q = rh.matrix(torch.float64)
    torch.testing.assert_close(rh.apply(x.to(device)).cpu().double(), x.double() @ Q, rtol=0, atol=2e-5)
    torch.testing.assert_close(rh.apply_transpose(x.to(device)).cpu().double(), x.double() @ Q.T, rtol=0, atol=2e-5)


def test_widths_without_a_tiling_fall_back_to_torch():
    plan = hadamard_plan(64)               # too small for the kernel's tensor-core tiles
    x = torch.randn(2, 64)
    assert not _kernel_runs(x, plan)
    torch.testing.assert_close(fwht(x, plan=plan).double(), x.double() @ plan.matrix() / 8, rtol=0, atol=1e-6)


def test_a_gguf_decodes_from_packed_weights_as_from_dequantized_ones(tmp_path, monkeypatch):
    """runtime/packed_weights.pack_linears: every K-quant linear (and the head) multiplied from its bytes; the
    prefill (dequantize + matmul) and each decode step (GEMV) give the float path's logits; with TWINQUANT_PLANES
    the Q2_K ones in planes (joined runs too) give them as well."""
    from tests.tiny_models import save_tiny
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.hf import load_hf_dir
    from twinquant.io.load import load_model
    from twinquant.model.forward import KVCache, forward
    from twinquant.pipeline.executor import quantize_model
    from twinquant.runtime.packed_weights import join_shared_inputs, pack_linears

    model = load_hf_dir(save_tiny("qwen2", tmp_path / "hf", tokenizer=True, hidden_size=256, intermediate_size=512,
                                  num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2))
    model.materialize()
    kinds = [{"attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "Q4_K", "attn_output": "IQ2_XS", "ffn_gate": "Q6_K",
              "ffn_up": "Q8_0", "ffn_down": "IQ4_XS"},        # Q8_0 has no kernel: it stays a float tensor
             {"attn_q": "Q2_K", "attn_k": "Q2_K", "attn_v": "Q3_K", "attn_output": "IQ2_XS", "ffn_gate": "Q4_K",
              "ffn_up": "Q4_K", "ffn_down": "IQ4_XS"}]        # block 1: q+k and gate+up run as one GEMV each
    types = {n: kinds[int(n.split(".")[1])][n.split(".")[2]] for n in model.tensor_names()
             if n.startswith("blk.") and n.endswith("weight") and n.split(".")[2] in kinds[0]}
    types["output.weight"] = "Q6_K"
    quantize_model(model, types, "rtn", progress=False)
    path = write_gguf(model, tmp_path / "q.gguf", "F32")

    device = DEVICES[0]
    plain = load_model(path, device=device).materialize()
    packed = load_model(path, device=device, keep_quantized=True)
    assert "IQ2_XS" not in pack_linears(load_model(path, device=device, keep_quantized=True))   # opt-in
    counts = pack_linears(packed, iquants=True)
    packed.materialize()
    assert dict(counts) == {"Q2_K": 3, "Q3_K": 2, "Q4_K": 3, "IQ2_XS": 2, "Q6_K": 2, "IQ4_XS": 2}
    assert "blk.0.ffn_up.weight" not in packed.packed and "blk.0.attn_q.weight" not in packed.tensors
    assert join_shared_inputs(packed) == 2
    qk = packed.packed_groups["blk.1.attn_q.weight"]
    assert qk.members == ("blk.1.attn_q.weight", "blk.1.attn_k.weight") and qk.whole.rows == 256 + 128
    assert packed.tensors["blk.1.attn_k.bias"] is qk.bias_views[1]
    assert packed.packed_groups["blk.1.ffn_gate.weight"].bias is None

    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    caches = [KVCache.empty(m, 1, 16) for m in (plain, packed)]
    want = forward(plain, tokens, cache=caches[0])
    got = forward(packed, tokens, cache=caches[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for step in range(2):                                   # decode: one row at a time, the GEMV kernels
        t = tokens[:, step:step + 1]
        torch.testing.assert_close(forward(packed, t, cache=caches[1]), forward(plain, t, cache=caches[0]),
                                   rtol=1e-4, atol=1e-4)
    # ffn_gate (Q6_K) shares its input with ffn_up (Q8_0, no kernel): it still ran packed, never dequantized
    assert "blk.0.ffn_gate.weight" not in packed.tensors and "blk.0.ffn_up.weight" in packed.tensors

    monkeypatch.setenv("TWINQUANT_PLANES", "Q2_K")
    planar = load_model(path, device=device, keep_quantized=True)
    pack_linears(planar)
    planar.materialize()
    join_shared_inputs(planar)
    layouts = {n: w.layout for n, w in planar.packed.items()}
    assert {n for n, v in layouts.items() if v == "planes"} == {n for n, t in types.items() if t == "Q2_K"}
    assert planar.packed_groups["blk.1.attn_q.weight"].whole.layout == "planes"
    cache = KVCache.empty(planar, 1, 16)
    torch.testing.assert_close(forward(planar, tokens[:, :-1], cache=cache), want[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(forward(planar, tokens[:, -1:], cache=cache), want[:, -1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_fused_rope_writes_the_cache_as_the_torch_path(dtype, device):
    """triton_rope.rope_into_cache against apply_rope + the cache's index copies: q, k, v as strided views of one
    projection output (GQA: 6 query heads over 2 key/value heads), three tokens at scattered positions; the cache
    elsewhere untouched."""
    from twinquant.model.forward import apply_rope
    from twinquant.model.triton_rope import rope_into_cache

    g = torch.Generator().manual_seed(0)
    B, L, H, hkv, hd, T = 2, 3, 6, 2, 64, 20
    y = torch.randn(B, L, (H + 2 * hkv) * hd, generator=g).to(dtype)
    q, k, v = (t.reshape(B, L, -1, hd).transpose(1, 2) for t in y.split([H * hd, hkv * hd, hkv * hd], dim=-1))
    ang = torch.randn(T, hd // 2, generator=g, dtype=torch.float64)
    cos, sin = (torch.cat([f(ang), f(ang)], dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    pos = torch.tensor([4, 9, 17])
    ck, cv = (torch.randn(B, hkv, T, hd, generator=g).to(dtype) for _ in range(2))
    want_k, want_v = ck.clone(), cv.clone()
    want_q = apply_rope(q.float(), cos[pos].float(), sin[pos].float())
    want_k.index_copy_(2, pos, apply_rope(k.float(), cos[pos].float(), sin[pos].float()).to(dtype))
    want_v.index_copy_(2, pos, v)
    dev = lambda t: t.to(device)        # noqa: E731
    ck, cv = dev(ck), dev(cv)
    got_q = rope_into_cache(dev(q), dev(k), dev(v), dev(cos), dev(sin), dev(pos), ck, cv)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got_q.cpu().float(), want_q, **tol)
    torch.testing.assert_close(ck.cpu().float(), want_k.float(), **tol)
    assert torch.equal(cv.cpu(), want_v)


def test_int8_x_decode_takes_x_quantized_from_the_kernels_that_make_it(tmp_path, monkeypatch):
    """TWINQUANT_Q8=Q2_K decode steps of a Q2_K GGUF: the norms, SwiGLU and (at a device position, what a CUDA
    graph replays) the attention kernel hand their output over quantized (`forward.q8_input`), so no GEMV launches
    a quantize kernel of its own (4 a block otherwise), with the same logits (bit for bit in the interpreter)."""
    from tests.tiny_models import save_q2k_gguf
    from twinquant.formats.ggml import triton_kquants
    from twinquant.io.load import load_model
    from twinquant.model import forward as fwd
    from twinquant.runtime.packed_weights import join_shared_inputs, pack_linears

    path = save_q2k_gguf(tmp_path)
    monkeypatch.setenv("TWINQUANT_Q8", "Q2_K")
    packed = load_model(path, device=DEVICES[0], keep_quantized=True)
    assert pack_linears(packed)["Q2_K"] == 7
    packed.materialize()
    assert join_shared_inputs(packed) == 2                    # q+k+v and gate+up: one GEMV each
    launches = _count_launches(monkeypatch, triton_kquants, "quantize_q8_kernel")
    tokens = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(0)).to(DEVICES[0])
    logits, counts = [], []
    for fused in (True, False):         # (the interpreter takes seconds a GEMV: a prefill past GEMV_MAX_ROWS, 1 step)
        if not fused:
            monkeypatch.setattr(fwd, "q8_input", lambda *a, **k: False)
        cache = fwd.KVCache.empty(packed, 1, 16)
        fwd.forward(packed, tokens[:, :10], cache=cache)
        assert not launches                                   # the prefill: dequantized weights, float x
        cache.at = torch.full((), 10, dtype=torch.long, device=DEVICES[0])
        logits.append(fwd.forward(packed, tokens[:, 10:], cache=cache))
        counts.append(len(launches))
        del launches[:]
    assert counts == [0, 4]                                   # qkv, o, gate+up, down each quantizing x itself
    # bit for bit in the interpreter; on a GPU the norm kernel with and without Q8 is another compile whose sums
    # may add in another order, so h's last bits and then a few int8 roundings of x may differ (the H100 run of the
    # twenty-third session failed at 1e-5 of the largest logit)
    if CUDA:
        torch.testing.assert_close(*logits, rtol=0, atol=5e-3 * logits[1].abs().max().item())
    else:
        assert torch.equal(*logits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_norm_kernel_computes_the_torch_path(dtype, device, monkeypatch):
    """triton_norm.rms_norm (alone and after the residual add) against forward.rms_norm's torch arithmetic; rows
    of a width that is not a power of two."""
    from twinquant.model import forward as fwd

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 5, 1536 + 64, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1536 + 64, generator=g)).to(dtype)
    monkeypatch.setenv("TWINQUANT_NO_TRITON", "1")
    want_h = fwd.rms_norm(x, w, 1e-6)
    want_s, want_h2 = fwd.add_rms_norm(x, y, w, 1e-6)
    monkeypatch.delenv("TWINQUANT_NO_TRITON")
    dev = lambda t: t.to(device)        # noqa: E731
    assert fwd._norm_kernel(dev(x), dev(w), dev(y))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)   # an ulp
    torch.testing.assert_close(fwd.rms_norm(dev(x), dev(w), 1e-6).cpu(), want_h, **tol)
    got_s, got_h2 = fwd.add_rms_norm(dev(x), dev(y), dev(w), 1e-6)
    assert torch.equal(got_s.cpu(), want_s)
    torch.testing.assert_close(got_h2.cpu(), want_h2, **tol)
    assert not fwd._norm_kernel(dev(x).transpose(0, 1), dev(w))      # strided rows: the torch path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_mul_kernel_computes_the_torch_path(dtype, device, monkeypatch):
    """triton_swiglu.silu_mul against F.silu(g) * u: gate and up as the two halves of one joined output (strided
    rows), a width over one column block and not a multiple of it; a layout it cannot take goes to torch."""
    from twinquant.model import forward as fwd
    from twinquant.model import triton_swiglu

    g = torch.Generator().manual_seed(0)
    joined = (4 * torch.randn(2, 3, 2 * 1100, generator=g)).to(dtype).to(device)
    gate, up = joined.split(1100, dim=-1)
    monkeypatch.setenv("TWINQUANT_NO_TRITON", "1")
    want = fwd.silu_mul(gate.cpu(), up.cpu())
    monkeypatch.delenv("TWINQUANT_NO_TRITON")
    assert triton_swiglu.fits(gate, up)
    calls = []
    real = triton_swiglu.silu_mul
    monkeypatch.setattr(triton_swiglu, "silu_mul", lambda *a: calls.append(1) or real(*a))
    got = fwd.silu_mul(gate, up)
    assert calls and got.is_contiguous() and got.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)   # an ulp
    torch.testing.assert_close(got.cpu(), want, **tol)
    assert not triton_swiglu.fits(gate.transpose(0, 1), up.transpose(0, 1))      # rows not evenly spaced


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,H,hkv,T,hd,pos,chunk", [
    (1, 12, 2, 64, 128, 37, None),      # Qwen2.5-1.5B's heads, one part
    (2, 6, 6, 600, 64, 513, None),      # no GQA, three parts (four launched)
    (2, 8, 2, 600, 64, 513, None),      # GQA, parts, whole super-blocks
    (1, 28, 4, 1100, 24, 3, None),      # parts past the position left empty; hd 24
    (1, 40, 8, 137, 128, 100, 32)])     # Qwen2.5-32B's heads in parts of 32 positions (TWINQUANT_ATTN_CHUNK=auto's)
def test_decode_attention_kernel_matches_the_grouped_torch_path(B, H, hkv, T, hd, pos, chunk, device):
    """triton_attention.decode_attention (positions up to pos read from the device, online softmax, parts
    combined) against forward._grouped_decode_attention with the step's additive mask; with q8, the output's int8
    form as quantize_q8 makes it from the rows [B, H·hd] (where hd is a power of two and the rows whole
    super-blocks; else none)."""
    from twinquant.formats.ggml.packed import q8_of, quantize_q8
    from twinquant.model import triton_attention
    from twinquant.model.forward import _grouped_decode_attention

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, 1, hd), (B, hkv, T, hd), (B, hkv, T, hd)))
    k[:, :, pos + 1:] = 1e4                  # what lies past the position must not count
    mask = torch.zeros(1, T).masked_fill_(torch.arange(T)[None] > pos, float("-inf"))
    want = _grouped_decode_attention(q, k, v, mask)
    dev = lambda t: t.to(device)        # noqa: E731
    assert triton_attention.fits(dev(q), dev(k), dev(v))
    got = triton_attention.decode_attention(dev(q), dev(k), dev(v), dev(torch.tensor([pos])), chunk=chunk)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    assert not triton_attention.fits(dev(q).half(), dev(k).half(), dev(v).half())
    fused = triton_attention.decode_attention(dev(q), dev(k), dev(v), dev(torch.tensor([pos])), q8=True, chunk=chunk)
    assert torch.equal(fused, got) and q8_of(got) is None
    if hd not in (64, 128) or H * hd % 256:
        assert q8_of(fused) is None                     # the GEMV quantizes x itself
        return
    xq, xd, xs = q8_of(fused)
    wq, wd, ws = quantize_q8(fused.reshape(B, H * hd), lanes=True)
    assert torch.equal(xq, wq) and torch.equal(xd, wd)
    torch.testing.assert_close(xs, ws, rtol=1e-6, atol=1e-5)


def test_attention_chunk_setting():
    """TWINQUANT_ATTN_CHUNK: unset, the longest parts; auto, about PROGRAMS programs in parts of whole loop steps
    (a 32B model's 8 kv heads over 137 positions: parts of 32, not one part of 256); a bad value is one line."""
    from twinquant.errors import TwinquantError
    from twinquant.model.triton_attention import BT, CHUNK, PROGRAMS, chunk_for

    assert chunk_for(137, 8, "") == CHUNK and chunk_for(137, 8, "64") == 64
    assert chunk_for(137, 8, "auto") == BT and chunk_for(4096, 8, "auto") == 128 and chunk_for(1 << 20, 1, "auto") == CHUNK
    for T, rows in ((137, 8), (4096, 8), (4096, 2), (32768, 8), (600, 16)):
        c = chunk_for(T, rows, "auto")
        parts = rows * -(-T // c)
        assert BT <= c <= CHUNK and (parts <= PROGRAMS or c == CHUNK) and (c == BT or 2 * parts > PROGRAMS), (T, rows, c)
    for bad in ("16", "96", "512", "fast"):
        with pytest.raises(TwinquantError, match="TWINQUANT_ATTN_CHUNK"):
            chunk_for(137, 8, bad)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_device_position_steps_with_the_fused_rope_match_the_cached_forward(family, tmp_path, monkeypatch):
    """Decode steps at a device position (what a CUDA graph replays) through the fused RoPE + cache-write kernel
    and the decode attention kernel (qwen3: q/k norms first): the logits of the plain cached forward, and both
    kernels ran in every block."""
    from tests.tiny_models import save_tiny
    from twinquant.io.hf import load_hf_dir
    from twinquant.model import triton_rope
    from twinquant.model.forward import KVCache, forward

    from twinquant.model import triton_attention

    calls, attends = [], []
    real = triton_rope.rope_into_cache
    monkeypatch.setattr(triton_rope, "rope_into_cache", lambda *a: calls.append(1) or real(*a))
    real_attention = triton_attention.decode_attention
    monkeypatch.setattr(triton_attention, "decode_attention", lambda *a: attends.append(1) or real_attention(*a))
    m = load_hf_dir(save_tiny(family, tmp_path)).materialize()
    x = torch.randint(0, m.spec.vocab, (1, 10), generator=torch.Generator().manual_seed(0))
    plain, static = KVCache.empty(m, 1, 16), KVCache.empty(m, 1, 16)
    forward(m, x[:, :6], cache=plain)
    forward(m, x[:, :6], cache=static)
    static.at = torch.zeros((), dtype=torch.long)
    for t in range(6, 10):
        want = forward(m, x[:, t:t + 1], cache=plain)
        static.at.fill_(static.pos)
        torch.testing.assert_close(forward(m, x[:, t:t + 1], cache=static), want, rtol=0, atol=2e-5)
    assert len(calls) == len(attends) == 4 * m.spec.n_layers and static.step is None


def _gptq_inputs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g)
    x[:, : cols // 2] += 0.7 * x[:, cols // 2:]              # correlated inputs: errors propagate
    return torch.randn(rows, cols, generator=g) * 0.02, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ggml_type,rows,cols,block_size,static", [
    ("Q2_K", 45, 512, 128, False),       # rows not whole warps; a 256-block fitted every other batch
    ("Q4_0", 33, 256, 128, False),       # 32-blocks: fits inside a batch, the sweep runs between them
    ("Q3_K", 40, 512, 96, False),        # batches that straddle blocks (the fit takes the next batch's columns)
    ("Q4_K", 32, 512, 128, True),        # static groups with act-order: one sweep per batch, permuted H
])
def test_fused_gptq_sweep_matches_the_torch_column_loop(ggml_type, rows, cols, block_size, static, device,
                                                         monkeypatch):
    from twinquant.algorithms import gptq as G
    from twinquant.formats import codec_for

    W, H = _gptq_inputs(rows, cols, 3)
    codec = codec_for(ggml_type, cols)
    kw = dict(block_size=block_size, act_order=static, static_groups=static)
    calls = []
    real = G.sweep
    monkeypatch.setattr(G, "sweep", lambda *a: calls.append(a[-1]) or real(*a))
    fused = G.gptq(W.to(device), H.to(device), codec, **kw)
    assert calls and all(calls), "the Triton sweep did not run"
    monkeypatch.setenv("TWINQUANT_NO_TRITON", "1")
    calls.clear()
    ref = G.gptq(W.to(device), H.to(device), codec, **kw)     # the torch loop on the same device (the same factor)
    assert calls and not any(calls)
    same = (fused.codes == ref.codes).float().mean().item()
    assert same >= 0.999, same                                # a code may differ on a rounding boundary (FMA)
    assert abs(fused.loss - ref.loss) <= 1e-4 * ref.loss
    assert (fused.dequantized - ref.dequantized).abs().max() <= 0.05 * W.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_sweep_of_many_matrices_matches_each_alone(device, monkeypatch):
    from twinquant.algorithms.gptq import gptq, gptq_many
    from twinquant.formats import codec_for

    ins = [_gptq_inputs(36, 256, s) for s in (4, 5, 6)]
    W = torch.stack([w for w, _ in ins])
    H = torch.stack([h for _, h in ins])
    codec = codec_for("Q2_K", 256)
    many = gptq_many(W.to(device), H.to(device), codec, block_size=64, fit_together=False)
    monkeypatch.setenv("TWINQUANT_NO_TRITON", "1")
    for e, (w, h) in enumerate(ins):
        alone = gptq(w.to(device), h.to(device), codec, block_size=64)
        assert (many[e].codes == alone.codes).float().mean().item() >= 0.999
        assert abs(many[e].loss - alone.loss) <= 1e-4 * alone.loss


def test_gemv_limits_probes_read_the_bytes_they_stand_for():
    """benchmarks/gemv_limits.py's load-only kernels are timed as the Q2_K int8 GEMV's reads: the lane probe reads
    each code word of every row once (scales and d|dmin twice, by the lane pair: they cancel in the xor) and, with
    X, every int8 x word and x sum once per super-block (x's scales twice); the stream probe reads every word once."""
    import functools
    import importlib
    import sys

    from tests.paths import ROOT
    from twinquant.formats.ggml.packed import _q2k_rows, planes, quantize_q8

    sys.path.insert(0, str(ROOT / "benchmarks"))
    lim = importlib.import_module("gemv_limits")
    rows, nb = 12, 4
    w = planes(PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, nb * 256), nb * 256, "cpu"))
    xq, xd, xs = quantize_q8(torch.randn(1, nb * 256), lanes=True)
    words = w.data.view(torch.int32)

    def xor(t):
        return functools.reduce(lambda a, b: a ^ b, t.reshape(-1).tolist(), 0)

    got = {}
    for with_x in (False, True):
        got[with_x] = torch.full((rows,), 7, dtype=torch.int32)
        lim.lane_loads_kernel[(3, 1, 1)](words, xq, xd, xs, got[with_x], rows, nb, BR=4, U=2, SPLIT=1, X=with_x,
                                         num_warps=4, **_q2k_rows(w))
    assert got[False].tolist() == [xor(words[r, :nb * 16]) for r in range(rows)]
    assert (got[True] ^ got[False]).tolist() == [xor(xq) ^ xor(xs.view(torch.int32))] * rows
    sink = torch.zeros(4, dtype=torch.int32)
    lim.stream_kernel[(4,)](words.reshape(-1), sink, words.numel(), BLOCK=256)
    assert xor(sink) == xor(words)
