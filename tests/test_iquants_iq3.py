"""IQ3_XXS / IQ3_S against llama.cpp itself (ggml_quantize_chunk through tests/ggml_oracle.py) and gguf-py:
identical bytes with and without an imatrix (edge rows, an edge imatrix, crafted rows for the negative-scale flip
and the skipped sub-blocks), identical dequantization, the neighbour lists of iq3xs_init_impl, the same bytes on
every device, user errors."""

import gguf
import numpy as np
import pytest
import torch

from tests import ggml_oracle
from tests.test_ggml_codecs import _edge_importance, _edge_weights, _importance, _weights
from twinquant.errors import TwinquantError
from twinquant.formats.ggml.iq3 import IQ3_S, IQ3_XXS, _lattice

CODECS = [IQ3_XXS(), IQ3_S()]
SHAPES = [(16, 512), (8, 1024)]


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
    w = _edge_weights(512)
    imp = {None: None, "plain": _importance(512), "edge": _edge_importance(512)}[imatrix]
    _check(codec, w, imp, f"edge rows, imatrix={imatrix}")


def _crafted(cols: int = 512):
    """Rows for the rarely taken paths, and an imatrix that makes IQ3_XXS's parity flip produce a negative scale:
    in the first 8 weights of every super-block one small negative weight with a large importance next to 7
    large positive ones with a tiny importance (the small one has the least w*x*x, so it is the one flipped, and
    its negated magnitude outweighs the others in sum(w*xval*q))."""
    r = np.random.default_rng(21)
    w = (r.standard_normal((6, cols)) * 0.5).astype(np.float32)
    imp = np.ones(cols, np.float32)
    for sb in range(0, cols, 256):
        imp[sb + 1: sb + 8] = 1e-6
        w[:, sb] = -0.001
        w[:, sb + 1: sb + 8] = 1.0
        w[:, sb + 8: sb + 32] = 0                   # (rows 0, 1 and 3 keep this in every super-block)
    w[1, 256 + 32: 256 + 96] = 0                    # zero sub-blocks 1 and 2 in the middle of a super-block
    w[2, 256: 256 + 224] = 0                        # only the last sub-block non-zero
    w[3, 256 + 64: 256 + 96] *= 1e-9                # max < 1e-8: skipped by IQ3_XXS, not by IQ3_S
    w[4] = r.integers(-2, 3, cols) * np.float32(0.25)   # few distinct values: exact ties everywhere
    w[5, ::2] = -w[5, ::2]
    return w, imp


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_crafted_bytes_equal_llama_cpp(codec):
    w, imp = _crafted()
    _check(codec, w, None, "crafted rows")
    ours = _check(codec, w, imp, "crafted rows, imatrix")
    blocks = ours.reshape(w.shape[0], -1, codec.type_size)
    if codec.name == "IQ3_XXS":
        # the flip happened: llama.cpp stored the complement of the 7 sign bits of the first group (whose own
        # signs, after the parity flip, are all +)
        sas = blocks[[0, 1, 3], :, 66:70].copy().view("<u4")[..., 0]
        assert np.all(sas & 127 == 127)
    else:
        # the skipped sub-blocks 1, 2 shifted the later indices and signs up: the last two slots stay zero
        assert np.all(blocks[1, 1, 2 + 48: 2 + 64] == 0) and np.any(blocks[1, 1, 2 + 32: 2 + 48] != 0)
        assert np.all(blocks[1, 1, 74 + 24: 74 + 32] == 0)


def _neighbours_c(grid_size: int, u: int, lv: np.ndarray) -> list[int]:
    """iq3xs_init_impl's neighbour list of lattice point u, literally: all grid points by (distance, index), cut
    after the 2 (256-point grid) or 3 (512) smallest distances."""
    nwant = 2 if grid_size == 256 else 3
    pos = [2 * ((u >> 3 * k) & 7) + 1 for k in range(4)]
    dist = sorted((sum((2 * int(g[k]) + 1 - pos[k]) ** 2 for k in range(4)), j) for j, g in enumerate(lv))
    out, d2, nhave = [], dist[0][0], 1
    for d, j in dist:
        if d > d2:
            if nhave == nwant:
                break
            d2, nhave = d, nhave + 1
        out.append(j)
    return out


@pytest.mark.parametrize("grid_size", [256, 512])
def test_neighbour_lists_match_llama_cpp(grid_size):
    lat = _lattice(grid_size, torch.device("cpu"))
    lv = ((lat.q.numpy() - 1) / 2).astype(np.int64)
    kmap = lat.kmap.numpy()
    assert np.array_equal(kmap[(lv << np.array([0, 3, 6, 9])).sum(1)], np.arange(grid_size))
    assert (kmap >= 0).sum() == grid_size
    r = np.random.default_rng(grid_size)
    off = np.flatnonzero(kmap < 0)
    for u in np.concatenate([off[:64], r.choice(off, 400, replace=False)]):
        b = int(lat.bucket[u])
        cap = lat.caps[b]
        terms = lat.nb_t[b][u].view(4, cap).numpy()
        n = int((terms[0] != 32).sum())
        ours = lat.nb_j[b][u, :n].tolist()
        assert ours == _neighbours_c(grid_size, int(u), lv), u
        # the terms name the neighbours' levels, the padding only the +inf column
        assert np.array_equal(terms[:, :n], (np.arange(4)[:, None] * 8 + lv[ours].T))
        assert np.all(terms[:, n:] == 32)
        assert b == 0 or lat.caps[b - 1] < n <= cap


def test_errors_and_sizes():
    for codec, bpw in zip(CODECS, (3.0625, 3.4375)):
        assert codec.bits_per_weight == bpw and not codec.needs_imatrix
        assert codec.bytes_per_row(4096) == gguf.quant_shape_to_byte_shape((1, 4096), codec.ggml_type)[1]
        with pytest.raises(TwinquantError, match=rf"{codec.name}.*{codec.block}"):
            codec.quantize_bytes(torch.zeros(2, codec.block + 32))
        with pytest.raises(TwinquantError, match=codec.name):
            codec.quantize_bytes(torch.zeros(2, codec.block), torch.ones(codec.block + 1))
        with pytest.raises(TwinquantError):
            codec.dequantize_bytes(np.zeros(codec.type_size + 1, np.uint8), codec.block)


def _cuda():
    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device (run on a GPU machine)"))


@pytest.mark.parametrize("device", ["cpu", _cuda()])
def test_same_bytes_on_device(device):
    """The CPU's bytes on every device; on the CPU, the rows in reverse order (blocks are independent)."""
    cw, cimp = _crafted()
    w = torch.from_numpy(np.concatenate([_weights(8, 512, seed=7)["outliers"], _edge_weights(512), cw]))
    for codec in CODECS:
        for imp in (None, _edge_importance(512), cimp):
            imp = None if imp is None else torch.from_numpy(imp)
            ref = codec.quantize_bytes(w, imp)
            if device == "cpu":
                got = codec.quantize_bytes(w.flip(0), imp)[::-1]
            else:
                got = codec.quantize_bytes(w.to(device), None if imp is None else imp.to(device))
            assert np.array_equal(got, ref), (codec.name, imp is not None)
