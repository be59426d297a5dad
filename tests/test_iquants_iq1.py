"""IQ1_S / IQ1_M against llama.cpp itself (ggml_quantize_chunk through ctypes, tests/ggml_oracle.py) and gguf-py:
identical bytes with an imatrix (IQ1_S needs one; IQ1_M also without), on normal, heavy-tailed, tied, outlier,
zero and edge rows, with plain and edge imatrices; gguf-py's dequantization; the same bytes on every device;
user errors."""

import gguf
import numpy as np
import pytest
import torch

from tests import ggml_oracle
from tests.test_ggml_codecs import _edge_importance, _edge_weights, _importance, _weights
from twinquant.errors import TwinquantError
from twinquant.formats.ggml.iq1 import IQ1_M, IQ1_S

CODECS = {"IQ1_S": IQ1_S(), "IQ1_M": IQ1_M()}
COLS = 1024


def _extreme(cols: int, seed: int = 3) -> np.ndarray:
    """Magnitudes near float32's ends that llama.cpp still quantizes (from ~1e19 up, its `scale >= 0` assert fails
    on NaN scales): huge, tiny and denormal-range rows, some with one large value in seven."""
    n = np.random.default_rng(seed).standard_normal(cols)
    spiky = np.where(np.arange(cols) % 7 == 0, 1.0, 1e-3)
    return np.stack([n * 1e17, np.abs(n) * 1e17, spiky * n * 1e17, n * 1e-20, spiky * n * 1e-20, n * 1e-38,
                     np.abs(n) * -1e-38, spiky * n * 1e-30]).astype(np.float32)


def _cases():
    out = list(_weights(16, COLS).items())
    out += [("edge", _edge_weights(COLS)), ("extreme", _extreme(COLS))]
    return out


IMATRICES = {"plain": _importance, "edge": _edge_importance, None: lambda cols: None}
PARAMS = [(t, im) for t in CODECS for im in IMATRICES if not (t == "IQ1_S" and im is None)]


@pytest.fixture(scope="module")
def cases():
    return _cases()


@pytest.mark.parametrize("qtype,imatrix", PARAMS, ids=[f"{t}-{im}" for t, im in PARAMS])
def test_bytes_equal_llama_cpp(qtype, imatrix, cases):
    codec = CODECS[qtype]
    imp = IMATRICES[imatrix](COLS)
    for name, w in cases:
        ours = codec.quantize_bytes(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
        theirs = ggml_oracle.quantize(w, codec.ggml_type, imp)
        assert ours.shape == theirs.shape == (len(w), codec.bytes_per_row(COLS))
        bad = (ours.reshape(len(w), -1, codec.type_size) != theirs.reshape(len(w), -1, codec.type_size)).any(2)
        assert not bad.any(), f"{qtype} imatrix={imatrix} {name}: blocks differ in rows {np.unique(bad.nonzero()[0])}"

        # gguf-py's dequantization of our bytes is what dequantize_bytes gives, exactly
        ref = gguf.quants.dequantize(ours, codec.ggml_type)
        assert np.array_equal(codec.dequantize_bytes(ours, COLS).numpy(), ref, equal_nan=True)


def test_blocks_are_independent():
    """quantize_blocks on any subset of blocks (as the error-feedback quantizer calls it) gives those blocks' bytes."""
    w = _weights(8, 1024, seed=4)["outliers"]
    imp = np.tile(_importance(1024, seed=5), (8, 1)).reshape(-1, 256)
    for codec in CODECS.values():
        full = codec.quantize_blocks(w.reshape(-1, 256), imp)
        pick = np.array([5, 0, 17, 3])
        assert np.array_equal(codec.quantize_blocks(w.reshape(-1, 256)[pick], imp[pick]), full[pick])


def test_user_errors():
    for codec in CODECS.values():
        with pytest.raises(TwinquantError, match=rf"{codec.name}.*256"):
            codec.quantize_bytes(torch.zeros(2, 256 + 32), torch.ones(256 + 32))
        with pytest.raises(TwinquantError, match=codec.name):
            codec.quantize_bytes(torch.zeros(2, 256), torch.ones(255))
        with pytest.raises(TwinquantError, match=codec.name):
            codec.dequantize_bytes(np.zeros(codec.type_size + 1, np.uint8), 256)
    with pytest.raises(TwinquantError, match="IQ1_S needs an importance matrix"):
        IQ1_S().quantize_bytes(torch.zeros(2, 256))
    assert IQ1_S.needs_imatrix and not IQ1_M.needs_imatrix


def test_sizes():
    for codec in CODECS.values():
        assert codec.bytes_per_row(4096) == gguf.quant_shape_to_byte_shape((1, 4096), codec.ggml_type)[1]
    assert CODECS["IQ1_S"].bits_per_weight == 1.5625 and CODECS["IQ1_M"].bits_per_weight == 1.75


def _cuda():
    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device (run on a GPU machine)"))


@pytest.mark.parametrize("device", ["cpu", _cuda()])
def test_same_bytes_on_device(device):
    w = torch.from_numpy(np.concatenate([_weights(16, 512, seed=7)["outliers"], _edge_weights(512), _extreme(512)]))
    for imp in (torch.from_numpy(_importance(512, seed=8)), torch.from_numpy(_edge_importance(512))):
        for codec in CODECS.values():
            ref = codec.quantize_bytes(w, imp)
            assert np.array_equal(codec.quantize_bytes(w.to(device), imp.to(device)), ref), codec.name
    assert np.array_equal(IQ1_M().quantize_bytes(w.to(device)), IQ1_M().quantize_bytes(w))


@pytest.mark.parametrize("seed", range(4))
def test_candidate_scan_in_passes_equals_the_row_loop(seed, monkeypatch):
    """The split searches accept candidates in C's order: the scan in passes (each sub-block jumps to its next
    accepted row) and the row-by-row scan agree on every sub-block's best and winner, with rows that sumq2 <= 0
    rules out (NaN), exact ties and a running best carried in from an earlier call."""
    from twinquant.formats.ggml import iq1

    monkeypatch.setattr(iq1, "_SCAN_IN_PASSES", {})               # passes on this CPU too (a GPU's default)
    g = torch.Generator().manual_seed(seed)
    n, S = 70, 300
    sqx = torch.randn(n, S, generator=g)
    sq2 = torch.rand(n, S, generator=g) + 0.05
    sq2[torch.rand(n, S, generator=g) < 0.1] = 0.0                       # ruled out
    sqx[10:20] = sqx[:10]                                                  # exact ties with earlier rows
    sq2[10:20] = sq2[:10]
    x2, q2, s = iq1._record_prep(sqx, sq2)
    start = torch.where(torch.rand(S, generator=g) < 0.5, torch.rand(S, generator=g), -iq1.FLT_MAX)
    b1, i1 = start.clone(), torch.full((S,), -1, dtype=torch.long)
    b2, i2 = start.clone(), torch.full((S,), -1, dtype=torch.long)
    iq1._scan(b1, i1, x2, q2, s, 5)
    iq1._scan_rows(b2, i2, x2, q2, s, 5)
    assert torch.equal(i1, i2) and torch.equal(b1, b2)
    assert (i1 >= 5).sum() > S // 2                                        # most sub-blocks accepted something


def test_iq1_searches_in_passes_give_llama_cpp_bytes(monkeypatch):
    """IQ1_S / IQ1_M quantized with the scan in passes (what a GPU runs) give libggml's bytes on this CPU."""
    from twinquant.formats.ggml import iq1

    monkeypatch.setattr(iq1, "_SCAN_IN_PASSES", {})
    imp = _importance(COLS, seed=12)
    for codec in (IQ1_S(), IQ1_M()):
        for name, w in _cases():
            got = codec.quantize_bytes(torch.from_numpy(w), torch.from_numpy(imp))
            assert np.array_equal(got, ggml_oracle.quantize(w, codec.ggml_type, imp)), (codec.name, name)
