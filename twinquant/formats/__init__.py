"""Storage formats: the codec protocol (`codec`), llama.cpp's block formats (`ggml/`), integer grids (`intgrid`).

Nothing here knows about models: a codec turns a [rows, cols] matrix into codes + block parameters and bytes.
"""

from __future__ import annotations

import math


def codec_for(type_name: str, cols: int):
    """The codec of a type name (GGML types like Q4_K; integer grids like int4_g128_asym) for rows of `cols`."""
    if type_name.lower().startswith("int"):
        from twinquant.formats.intgrid import IntGrid

        return IntGrid.from_name(type_name).for_cols(cols)
    from twinquant.formats.ggml import get_codec

    codec = get_codec(type_name)
    codec.check_cols(cols)
    return codec


def tensor_bytes(type_name: str, shape) -> int:
    """Bytes of a tensor of `shape` stored as GGML type `type_name` in a GGUF (scales included)."""
    import gguf

    from twinquant.errors import TwinquantError

    t = gguf.GGMLQuantizationType[type_name.upper()]
    block, size = gguf.GGML_QUANT_SIZES[t]
    if shape[-1] % block:
        raise TwinquantError(f"{type_name}: rows of {shape[-1]} are not whole blocks of {block}")
    return math.prod(shape) // block * size
