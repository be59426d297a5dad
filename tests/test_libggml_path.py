"""The CPU fast path of the i-quants (twinquant.formats.ggml.libggml): the same bytes as the torch codecs, for
whole matrices (RTN, with and without an imatrix, split over threads) and inside block LDLQ."""

import numpy as np
import pytest
import torch

from twinquant.algorithms.gptq_blocks import gptq_blocks
from twinquant.formats import codec_for
from twinquant.formats.ggml import libggml


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setenv("TWINQUANT_LIBGGML", "1")
    assert libggml.enabled(), "llama-cpp-python's libggml-base could not be loaded (it is part of the test install)"


def _torch_path(monkeypatch, fn):
    monkeypatch.setenv("TWINQUANT_LIBGGML", "0")
    try:
        return fn()
    finally:
        monkeypatch.setenv("TWINQUANT_LIBGGML", "1")


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ2_XS", "IQ3_S", "IQ1_M", "IQ4_XS"])
def test_whole_matrix_bytes_equal_the_torch_codec(fast, monkeypatch, type_name):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 512, generator=g) * torch.rand(512, generator=g)   # 300 rows: split over threads
    imp = torch.rand(512, generator=g) + 0.01
    codec = codec_for(type_name, 512)
    for im in ([imp] if codec.needs_imatrix else [imp, None]):
        fast_bytes = codec.quantize_bytes(w, im)
        slow_bytes = _torch_path(monkeypatch, lambda: codec.quantize_bytes(w, im))
        assert fast_bytes.shape == slow_bytes.shape
        assert np.array_equal(fast_bytes, slow_bytes), (type_name, im is None)
        # split in 4 threads or done in one: the same
        assert np.array_equal(libggml.quantize_rows(codec.ggml_type, w, im, threads=4),
                              libggml.quantize_rows(codec.ggml_type, w, im, threads=1))


def test_block_ldlq_gives_the_same_result_either_way(fast, monkeypatch):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2048, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512 ** 0.5)
    H = X.T @ X / X.shape[0]
    W = torch.randn(96, 512, generator=g)
    codec = codec_for("IQ2_XS", 512)
    a = gptq_blocks(W, H, codec, 0.01, None)
    b = _torch_path(monkeypatch, lambda: gptq_blocks(W, H, codec, 0.01, None))
    assert np.array_equal(a.data, b.data)
    assert torch.equal(a.dequantized, b.dequantized)


def test_rows_with_different_weights_keep_the_torch_codec(fast, monkeypatch):
    """libggml takes one imatrix for all rows: blocks with their own weights must not go through it."""
    calls = []
    monkeypatch.setattr(libggml, "quantize_rows", lambda *a, **k: calls.append(a) or None)
    codec = codec_for("IQ4_XS", 256)
    x = torch.randn(4, 256)
    qw = torch.rand(4, 256) + 0.1
    out = codec.quantize_blocks(x, qw)
    assert not calls and out.shape == (4, codec.type_size)
    codec.quantize_blocks(x, qw[:1].expand(4, 256))
    assert len(calls) == 1


@pytest.mark.parametrize("type_name", ["Q2_K", "Q4_K", "Q6_K", "Q4_0", "Q8_0"])
def test_rtn_into_affine_ggml_types_is_the_same_either_way(fast, monkeypatch, type_name):
    """quantize_to_format with RTN: libggml's bytes and dequantization == the torch codec's (codes, params)."""
    from twinquant.algorithms.backends import get_quantizer, quantize_to_format

    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 512, generator=g) * 0.02
    imp = torch.rand(512, generator=g) + 0.01
    codec = codec_for(type_name, 512)
    rtn = get_quantizer("rtn")
    for im in (imp, None):
        d1, h1 = quantize_to_format(rtn, w, codec, importance=im)
        d2, h2 = _torch_path(monkeypatch, lambda: quantize_to_format(rtn, w, codec, importance=im))
        assert np.array_equal(np.asarray(d1), np.asarray(d2)), (type_name, im is None)
        assert torch.equal(h1.float(), h2.float())


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_gptq_into_k_quants_is_the_same_with_libggml_fits(fast, monkeypatch, type_name):
    """GPTQ fits each K-quant block through libggml on a CPU: the same parameters, so the same codes and loss."""
    from twinquant.algorithms.gptq import gptq

    g = torch.Generator().manual_seed(4)
    X = torch.randn(1024, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512 ** 0.5)
    H = X.T @ X / X.shape[0]
    W = torch.randn(64, 512, generator=g) * 0.02
    codec = codec_for(type_name, 512)
    for imp in (None, torch.diagonal(H).clone()):
        a = gptq(W, H, codec, importance=imp)
        b = _torch_path(monkeypatch, lambda: gptq(W, H, codec, importance=imp))
        assert torch.equal(a.codes, b.codes) and a.loss == b.loss
        assert np.array_equal(codec.pack(a.codes, a.params), codec.pack(b.codes, b.params))
