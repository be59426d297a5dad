"""GGML codecs against llama.cpp itself (ggml_quantize_chunk through ctypes, tests/ggml_oracle.py) and gguf-py:
identical bytes with and without an imatrix (edge cases too), identical dequantization, fit/codes/dequantize_codes
consistent with RTN, pack/unpack round trips, the same bytes and GPTQ on every device, user errors."""

import gguf
import numpy as np
import pytest
import torch

from tests import ggml_oracle
from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams, dequantize_codes
from twinquant.formats.ggml import CODECS as ALL_CODECS, get_codec
from twinquant.algorithms.gptq import accumulate_hessian, gptq

# the affine-grid codecs (codes + parameters); the i-quants (blockwise) have their own tests/test_iquants_*.py
CODECS = {t: c for t, c in ALL_CODECS.items() if not getattr(c, "blockwise", False)}
TYPES = list(CODECS)
SHAPES = [(64, 512), (8, 4864)]


def _weights(rows: int, cols: int, seed: int = 0) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    out = {
        "normal": r.standard_normal((rows, cols)) * 0.02,
        "heavy": r.standard_t(1.5, (rows, cols)) * 0.01,                       # Cauchy-like tails
        "lognormal": r.lognormal(0, 2.5, (rows, cols)) * r.choice([-1, 1], (rows, cols)),
        "ties": r.integers(-4, 5, (rows, cols)) * 0.125,                       # exact ties in the roundings
    }
    w = r.standard_normal((rows, cols)) * 0.01
    w[0] = 0                                                                   # a zero row
    w[1] = 0
    w[1, cols // 3] = 7.5                                                      # a row with a single outlier
    w[2, 5] = -40.0                                                            # one huge value in a normal row
    w[3, : cols // 2] = 0                                                      # zero blocks next to normal ones
    w[4] = np.abs(w[4])                                                        # positive-only / negative-only
    w[5] = -np.abs(w[5])
    out["outliers"] = w
    return {k: v.astype(np.float32) for k, v in out.items()}


def _edge_weights(cols: int, seed: int = 2) -> np.ndarray:
    """One row per edge case: zeros, -0.0, constant rows (sub-blocks with max == min), tiny and denormal values,
    huge values (fp16 scales near and past overflow), a single non-zero, alternating signs, mixed magnitudes."""
    r = np.random.default_rng(seed)
    n = r.standard_normal(cols)
    rows = [np.zeros(cols), np.full(cols, -0.0), np.full(cols, 0.5), np.full(cols, -3.0),
            np.where(np.arange(cols) % 64 < 32, 1.25, -0.75),                        # constant sub-blocks
            n * 1e-30, n * 1e-41, n * 3e4, n * 1e6, n * 3e9,
            np.eye(1, cols, cols // 2)[0] * -2.0, np.where(np.arange(cols) % 2, 1.0, -1.0) * 0.01,
            n * np.exp(r.uniform(-20, 10, cols)), np.abs(n) * 1e-3 + 1.0]
    return np.stack(rows).astype(np.float32)


def _llama_dequantize(data: np.ndarray, qtype, cols: int) -> np.ndarray:
    """The oracle's float32 weights of packed rows: libggml's to_float, and gguf-py's where it has the type (it
    has no Q1_0), which must agree with it."""
    ggml = ggml_oracle.dequantize(data, qtype, cols)
    try:
        py = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        return ggml
    np.testing.assert_array_equal(py, ggml)
    return ggml


def _importance(cols: int, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(0.05, 3.0, cols) ** 3).astype(np.float32)


def _edge_importance(cols: int, seed: int = 5) -> np.ndarray:
    """An imatrix with exact zeros (unused columns), tiny and huge entries."""
    r = np.random.default_rng(seed)
    imp = _importance(cols, seed)
    imp[r.random(cols) < 0.2] = 0.0
    imp[: cols // 8] *= 1e-20
    imp[-cols // 8:] *= 1e12
    return imp.astype(np.float32)


def _weighted_block_errors(codec, w, imp, data):
    """Per block: sum over its weights of qw*sqrt(sigma2 + x^2) * (x - llama.cpp's dequantized x)^2, in float64
    (the weights llama.cpp's imatrix searches use; sigma2 the row's mean square)."""
    x = w.astype(np.float64)
    qw = imp.astype(np.float64) * np.sqrt((x * x).mean(1, keepdims=True) + x * x)
    e = qw * (x - ggml_oracle.dequantize(data, codec.ggml_type, w.shape[1]).astype(np.float64)) ** 2
    return e.reshape(len(w), -1, codec.block).sum(2)


def _assert_no_worse_than_llama_cpp(codec, w, imp, ours, theirs, what):
    """A codec that searches with the imatrix where llama.cpp ignores it (Q2_0): no block's weighted error above
    that of llama.cpp's bytes (within float32 rounding of the search's own scoring)."""
    mine, ref = _weighted_block_errors(codec, w, imp, ours), _weighted_block_errors(codec, w, imp, theirs)
    ok = np.isfinite(ref)
    assert np.isfinite(mine[ok]).all(), f"{codec.name} {what}: non-finite where llama.cpp's bytes are finite"
    worse = mine[ok] > ref[ok] * (1 + 1e-5) + 1e-30
    assert not worse.any(), f"{codec.name} {what}: {worse.sum()} blocks worse than llama.cpp's"


def test_q2_0_scale_search_with_an_imatrix():
    """llama.cpp's Q2_0 (d = max|x|) never uses code 3: a ternary grid at ±max. With an imatrix the codec searches
    a signed scale; on Gaussian blocks its weighted error is under half of llama.cpp's, and some d are negative
    (the extra level 2d on the negative side)."""
    codec = CODECS[gguf.GGMLQuantizationType.Q2_0]
    w = _weights(64, 512)["normal"]
    imp = _importance(512)
    codes, params = codec.quantize(torch.from_numpy(w), torch.from_numpy(imp))
    ours, theirs = codec.pack(codes, params), ggml_oracle.quantize(w, codec.ggml_type, imp)
    mine, ref = _weighted_block_errors(codec, w, imp, ours), _weighted_block_errors(codec, w, imp, theirs)
    assert mine.sum() < 0.5 * ref.sum(), (mine.sum(), ref.sum())
    d = ours.reshape(-1, codec.type_size)[:, :2].copy().view(np.float16)
    assert (d < 0).any() and (d > 0).any()
    assert (codes == 3).any() and not (codec.quantize(torch.from_numpy(w))[0] == 3).any()    # code 3 only searched


@pytest.fixture(scope="module")
def cases():
    return [(shape, name, w) for shape in SHAPES for name, w in _weights(*shape).items()]


@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bytes_equal_llama_cpp(qtype, imatrix, cases):
    codec = CODECS[qtype]
    for shape, name, w in cases:
        imp = _importance(shape[1]) if imatrix else None
        codes, params = codec.quantize(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
        ours = codec.pack(codes, params)
        theirs = ggml_oracle.quantize(w, qtype, imp)
        assert ours.shape == theirs.shape == (shape[0], codec.bytes_per_row(shape[1]))
        if imp is not None and not getattr(codec, "libggml_imatrix", True):
            _assert_no_worse_than_llama_cpp(codec, w, imp, ours, theirs, f"{shape} {name}")
        else:
            bad = (ours.reshape(-1, codec.type_size) != theirs.reshape(-1, codec.type_size)).any(1)
            assert not bad.any(), f"{qtype.name} {shape} {name}: {bad.sum()} of {bad.size} blocks differ"

        # llama.cpp's dequantization of our bytes == ours, exactly (value equality: +0.0 == -0.0)
        ref = _llama_dequantize(ours, qtype, shape[1])
        assert np.array_equal(codec.dequantize(codes, params).numpy(), ref)
        assert np.array_equal(codec.dequantize_bytes(ours, shape[1]).numpy(), ref)


@pytest.mark.parametrize("imatrix", [None, "plain", "edge"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_edge_cases_bytes_equal_llama_cpp(qtype, imatrix):
    codec = CODECS[qtype]
    w = _edge_weights(512)
    imp = {None: None, "plain": _importance(512), "edge": _edge_importance(512)}[imatrix]
    ours = codec.pack(*codec.quantize(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp)))
    theirs = ggml_oracle.quantize(w, qtype, imp)
    if imp is not None and not getattr(codec, "libggml_imatrix", True):
        return _assert_no_worse_than_llama_cpp(codec, w, imp, ours, theirs, f"edge rows, imatrix={imatrix}")
    bad = (ours.reshape(len(w), -1, codec.type_size) != theirs.reshape(len(w), -1, codec.type_size)).any(2)
    assert not bad.any(), f"{qtype.name} imatrix={imatrix}: blocks differ in edge rows {np.unique(bad.nonzero()[0])}"


@pytest.mark.parametrize("qtype", [t for t in TYPES if t.name in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1")],
                         ids=lambda t: t.name)
def test_bytes_equal_gguf_py_reference_quantize(qtype, cases):
    codec = CODECS[qtype]
    for shape, name, w in cases:
        ours = codec.pack(*codec.quantize(w))
        assert np.array_equal(ours, gguf.quants.quantize(w, qtype)), (shape, name)


@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_fit_codes_reproduce_rtn(qtype, imatrix):
    """What GPTQ uses, block by block: fit == quantize's parameters, codes == its codes, dequantize_codes == the
    dequantized bytes; pack(unpack(x)) == x; pack of foreign (GPTQ-like) codes round-trips."""
    codec = CODECS[qtype]
    B = codec.block
    w = _weights(16, 4 * max(B, 64), seed=3)["outliers"]
    w = torch.from_numpy(w)
    imp = torch.from_numpy(_importance(w.shape[1], seed=4)) if imatrix else None
    codes, params = codec.quantize(w, imp)
    data = codec.pack(codes, params)
    sigma2 = codec.row_sigma2(w)
    deq = torch.from_numpy(_llama_dequantize(data, qtype, w.shape[1]))
    for j, p in enumerate(params):
        sl = slice(j * B, (j + 1) * B)
        fp = codec.fit(w[:, sl], None if imp is None else imp[sl], sigma2=sigma2)
        assert torch.equal(fp.scale, p.scale) and torch.equal(fp.offset, p.offset)
        assert fp.scale.shape == (w.shape[0], B // codec.sub)
        q = codec.codes(w[:, sl], fp)
        assert q.dtype == torch.uint8 and int(q.max()) <= codec.qmax
        assert torch.equal(q, codes[:, sl])
        assert torch.equal(dequantize_codes(q, fp, codec.sub), deq[:, sl])

    # unpack / pack round trip, and nearest codes on unpacked parameters reproduce the weights' grid
    codes2, params2 = codec.unpack(data, w.shape[1])
    assert np.array_equal(codec.pack(codes2, params2), data)
    assert torch.equal(codec.dequantize(codes2, params2), deq)

    # codes that did not come from quantize (e.g. GPTQ's) pack and unpack faithfully
    g = torch.Generator().manual_seed(5)
    foreign = torch.randint(0, codec.qmax + 1, codes.shape, generator=g, dtype=torch.uint8)
    data3 = codec.pack(foreign, params)
    codes3, params3 = codec.unpack(data3, w.shape[1])
    assert torch.equal(codes3, foreign)
    assert np.array_equal(_llama_dequantize(data3, qtype, w.shape[1]), codec.dequantize(foreign, params).numpy())
    assert all(torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset) for a, b in zip(params, params3))


def test_bad_row_length_and_names():
    for qtype, codec in CODECS.items():
        cols = codec.block + 16
        with pytest.raises(TwinquantError, match=rf"{qtype.name}.*{codec.block}"):
            codec.quantize(torch.zeros(2, cols))
        with pytest.raises(TwinquantError, match=rf"{qtype.name}.*{codec.block}"):
            codec.bytes_per_row(cols)
        with pytest.raises(TwinquantError):
            codec.pack(torch.zeros(2, cols, dtype=torch.uint8), [])
        with pytest.raises(TwinquantError):
            codec.fit(torch.zeros(2, codec.block // 2))
        with pytest.raises(TwinquantError):
            codec.pack(torch.full((1, codec.block), codec.qmax + 1), codec.quantize(torch.ones(1, codec.block))[1])
        with pytest.raises(TwinquantError):
            codec.pack(torch.zeros(1, codec.block), [BlockParams(torch.ones(1, 1), torch.zeros(1, 1))])
        assert get_codec(qtype) is codec and get_codec(qtype.name.lower()) is codec and get_codec(int(qtype)) is codec
    with pytest.raises(TwinquantError, match="NVFP4"):
        get_codec("NVFP4")


def test_sizes():
    bpw = {"Q8_0": 8.5, "Q1_0": 1.125, "Q2_0": 2.25, "Q4_0": 4.5, "Q5_0": 5.5, "Q4_1": 5.0, "Q5_1": 6.0, "Q2_K": 2.625, "Q3_K": 3.4375,
           "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}
    for qtype, codec in CODECS.items():
        assert codec.bits_per_weight == bpw[qtype.name]
        assert codec.bytes_per_row(4096) == gguf.quant_shape_to_byte_shape((1, 4096), qtype)[1]
        assert codec.block % codec.sub == 0 and codec.ggml_type == qtype and codec.name == qtype.name


def _cuda():
    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device (run on a GPU machine)"))


@pytest.mark.parametrize("device", ["cpu", _cuda()])
def test_codecs_and_gptq_on_device(device):
    """Everything runs on the weights' device and gives the CPU's bytes (which the tests above tie to llama.cpp):
    quantize, fit + codes block by block, and GPTQ (whose float32/float64 matrix products may round differently
    on another device, so there only nearly all codes agree)."""
    w_all = np.concatenate([_weights(16, 512, seed=7)["outliers"], _edge_weights(512)])
    w = torch.from_numpy(w_all)
    imp = torch.from_numpy(_importance(512, seed=8))
    for qtype, codec in CODECS.items():
        for im in (None, imp):
            ref = codec.pack(*codec.quantize(w, im))
            codes, params = codec.quantize(w.to(device), None if im is None else im.to(device))
            assert codes.device.type == device and params[0].scale.device.type == device
            assert params[0].packed.d.device.type == device
            assert np.array_equal(codec.pack(codes, params), ref), (qtype.name, im is not None)
            B = codec.block
            sigma2 = codec.row_sigma2(w.to(device))
            fp = codec.fit(w[:, :B].to(device), None if im is None else im[:B].to(device), sigma2=sigma2)
            assert fp.scale.device.type == device
            assert torch.equal(fp.scale.cpu(), params[0].scale.cpu())
            assert torch.equal(codec.codes(w[:, :B].to(device), fp).cpu(), codes[:, :B].cpu())

    g = torch.Generator().manual_seed(9)
    x = torch.randn(1024, 512, generator=g) @ torch.randn(512, 512, generator=g) / 512 ** 0.5
    W = torch.randn(48, 512, generator=g) * 0.02
    H, _ = accumulate_hessian(None, 0, x)
    Hd, _ = accumulate_hessian(None, 0, x.to(device))
    assert Hd.device.type == device
    for name in ("Q4_K", "Q6_K", "Q4_0", "Q2_0"):
        codec = get_codec(name)
        ref = gptq(W, H, codec, importance=imp)
        r = gptq(W.to(device), Hd, codec, importance=imp.to(device))
        assert r.codes.device.type == device and r.dequantized.device.type == device
        agree = (r.codes.cpu() == ref.codes).float().mean().item()
        assert agree == 1.0 if device == "cpu" else agree > 0.99, (name, agree)
        # GPTQ factorises H in float32 (as the reference implementation): the flipped roundings on another device
        # move the loss by a few tenths of a percent (0.16 % seen on an H200 for Q4_K)
        assert r.loss == pytest.approx(ref.loss, rel=1e-3 if device == "cpu" else 1e-2)
        assert np.array_equal(codec.pack(r.codes, r.params), codec.pack(r.codes.cpu(), r.params))


@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_static_shapes_fit_gives_the_same_bits(qtype, imatrix):
    """A fit under static_shapes() (what a CUDA graph captures: every coordinate-descent pass on every sub-block,
    the fallback codes kept) gives the plain fit's parameters and codes, on the edge cases too."""
    from twinquant.formats.ggml._num import static_shapes

    codec = CODECS[qtype]
    B = codec.block
    w = torch.from_numpy(np.concatenate([_weights(16, 4 * max(B, 64), seed=3)["outliers"],
                                         _edge_weights(4 * max(B, 64))]))
    imp = torch.from_numpy(_edge_importance(w.shape[1])) if imatrix else None
    for j in range(w.shape[1] // B):
        sl = slice(j * B, (j + 1) * B)
        ib = None if imp is None else imp[sl]
        plain = codec.fit(w[:, sl], ib)
        with static_shapes():
            st = codec.fit(w[:, sl], ib)
        assert torch.equal(st.scale, plain.scale) and torch.equal(st.offset, plain.offset)
        for f in ("d", "dmin", "scales", "iscale"):
            a, b = getattr(plain.packed, f), getattr(st.packed, f)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f
        assert torch.equal(codec.codes(w[:, sl], st), codec.codes(w[:, sl], plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs on the lent H200)")
def test_gptq_fits_replayed_from_cuda_graphs_equal_eager_fits(monkeypatch):
    from twinquant.algorithms.fit_graphs import FitGraphs

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(300, 1024, generator=g) * 0.02).cuda()
    imp = torch.rand(1024, generator=g).cuda()
    graphs = FitGraphs()
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0"):
        codec = get_codec(qtype)
        for im in (None, imp):
            for j in range(3):          # the first captures, the others replay
                sl = slice(j * codec.block, (j + 1) * codec.block)
                ib = None if im is None else im[sl]
                a, b = graphs.fit(codec, w[:, sl], ib), codec.fit(w[:, sl], ib)
                assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset), (qtype, j)
    assert all(v is not False for v in graphs._graphs.values()), "a fit was not captured"
    # GPTQ with the graphs gives what it gives without them
    H = (lambda x: 2 * x.T @ x / x.shape[0])(torch.randn(2048, 1024, generator=g).cuda())
    with_graphs = gptq(w, H, get_codec("Q3_K"), importance=imp)
    monkeypatch.setenv("TWINQUANT_NO_FIT_GRAPHS", "1")
    without = gptq(w, H, get_codec("Q3_K"), importance=imp)
    assert torch.equal(with_graphs.codes, without.codes)


def test_fit_graphs_replay_check_tells_a_different_fit():
    """The check each CUDA graph passes once (its replay against the eager fit) compares every field's bits."""
    from twinquant.algorithms.fit_graphs import _equal

    w = torch.from_numpy(_weights(8, 256, seed=12)["normal"])
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q6_K"):
        codec = get_codec(qtype)
        a = codec.fit(w)
        assert _equal(a, codec.fit(w.clone()))
        w2 = w.clone()
        w2[0, 0] = 1.0                              # 50 sigma: the first sub-block's scale moves
        assert not _equal(a, codec.fit(w2)), qtype


@pytest.mark.parametrize("device", ["cpu", _cuda()])
def test_iquant_dequantization_in_torch_equals_gguf_py_bit_for_bit(device):
    """The i-quants dequantized in torch on the bytes' device (what block LDLQ does on a GPU) give gguf-py's
    float32 values bit for bit: on bytes the codecs wrote, and on random bytes that reach every field value (every
    grid index, sign pattern, scale nibble; NaN and inf scales included, compared by their bits)."""
    from twinquant.formats.ggml import iq_dequant

    seen = 0
    for qtype, codec in ALL_CODECS.items():
        if not getattr(codec, "blockwise", False):
            continue
        seen += 1
        assert iq_dequant.supports(qtype), qtype.name
        r = np.random.default_rng(int(qtype))
        w = torch.from_numpy((r.standard_normal((50, 2 * codec.block)) * 0.02).astype(np.float32))
        written = codec.quantize_bytes(w, torch.from_numpy(_importance(w.shape[1]))).reshape(-1, codec.type_size)
        noise = r.integers(0, 256, (4096, codec.type_size), dtype=np.uint8)
        for data in (written, noise):
            with np.errstate(invalid="ignore", over="ignore"):
                ref = gguf.quants.dequantize(data.reshape(-1), qtype).astype(np.float32).reshape(-1, codec.block)
            got = codec.dequantize_blocks(torch.from_numpy(data).to(device))
            assert got.device.type == device and got.dtype == torch.float32
            got = got.cpu().numpy()
            nan = np.isnan(ref)         # a NaN's payload is the device's own (CUDA's canonical NaN is not x86's)
            assert np.array_equal(np.isnan(got), nan), qtype.name
            assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32)), qtype.name
        rows = gguf.quants.dequantize(written.reshape(50, -1), qtype)          # whole rows, as a file is read
        assert torch.equal(codec.dequantize_bytes(written.reshape(50, -1), 2 * codec.block), torch.from_numpy(rows))
    assert seen == 9
