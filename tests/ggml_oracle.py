"""ctypes binding to llama.cpp's own quantizer, the oracle for `twinquant.formats.ggml`.

llama-cpp-python ships libggml-base (ggml.c + ggml-quants.c) inside its package (`llama_cpp/lib/`); we call

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);

which is exactly what `llama-quantize` runs per tensor (no imatrix: the `quantize_row_*_ref` path; with one: the
`quantize_row_*_impl` path with `quant_weights`), and `ggml_row_size` for the packed size of a row.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np


@functools.cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base.dylib")) \
        + sorted(libdir.glob("ggml-base.dll"))
    if not candidates:
        raise FileNotFoundError(f"no libggml-base in {libdir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
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
