"""GGML formats whose codes are not one affine grid per sub-block: llama.cpp's i-quants (lattice codebooks of
8- or 4-weight vectors with sign bits, non-linear 16-level grids). They are handled a whole GGML block at a time:

    codec = get_codec("IQ2_XS")
    data = codec.quantize_bytes(w, imatrix)        # uint8 [rows, bytes_per_row] == ggml_quantize_chunk
    w_hat = codec.dequantize_bytes(data, cols)      # float32 [rows, cols] == gguf.quants.dequantize

A type implements two hooks on tensors whose leading axis runs over B independent blocks of `self.block` values:
  _quantize_blocks(x float32 [B, block], qw float32 [B, block] | None) -> numpy uint8 [B, type_size]
  _dequantize_blocks(blocks uint8 tensor [B, type_size]) -> float32 [B, block] on the same device (default: iq_dequant)
`_quantize_blocks` reproduces llama.cpp's quantize_row_*_impl for each block (its numerics in torch on x's
device, following the bit-exactness rules of `_num.py`); blocks are independent, so the error-feedback quantizer
(`twinquant.algorithms.gptq_blocks`) can call it on any set of blocks. `qw` is llama.cpp's `quant_weights`
(the imatrix) broadcast to every row; types that llama.cpp quantizes only with an imatrix raise without one.

On a CPU with llama-cpp-python installed, `quantize_bytes` / `quantize_blocks` call libggml itself (`libggml.py`:
the same bytes, 5-10x faster than these hooks there); TWINQUANT_LIBGGML=0 keeps the hooks (the tests do).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.formats.ggml._base import GGMLSizes, _np, _torch, as_f32
from twinquant.formats.ggml import iq_dequant, libggml
from twinquant.formats.ggml._num import F32

_ROWS_PER_CALL = 4096          # blocks per hook call: bounds the search buffers
def _same_rows(qw: torch.Tensor) -> bool:
    """Every block has the same quant_weights (one imatrix slice broadcast, as block LDLQ passes it)."""
    return qw.shape[0] <= 1 or qw.stride(0) == 0 or bool(torch.equal(qw, qw[:1].expand_as(qw)))


class BlockwiseCodec(GGMLSizes):
    """One GGML format quantized a whole block at a time (no per-weight integer codes)."""

    needs_imatrix: bool = False         # llama.cpp refuses to quantize the type without one
    blockwise = True                    # pipeline stages branch on this (affine codecs have codes / params)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} block={self.block} type_size={self.type_size}>"

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def _quantize_blocks(self, x: torch.Tensor, qw: torch.Tensor | None) -> np.ndarray:
        raise NotImplementedError

    def _dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """torch on the bytes' device (`iq_dequant`: gguf-py's values, bit for bit); gguf-py's numpy for a type
        it does not have."""
        if iq_dequant.supports(self.ggml_type):
            return iq_dequant.dequantize(self.ggml_type, blocks)
        out = gguf.quants.dequantize(blocks.cpu().numpy().reshape(-1), self.ggml_type)
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(-1, self.block).to(blocks.device)

    # ---- whole matrices ------------------------------------------------------------------------------------------
    def quantize_blocks(self, x, qw=None) -> np.ndarray:
        """llama.cpp's bytes of B blocks x [B, block] (qw [B, block] or None): uint8 [B, type_size]."""
        x = as_f32(x)
        if x.shape[1] != self.block:
            raise TwinquantError(f"{self.name}: blocks of {self.block} values expected, got {x.shape[1]}")
        if qw is None and self.needs_imatrix:
            raise TwinquantError(f"{self.name} needs an importance matrix (llama.cpp quantizes it only with one)")
        if qw is not None:
            qw = _torch(qw, x.device).to(F32).reshape(x.shape)
        if libggml.usable(x) and (qw is None or _same_rows(qw)):     # llama.cpp's C on a CPU: 5-10x faster
            return libggml.quantize_rows(self.ggml_type, x, None if qw is None else qw[0])
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        for s in range(0, x.shape[0], _ROWS_PER_CALL):
            e = min(s + _ROWS_PER_CALL, x.shape[0])
            out[s:e] = self._quantize_blocks(x[s:e].contiguous(), None if qw is None else qw[s:e].contiguous())
        return out

    def dequantize_blocks(self, blocks) -> torch.Tensor:
        """float32 [B, block] of B blocks' bytes [B, type_size] (uint8 array or tensor), on the bytes' device: block
        LDLQ on a GPU hands its bytes over there and gets the values back without a trip through the host."""
        b = blocks if isinstance(blocks, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(blocks))
        return self._dequantize_blocks(b.reshape(-1, self.type_size))

    def quantize_bytes(self, w, importance=None) -> np.ndarray:
        """RTN of w [rows, cols] exactly as ggml_quantize_chunk (imatrix = importance [cols] or None):
        uint8 [rows, bytes_per_row]."""
        x = as_f32(w)
        R, C = x.shape
        self.check_cols(C)
        nb = C // self.block
        qw = None
        if importance is not None:
            imp = _torch(importance, x.device).to(F32).reshape(-1)
            if imp.numel() != C:
                raise TwinquantError(f"{self.name}: importance has {imp.numel()} values, expected {C} (one per column)")
            if libggml.usable(x):
                return libggml.quantize_rows(self.ggml_type, x, imp)
            qw = imp[None].expand(R, C).reshape(R * nb, self.block)
        elif libggml.usable(x) and not self.needs_imatrix:
            return libggml.quantize_rows(self.ggml_type, x, None)
        return self.quantize_blocks(x.reshape(R * nb, self.block), qw).reshape(R, nb * self.type_size)

    def dequantize_bytes(self, data, cols: int) -> torch.Tensor:
        """float32 [rows, cols] from bytes holding whole rows (what llama.cpp computes from them), on the bytes'
        device when they are a uint8 tensor."""
        bpr = self.bytes_per_row(cols)
        if isinstance(data, torch.Tensor) and data.dtype == torch.uint8:
            b = data.reshape(-1)
        else:
            b = torch.from_numpy(np.ascontiguousarray(_np(data)).view(np.uint8).reshape(-1))
        if b.numel() % bpr:
            raise TwinquantError(f"{self.name}: {b.numel()} bytes do not hold whole rows of {cols} values "
                                 f"({bpr} bytes per row)")
        return self.dequantize_blocks(b).reshape(-1, cols)
