"""GGML block-format codecs, bit-exact with llama.cpp's quantizers (ggml_quantize_chunk) and gguf-py's dequantize.

    codec = get_codec("Q4_K")                     # or gguf.GGMLQuantizationType.Q4_K
    codes, params = codec.quantize(w, imatrix)    # RTN exactly as llama.cpp (imatrix: [cols] or None)
    data = codec.pack(codes, params)              # uint8 [rows, codec.bytes_per_row(cols)]
    codes, params = codec.unpack(data, cols)
    w_hat = codec.dequantize(codes, params)       # == gguf.quants.dequantize(data, type)

GPTQ uses codec.block / sub / qmax, fit(w_block, importance) -> BlockParams, codes(w_block, params) and
twinquant.formats.codec.dequantize_codes; see twinquant.formats.codec for the protocol.

llama.cpp's i-quants (IQ1_S … IQ4_XS) are `BlockwiseCodec`s (`codec.blockwise`): no per-weight codes, whole blocks
in and out (`quantize_bytes`, `quantize_blocks`, `dequantize_bytes`), the same bytes as llama.cpp; see _blockwise.py.
"""

from __future__ import annotations

import gguf
import numpy as np

from twinquant.errors import TwinquantError
from twinquant.formats.ggml._base import GGMLCodec, GGMLPacked
from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.ggml.iq1 import IQ1_M, IQ1_S
from twinquant.formats.ggml.iq2 import IQ2_S, IQ2_XS, IQ2_XXS
from twinquant.formats.ggml.iq3 import IQ3_S, IQ3_XXS
from twinquant.formats.ggml.iq4 import IQ4_NL, IQ4_XS
from twinquant.formats.ggml.kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from twinquant.formats.ggml.legacy import Q1_0, Q2_0, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

T = gguf.GGMLQuantizationType

CODECS: dict[gguf.GGMLQuantizationType, GGMLCodec | BlockwiseCodec] = {
    T.Q8_0: Q8_0(),
    T.Q4_0: Q4_0(),
    T.Q5_0: Q5_0(),
    T.Q4_1: Q4_1(),
    T.Q5_1: Q5_1(),
    T.Q1_0: Q1_0(),
    T.Q2_0: Q2_0(),
    T.Q2_K: Q2_K(),
    T.Q3_K: Q3_K(),
    T.Q4_K: Q4_K(),
    T.Q5_K: Q5_K(),
    T.Q6_K: Q6_K(),
    T.IQ1_S: IQ1_S(),
    T.IQ1_M: IQ1_M(),
    T.IQ2_XXS: IQ2_XXS(),
    T.IQ2_XS: IQ2_XS(),
    T.IQ2_S: IQ2_S(),
    T.IQ3_XXS: IQ3_XXS(),
    T.IQ3_S: IQ3_S(),
    T.IQ4_NL: IQ4_NL(),
    T.IQ4_XS: IQ4_XS(),
}


def get_codec(name_or_type) -> GGMLCodec | BlockwiseCodec:
    """The codec of a GGML type, by gguf.GGMLQuantizationType, its int value, or its name ("q4_k", "Q4_K")."""
    key = name_or_type
    try:
        if isinstance(key, str):
            key = T[key.strip().upper()]
        else:
            key = T(key)
    except (KeyError, ValueError):
        key = None
    if key not in CODECS:
        names = ", ".join(t.name for t in CODECS)
        raise TwinquantError(f"unsupported GGML quantization type {name_or_type!r}; supported: {names}")
    return CODECS[key]


def dequantize_bytes(data, ggml_type) -> np.ndarray:
    """float32 weights of packed rows data [rows, row bytes] (or flat) of a GGML type: gguf-py's dequantizer, or
    where gguf-py has none (Q1_0, Q2_0 in gguf 0.19) this package's codec, which is byte-identical to libggml's."""
    try:
        return np.asarray(gguf.quants.dequantize(data, ggml_type), dtype=np.float32)
    except NotImplementedError:
        if ggml_type not in CODECS:
            raise TwinquantError(f"tensor type {T(ggml_type).name} cannot be dequantized") from None
    codec = CODECS[ggml_type]
    rows = np.ascontiguousarray(data, dtype=np.uint8)
    rows = rows.reshape(-1, rows.shape[-1]) if rows.ndim >= 2 else rows.reshape(1, -1)
    cols = rows.shape[1] // codec.type_size * codec.block
    out = codec.dequantize_bytes(rows, cols).numpy()
    return out.reshape(*np.shape(data)[:-1], -1) if np.ndim(data) >= 2 else out.reshape(-1)


__all__ = ["CODECS", "get_codec", "dequantize_bytes", "GGMLCodec", "GGMLPacked", "BlockwiseCodec", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S",
           "IQ3_XXS", "IQ3_S",
           "IQ4_NL", "IQ4_XS", "Q8_0", "Q1_0", "Q2_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K",
           "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
