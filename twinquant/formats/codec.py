"""The codec interface: one codec per weight format (GGML block types, integer grids).

Codecs are apart from algorithms: RTN and GPTQ decide the integer codes; a codec chooses block parameters, rounds
to given parameters, and packs / unpacks bytes.

Every supported format is an *affine grid per sub-block*: within a row, the columns `[j*sub, (j+1)*sub)` share
one `scale` and one `offset`, and a weight is represented as `scale * q + offset` with an integer code
`q in [0, qmax]` (signed formats shift their codes: Q8_0 has offset = -128*scale, Q6_K offset = -32*scale …).
Parameters are chosen per *block* of `block` columns (256 for K-quants: the super-block whose sub-block scales are
themselves quantized together; 32 for Q8_0/Q4_0; the group size for integer grids), which is the unit GPTQ fits
when it reaches the block's first column.

Shapes: a weight is [rows, cols] in HF orientation (cols = input features, the GGML row length); a block slice is
[rows, block]; `importance` is a per-column weight ([cols] or [block]) like llama.cpp's imatrix, or None.

GGML codecs (twinquant.formats.ggml) reproduce llama.cpp bit for bit: `fit` chooses what llama.cpp would for that block
(its `packed` keeps the stored fields: fp16 d/dmin, scale bytes, the rounding multiplier of Q8_0/Q4_0/Q5_0), `codes`
rounds as llama.cpp does on those parameters and returns torch.uint8, and `dequantize_codes` equals llama.cpp's /
gguf-py's dequantization exactly (fp16 scale x small integers is exact in float32; zeros may differ in sign only).
Q4_0/Q5_0 with an imatrix weight their search by the whole row's mean square: `fit(..., sigma2=codec.row_sigma2(W))`
matches `quantize` exactly, without it the block's own mean square is used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class BlockParams:
    """Parameters of one block of columns for every row, plus what packing needs beyond scale/offset."""

    scale: torch.Tensor          # float32 [rows, block // sub]  (the *effective* scale, after any scale quantization)
    offset: torch.Tensor         # float32 [rows, block // sub]
    packed: object = None        # format-specific parameter codes (e.g. quantized sub-block scales, fp16 d/dmin)

    def fields(self) -> list:
        """scale, offset and each field of `packed` (a dataclass) or `packed` itself, in a fixed order."""
        pk = self.packed
        return [self.scale, self.offset] + ([getattr(pk, f.name) for f in dataclasses.fields(pk)]
                                            if dataclasses.is_dataclass(pk) else [pk])

    def map_tensors(self, fn) -> BlockParams:
        """The same parameters with fn applied to every tensor (scale, offset and the tensors of `packed`)."""
        def f(v):
            return fn(v) if isinstance(v, torch.Tensor) else v

        pk = self.packed
        if dataclasses.is_dataclass(pk):
            pk = dataclasses.replace(pk, **{k.name: f(getattr(pk, k.name)) for k in dataclasses.fields(pk)})
        return BlockParams(f(self.scale), f(self.offset), pk)


class Codec(Protocol):
    name: str                    # "Q4_K", "Q8_0", "int4_g128_asym" …
    block: int                   # columns whose parameters are chosen together
    sub: int                     # columns sharing one scale / offset (divides `block`)
    qmax: int                    # codes are integers in [0, qmax]
    ggml_type: object | None     # gguf.GGMLQuantizationType for GGML formats, None for integer grids

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> BlockParams:
        """Choose parameters for a block slice w [rows, block] (llama.cpp's algorithm for GGML types)."""

    def codes(self, w: torch.Tensor, p: BlockParams) -> torch.Tensor:
        """Nearest codes of w [rows, block] on the given parameters: integers [rows, block] in [0, qmax]."""

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """RTN of a whole matrix [rows, cols]: (codes, per-block params); bit-exact with llama.cpp where defined."""

    def pack(self, codes: torch.Tensor, params: list[BlockParams]) -> np.ndarray:
        """GGML bytes (uint8 [rows, bytes_per_row]) of a whole matrix."""

    def unpack(self, data: np.ndarray, cols: int) -> tuple[torch.Tensor, list[BlockParams]]:
        """Inverse of pack."""


def dequantize_codes(codes: torch.Tensor, p: BlockParams, sub: int) -> torch.Tensor:
    """scale * q + offset for a block slice: codes [rows, block] -> float32 [rows, block]."""
    s = p.scale.repeat_interleave(sub, dim=1)
    o = p.offset.repeat_interleave(sub, dim=1)
    return s * codes.float() + o
