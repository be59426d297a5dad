"""ctypes binding to llama.cpp's own quantizer, the oracle for `twinquant.formats.ggml`.

llama-cpp-python ships libggml-base (ggml.c + ggml-quants.c) inside its package (`llama_cpp/lib/`); we call

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);

which is exactly what `llama-quantize` runs per tensor (no imatrix: the `quantize_row_*_ref` path; with one: the
`quantize_row_*_impl` path with `quant_weights`), and `ggml_row_size` for the packed size of a row; `dequantize`
calls the type's `to_float` from `ggml_get_type_traits` (what llama.cpp's CPU backend dequantizes with), the oracle
for types gguf-py cannot dequantize (Q1_0).
"""

from __future__ import annotations

import ctypes

import numpy as np


def _lib() -> ctypes.CDLL:
    """The binding twinquant's CPU fast path uses too (`twinquant.formats.ggml.libggml`): one place for the ctypes
    signatures. Here it is the oracle, so the torch codecs are compared with it (tests run with TWINQUANT_LIBGGML=0)."""
    from twinquant.formats.ggml import libggml

    lib = libggml._lib()
    if lib is None:
        raise FileNotFoundError("llama-cpp-python's libggml-base could not be loaded (part of the test install)")
    return lib


def quantize(w: np.ndarray, ggml_type: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's bytes for a float32 matrix [rows, cols]: uint8 [rows, row_size]."""
    lib = _lib()
    src = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = src.shape
    row_size = lib.ggml_row_size(int(ggml_type), cols)
    dst = np.zeros((rows, row_size), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw is not None:
        assert qw.shape == (cols,)
    lib.ggml_quantize_init(int(ggml_type))
    n = lib.ggml_quantize_chunk(int(ggml_type), src.ctypes.data, dst.ctypes.data, 0, rows, cols,
                                None if qw is None else qw.ctypes.data)
    assert n == dst.size, (n, dst.size)
    return dst


def assert_same_bytes(codec, w: np.ndarray, imp: np.ndarray | None, what: str) -> np.ndarray:
    """A blockwise codec's bytes of w [rows, cols] (imatrix imp or None) == llama.cpp's, block for block."""
    import torch

    ours = codec.quantize_bytes(torch.from_numpy(w), None if imp is None else torch.from_numpy(imp))
    theirs = quantize(w, codec.ggml_type, imp)
    assert ours.shape == theirs.shape == (w.shape[0], codec.bytes_per_row(w.shape[1]))
    bad = (ours.reshape(w.shape[0], -1, codec.type_size) != theirs.reshape(w.shape[0], -1, codec.type_size)).any(2)
    assert not bad.any(), f"{codec.name} {what}: {bad.sum()} of {bad.size} blocks differ, rows " \
                          f"{np.unique(bad.nonzero()[0])[:10]}"
    return ours


class _TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h); only to_float is called."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def dequantize(data: np.ndarray, ggml_type: int, cols: int) -> np.ndarray:
    """llama.cpp's float32 weights of packed rows data [rows, row_size]: float32 [rows, cols]."""
    lib = _lib()
    get = lib.ggml_get_type_traits
    get.restype, get.argtypes = ctypes.POINTER(_TypeTraits), [ctypes.c_int]
    traits = get(int(ggml_type)).contents
    assert traits.blck_size > 0 and cols % traits.blck_size == 0 and traits.to_float
    to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(traits.to_float)
    src = np.ascontiguousarray(data, dtype=np.uint8)
    out = np.empty((src.shape[0], cols), dtype=np.float32)
    assert src.shape[1] == cols // traits.blck_size * traits.type_size
    to_float(src.ctypes.data, out.ctypes.data, out.size)
    return out
