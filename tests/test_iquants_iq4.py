"""IQ4_NL / IQ4_XS against llama.cpp itself (ggml_quantize_chunk through tests/ggml_oracle.py) and gguf-py:
identical bytes with and without an imatrix (edge rows and an edge imatrix too), identical dequantization,
llama.cpp's best_index_int8 on crafted values, nearest_levels, the same bytes on every device, user errors."""

import gguf
import numpy as np
import pytest
import torch

from tests import ggml_oracle
from tests.test_ggml_codecs import _edge_importance, _edge_weights, _importance, _weights
from twinquant.errors import TwinquantError
from twinquant.formats.ggml.iq4 import IQ4_NL, IQ4_XS, KVALUES, best_index

CODECS = [IQ4_NL(), IQ4_XS()]
SHAPES = [(32, 512), (8, 2048)]


_check = ggml_oracle.assert_same_bytes


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_bytes_equal_llama_cpp(codec, imatrix):
    for shape in SHAPES:
        for name, w in _weights(*shape).items():
            imp = _importance(shape[1]) if imatrix else None
            ours = _check(codec, w, imp, f"{shape} {name}")
            # gguf-py's dequantization of our bytes == ours, exactly
            ref = gguf.quants.dequantize(ours, codec.ggml_type)
            assert np.array_equal(codec.dequantize_bytes(ours, shape[1]).numpy(), ref)


@pytest.mark.parametrize("imatrix", [None, "plain", "edge"])
@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_edge_cases_bytes_equal_llama_cpp(codec, imatrix):
    w = _edge_weights(1024)
    imp = {None: None, "plain": _importance(1024), "edge": _edge_importance(1024)}[imatrix]
    _check(codec, w, imp, f"edge rows, imatrix={imatrix}")


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_near_ties_bytes_equal_llama_cpp(codec):
    """Weights on and next to the level midpoints of the first-guess multiplier and to the grid itself, so that
    best_index_int8's tie rule and the strict candidate comparison decide many codes."""
    r = np.random.default_rng(11)
    rows, cols = 16, 1024
    lv = KVALUES.astype(np.float32)
    mids = (lv[:-1] + lv[1:]) / 2
    pick = r.choice(np.concatenate([lv, mids]), (rows, cols)).astype(np.float32)
    w = pick / np.float32(127)
    w[::2] = np.nextafter(w[::2], r.choice([-np.inf, np.inf], (rows // 2, cols)).astype(np.float32))
    w[:, ::32] = 1.0                                    # the sub-block max, so the first guess multiplier is 127
    w[3] = r.integers(-3, 4, cols) * np.float32(0.5)   # many equal values: exact ties in every candidate
    _check(codec, w.astype(np.float32), None, "near ties")
    _check(codec, w.astype(np.float32), _importance(cols, seed=12), "near ties, imatrix")


def _best_index_c(x: np.float32) -> int:
    """llama.cpp's best_index_int8(16, kvalues_iq4nl, x), literally (binary search, float32 differences)."""
    v = [np.float32(k) for k in KVALUES]
    if x <= v[0]:
        return 0
    if x >= v[-1]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < v[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(x - v[mu - 1]) < np.float32(v[mu] - x) else mu


def test_best_index_matches_c():
    r = np.random.default_rng(3)
    lv = KVALUES.astype(np.float32)
    mids = ((lv[:-1] + lv[1:]) / 2).astype(np.float32)
    xs = np.concatenate([r.standard_normal(3000) * 60, r.standard_normal(500) * 1e-3, lv, mids,
                         np.nextafter(mids, np.float32(-np.inf)), np.nextafter(mids, np.float32(np.inf)),
                         np.nextafter(lv, np.float32(-np.inf)), np.nextafter(lv, np.float32(np.inf)),
                         [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 1e30, -1e30, 3e38]]).astype(np.float32)
    ours = best_index(torch.from_numpy(xs)).numpy()
    assert np.array_equal(ours, [_best_index_c(x) for x in xs])


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_nearest_levels_reproduce_codes(codec):
    """nearest_levels with the stored effective scale gives, for every weight, the same value as the dequantized
    bytes (IQ4_NL: the codes are llama.cpp's except where its float32 d and the fp16 one round differently)."""
    w = torch.from_numpy(_weights(8, 1024, seed=4)["normal"])
    data = codec.quantize_bytes(w)
    deq = codec.dequantize_bytes(data, 1024)
    # the effective scale of each weight: the dequantized value of a level-127 code, from the stored bytes
    blocks = data.reshape(-1, codec.type_size)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1, 1)
    if codec.name == "IQ4_XS":
        sh = blocks[:, 2:4].copy().view("<u2").astype(np.int32)
        sl = blocks[:, 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        d = (d * (ls - 32).astype(np.float32)).astype(np.float32)
    scale = torch.from_numpy(np.repeat(d, 32, axis=1).reshape(w.shape))
    idx, val = codec.nearest_levels(w, scale)
    assert idx.dtype == torch.uint8 and val.dtype == torch.float32 and int(idx.max()) <= 15
    assert torch.equal(val, scale * torch.from_numpy(KVALUES.astype(np.float32))[idx.long()])
    # the values are the nearest levels: no level of the same scale is strictly closer
    levels = scale[..., None] * torch.from_numpy(KVALUES.astype(np.float32))
    err = (levels - w[..., None]).abs()
    assert torch.all((val - w).abs() <= err.amin(-1) * (1 + 1e-6) + 1e-30)
    # and mostly llama.cpp's own choice (it rounds with the float32 scale before fp16 storage)
    assert (val == deq).float().mean() > 0.97
    zero_idx, zero_val = codec.nearest_levels(w, torch.zeros_like(w))
    assert torch.all(zero_idx == 8) and torch.all(zero_val == 0)


def test_errors_and_sizes():
    for codec, bpw in zip(CODECS, (4.5, 4.25)):
        assert codec.bits_per_weight == bpw and not codec.needs_imatrix
        assert codec.bytes_per_row(4096) == gguf.quant_shape_to_byte_shape((1, 4096), codec.ggml_type)[1]
        with pytest.raises(TwinquantError, match=rf"{codec.name}.*{codec.block}"):
            codec.quantize_bytes(torch.zeros(2, codec.block + 16))
        with pytest.raises(TwinquantError, match=codec.name):
            codec.quantize_bytes(torch.zeros(2, codec.block), torch.ones(codec.block + 1))
        with pytest.raises(TwinquantError):
            codec.dequantize_bytes(np.zeros(codec.type_size + 1, np.uint8), codec.block)


def _cuda():
    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device (run on a GPU machine)"))


@pytest.mark.parametrize("device", ["cpu", _cuda()])
def test_same_bytes_on_device(device):
    w = torch.from_numpy(np.concatenate([_weights(16, 1024, seed=7)["outliers"], _edge_weights(1024)]))
    for codec in CODECS:
        for imp in (None, torch.from_numpy(_importance(1024, seed=8)), torch.from_numpy(_edge_importance(1024))):
            ref = codec.quantize_bytes(w, imp)
            got = codec.quantize_bytes(w.to(device), None if imp is None else imp.to(device))
            assert np.array_equal(got, ref), (codec.name, imp is not None)
        idx, val = codec.nearest_levels(w.to(device), torch.full_like(w, 0.01).to(device))
        assert idx.device.type == device
        assert torch.equal(idx.cpu(), codec.nearest_levels(w, torch.full_like(w, 0.01))[0])
