"""llama.cpp's own block quantizer (libggml's `ggml_quantize_chunk`) as a fast CPU path for the i-quants.

twinquant's i-quant codecs (`_blockwise.py`, iq1-iq4) are torch code, byte-identical to libggml and fast on a GPU,
but on a CPU their neighbour searches run 5-10x slower than llama.cpp's C (IQ2_XS of a 1536x1536 matrix: 37 s vs
6.8 s on one core). When llama-cpp-python is installed (it ships libggml-base), CPU tensors go through libggml
instead, over the rows in parallel threads (ctypes drops the GIL). Same bytes by construction; the torch codecs
stay the implementation on other devices and the one the codec tests check against libggml.

    TWINQUANT_LIBGGML=0   never use it (the torch codecs everywhere); default: use it when it can be loaded

The library is found through the installed `llama_cpp` package without importing it (that would load llama.cpp's
backends).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

_MIN_ROWS_PER_THREAD = 64
_init_lock = threading.Lock()
_initialised: set[int] = set()


@functools.cache
def _lib() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libdir = Path(spec.origin).parent / "lib"
    found = sorted(libdir.glob("libggml-base.so*")) + sorted(libdir.glob("libggml-base.dylib")) \
        + sorted(libdir.glob("ggml-base.dll"))
    if not found:
        return None
    try:
        lib = ctypes.CDLL(str(found[0]))
    except OSError:
        return None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def enabled() -> bool:
    """Whether CPU tensors go through libggml (it loads, and TWINQUANT_LIBGGML is not 0)."""
    return os.environ.get("TWINQUANT_LIBGGML", "1") != "0" and _lib() is not None


def usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and enabled()


def quantize_rows(ggml_type: int, x: torch.Tensor, imatrix: torch.Tensor | None,
                  threads: int | None = None) -> np.ndarray:
    """libggml's bytes of x [rows, n_per_row] (float32, CPU) with quant_weights imatrix [n_per_row] or None:
    uint8 [rows, row_size], rows split over `threads` (default torch's intra-op threads)."""
    lib = _lib()
    src = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
    rows, n = src.shape
    qw = None if imatrix is None else np.ascontiguousarray(imatrix.detach().to("cpu", torch.float32).numpy())
    if qw is not None and qw.shape != (n,):
        raise ValueError(f"imatrix of shape {qw.shape} for rows of {n}")
    row_size = lib.ggml_row_size(int(ggml_type), n)
    dst = np.empty((rows, row_size), dtype=np.uint8)
    with _init_lock:                         # builds the type's grids once (not thread-safe in libggml)
        if int(ggml_type) not in _initialised:
            lib.ggml_quantize_init(int(ggml_type))
            _initialised.add(int(ggml_type))
    qptr = None if qw is None else qw.ctypes.data

    def part(a: int, b: int) -> None:        # a row range: its own slice of src and dst, nothing shared
        got = lib.ggml_quantize_chunk(int(ggml_type), src[a:b].ctypes.data, dst[a:b].ctypes.data, 0, b - a, n,
                                      qptr)
        if got != (b - a) * row_size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {got} bytes, expected {(b - a) * row_size}")

    k = max(1, min(threads or torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD))
    edges = np.linspace(0, rows, k + 1).astype(int)
    if k == 1:
        part(0, rows)
    else:
        with ThreadPoolExecutor(k) as pool:
            list(pool.map(part, edges[:-1], edges[1:]))
    return dst
