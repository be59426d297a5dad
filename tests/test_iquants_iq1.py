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
