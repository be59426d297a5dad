"""IQ2_XXS, IQ2_XS, IQ2_S against llama.cpp itself (ggml_quantize_chunk, tests/ggml_oracle.py) and gguf-py: identical
bytes with an imatrix (plain and with zero / tiny / huge entries) and, for IQ2_S, without one, on several weight
distributions, llama.cpp's edge rows and a matrix built to reach its rare branches (negative sub-block scales,
sub-blocks without importance); identical dequantization; user errors."""

import gguf
import numpy as np
import pytest
import torch

from tests import ggml_oracle
from tests.test_ggml_codecs import _edge_importance, _edge_weights, _importance, _weights
from twinquant.errors import TwinquantError
from twinquant.formats.ggml import iq2

T = gguf.GGMLQuantizationType
CODECS = {T.IQ2_XXS: iq2.IQ2_XXS(), T.IQ2_XS: iq2.IQ2_XS(), T.IQ2_S: iq2.IQ2_S()}
SHAPES = [(16, 512), (8, 2048)]
IMATRIX = {T.IQ2_XXS: ["plain", "edge"], T.IQ2_XS: ["plain", "edge"], T.IQ2_S: [None, "plain", "edge"]}
PARAMS = [(t, im) for t in CODECS for im in IMATRIX[t]]


def _imp(kind, cols):
    return {None: None, "plain": _importance(cols), "edge": _edge_importance(cols)}[kind]


def _rare_branches(cols: int = 512):
    """Rows where llama.cpp's search picks a negative scale (a group's kept negative sign carries a huge weight:
    the tiny negative x of the column of huge importance has the smallest w*x^2 yet dominates sumqx, so every
    sign of the sub-block is inverted), and columns without importance (XS/S keep max/5 and the grid point 0)."""
    r = np.random.default_rng(11)
    imp = np.ones(cols, np.float32)
    imp[0::8] = 1e9
    imp[256:320] = 0
    w = np.abs(r.standard_normal((4, cols))).astype(np.float32) + 0.5
    w[:, 0::8] = -1e-4
    w[1, 0::8] = -1e-5
    w[2] *= np.where(r.random(cols) < 0.5, -1, 1)
    w[3, 0::16] = -3e-4
    return w, imp


def _assert_same(codec, w, imp, what):
    ours = codec.quantize_bytes(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
    theirs = ggml_oracle.quantize(w, codec.ggml_type, imp)
    assert ours.shape == theirs.shape == (w.shape[0], codec.bytes_per_row(w.shape[1]))
    bad = (ours.reshape(-1, codec.type_size) != theirs.reshape(-1, codec.type_size)).any(1)
    assert not bad.any(), f"{codec.name} {what}: {bad.sum()} of {bad.size} blocks differ"
    return ours


@pytest.mark.parametrize("qtype,imatrix", PARAMS, ids=[f"{t.name}-{im}" for t, im in PARAMS])
def test_bytes_equal_llama_cpp(qtype, imatrix):
    codec = CODECS[qtype]
    for shape in SHAPES:
        imp = _imp(imatrix, shape[1])
        for name, w in _weights(*shape).items():
            ours = _assert_same(codec, w, imp, f"{shape} {name}")
            # gguf-py's dequantization of our bytes == ours, exactly
            ref = gguf.quants.dequantize(ours, qtype)
            assert np.array_equal(codec.dequantize_bytes(ours, shape[1]).numpy(), ref)


@pytest.mark.parametrize("qtype,imatrix", PARAMS, ids=[f"{t.name}-{im}" for t, im in PARAMS])
def test_edge_rows_bytes_equal_llama_cpp(qtype, imatrix):
    _assert_same(CODECS[qtype], _edge_weights(512), _imp(imatrix, 512), "edge rows")


@pytest.mark.parametrize("qtype", list(CODECS), ids=lambda t: t.name)
def test_rare_branches_bytes_equal_llama_cpp(qtype):
    w, imp = _rare_branches()
    _assert_same(CODECS[qtype], w, imp, "negative scales / zero importance")


@pytest.mark.parametrize("qtype", list(CODECS), ids=lambda t: t.name)
def test_all_zero_matrix(qtype):
    """Every block of the call is zero (no sub-block reaches the search)."""
    _assert_same(CODECS[qtype], np.zeros((2, 512), np.float32), _importance(512), "zeros")


def test_negative_scale_branch_is_reached():
    """The crafted rows do reach the sign-inverting branch of XXS and XS (so the test above checks it)."""
    w, imp = _rare_branches()
    for codec in (CODECS[T.IQ2_XXS], CODECS[T.IQ2_XS]):
        seen = []
        orig = iq2._IQ2._subblocks

        def spy(self, *a):
            sc, g = orig(self, *a)
            seen.append(int((sc < 0).sum()))
            return sc, g

        iq2._IQ2._subblocks = spy
        try:
            codec.quantize_bytes(w, imp)
        finally:
            iq2._IQ2._subblocks = orig
        assert sum(seen) > 0, codec.name


def test_blocks_are_independent():
    """quantize_blocks on any subset of blocks gives those blocks' bytes (what GPTQ-style callers rely on)."""
    codec = CODECS[T.IQ2_XS]
    w = _weights(8, 1024, seed=9)["normal"]
    imp = _importance(1024, seed=9)
    full = codec.quantize_bytes(w, imp).reshape(-1, codec.type_size)
    x = torch.from_numpy(w).reshape(-1, 256)
    qw = torch.from_numpy(imp)[None].expand(8, -1).reshape(-1, 256)
    pick = torch.tensor([3, 0, 17, 30])
    assert np.array_equal(codec.quantize_blocks(x[pick], qw[pick]), full[pick.numpy()])


def test_grids_match_gguf():
    """Our decoding of gguf-py's packed grids: levels l map to gguf's dequantization grid values."""
    for qtype in CODECS:
        cls = gguf.quants._type_traits[qtype]
        cls.init_grid()
        lev = iq2._grid_levels(qtype)
        assert np.array_equal(np.asarray(cls.grid_map, np.float32)[lev], cls.grid.reshape(lev.shape))
        assert lev.max() == 2 and len(np.unique(lev @ 3 ** np.arange(8))) == len(lev)


def test_errors():
    for qtype, codec in CODECS.items():
        assert codec.ggml_type == qtype and codec.name == qtype.name
        assert codec.bytes_per_row(512) == gguf.quant_shape_to_byte_shape((1, 512), qtype)[1]
        with pytest.raises(TwinquantError, match=rf"{qtype.name}.*256"):
            codec.quantize_bytes(torch.zeros(2, 256 + 32), _importance(288))
        with pytest.raises(TwinquantError, match=qtype.name):
            codec.quantize_bytes(torch.zeros(2, 512), _importance(256))
        with pytest.raises(TwinquantError):
            codec.dequantize_bytes(np.zeros(codec.type_size + 1, np.uint8), 256)
    for qtype in (T.IQ2_XXS, T.IQ2_XS):
        assert CODECS[qtype].needs_imatrix
        with pytest.raises(TwinquantError, match="importance"):
            CODECS[qtype].quantize_bytes(torch.ones(2, 256))
    assert not CODECS[T.IQ2_S].needs_imatrix


def _cuda():
    return pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA device (run on a GPU machine)"))


@pytest.mark.parametrize("device", [_cuda()])
def test_same_bytes_on_device(device):
    w = np.concatenate([_weights(8, 512, seed=7)["outliers"], _edge_weights(512), _rare_branches()[0]])
    for imp in (_importance(512, seed=8), _edge_importance(512), _rare_branches()[1], None):
        for codec in CODECS.values():
            if imp is None and codec.needs_imatrix:
                continue
            ref = codec.quantize_bytes(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
            got = codec.quantize_bytes(torch.from_numpy(w).to(device),
                                       None if imp is None else torch.from_numpy(imp).to(device))
            assert np.array_equal(got, ref), codec.name


def test_the_gpus_coarse_list_widths_give_llama_cpps_bytes(monkeypatch):
    # a GPU pads the neighbour lists to 4 widths (fewer ops a search), a CPU to 30 (fewer padded terms): padding never
    # wins, so the bytes are llama.cpp's either way — checked here by giving the CPU the GPU's widths
    monkeypatch.setitem(iq2._WIDTHS, "cpu", iq2._WIDTHS["cuda"])
    iq2._tables.cache_clear()
    try:
        assert iq2._tables(T.IQ2_XS, 2, torch.device("cpu"))["widths"] == iq2._WIDTHS["cuda"]
        w, imp = _rare_branches()
        w = np.concatenate([_weights(8, 512, seed=7)["outliers"], _edge_weights(512), w])
        for qtype, codec in CODECS.items():
            for kind in IMATRIX[qtype]:
                _assert_same(codec, w, _imp(kind, 512) if kind != "edge" else _edge_importance(512), f"{kind}")
            _assert_same(codec, w, imp, "rare branches")
    finally:
        iq2._tables.cache_clear()
