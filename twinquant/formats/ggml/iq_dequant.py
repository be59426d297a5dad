"""The i-quants' dequantization in torch, on the bytes' device: the same float32 values as gguf-py's numpy
dequantizers (the reference files are read with), the same operations in the same order.

Block LDLQ on a GPU (`twinquant.algorithms.gptq_blocks`) dequantizes every group it has just quantized, 27648
blocks at a time for a 32B model's ffn_gate; on the host in numpy that was about half its time. Here the bytes
go to the device once (66-110 bytes per 256 weights) and the values never leave it.

    dequantize(ggml_type, blocks)   # blocks: uint8 tensor [B, type_size] -> float32 [B, block], same device

Each value is d (fp16, widened) times a sub-block multiplier, times a codebook entry and a sign (or plus a
delta): products of exactly representable factors formed in gguf-py's order, so rounding matches bit for bit.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError

T = gguf.GGMLQuantizationType
_Q = gguf.quants


@functools.lru_cache(maxsize=None)
def _grid(qtype, device) -> torch.Tensor:
    """gguf-py's decoded codebook of the type, float32 [points, width], on `device`."""
    cls = _Q._type_traits[qtype]
    cls.init_grid()
    return torch.from_numpy(np.ascontiguousarray(cls.grid.reshape(cls.grid_shape), np.float32)).to(device)


@functools.lru_cache(maxsize=None)
def _ksign_bits(device) -> torch.Tensor:
    """The 128 even-parity sign patterns of 8 weights (IQ2_XXS.ksigns), as ±1 float32 [128, 8]."""
    k = np.frombuffer(_Q.IQ2_XXS.ksigns, np.uint8)
    bits = (k[:, None] >> np.arange(8, dtype=np.uint8)) & 1
    return torch.from_numpy(np.where(bits == 0, np.float32(1), np.float32(-1))).to(device)


@functools.lru_cache(maxsize=None)
def _kvalues(device) -> torch.Tensor:
    return torch.tensor(_Q.IQ4_NL.kvalues, dtype=torch.float32, device=device)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """fp16 values stored little-endian in b [B, 2k] -> float32 [B, k]."""
    return b.contiguous().view(torch.float16).float()


def _u16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int16).long() & 0xFFFF


def _u32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int32).long() & 0xFFFFFFFF


def _bits(b: torch.Tensor, n: int) -> torch.Tensor:
    """The n low-first bit fields of each byte: b [..., k] -> [..., k, n] (n = 2: nibbles, 8: bits)."""
    width = 8 // n
    shifts = torch.arange(0, 8, width, device=b.device, dtype=torch.long)
    return (b.long()[..., None] >> shifts) & ((1 << width) - 1)


def _signs(b: torch.Tensor) -> torch.Tensor:
    """Sign bytes [B, k] -> ±1 float32 [B, k, 8] (bit j set: weight j negative)."""
    bits = _bits(b, 8)
    return torch.where(bits == 0, 1.0, -1.0).float()


def _iq2_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])                                         # [B, 1]
    q = _u32(b[:, 2:]).reshape(n, -1, 2)                       # [B, 8 sub-blocks, (grid bytes, signs|scale)]
    db = d * (0.5 + (q[..., 1] >> 28).float()) * 0.25
    sign_idx = (q[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    signs = _ksign_bits(b.device)[sign_idx]                    # [B, 8, 4, 8]
    idx = b[:, 2:].reshape(n, -1, 8)[..., :4].long()           # the 4 grid bytes of each sub-block
    grid = _grid(T.IQ2_XXS, b.device)[idx]                     # [B, 8, 4, 8]
    return (db[..., None, None] * grid * signs).reshape(n, -1)


def _iq2_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs = _u16(b[:, 2:66])                                      # [B, 32]: grid index | sign index << 9
    scales = _bits(b[:, 66:74], 2).reshape(n, -1)              # [B, 16]
    db = d * (0.5 + scales.float()) * 0.25
    signs = _ksign_bits(b.device)[qs >> 9].reshape(n, -1, 2, 8)
    grid = _grid(T.IQ2_XS, b.device)[qs & 511].reshape(n, -1, 2, 8)
    return (db[..., None, None] * grid * signs).reshape(n, -1)


def _iq2_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs, sg, qh, sc = b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    db = d * (0.5 + _bits(sc, 2).reshape(n, -1).float()) * 0.25
    signs = _signs(sg).reshape(n, -1, 2, 8)
    idx = qs.long() | (_bits(qh, 4).reshape(n, -1) << 8)
    grid = _grid(T.IQ2_S, b.device)[idx].reshape(n, -1, 2, 8)
    return (db[..., None, None] * grid * signs).reshape(n, -1)


def _iq3_xxs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs, aux = b[:, 2:66].long(), _u32(b[:, 66:98])              # aux [B, 8]: 4 x 7 sign bits | scale << 28
    db = d * (0.5 + (aux >> 28).float()) * 0.5
    sign_idx = (aux[..., None] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    signs = _ksign_bits(b.device)[sign_idx]                    # [B, 8, 4, 8]
    grid = _grid(T.IQ3_XXS, b.device)[qs].reshape(n, -1, 4, 8)
    return (db[..., None, None] * grid * signs).reshape(n, -1)


def _iq3_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs, qh, sg, sc = b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    db = d * (1 + 2 * _bits(sc, 2).reshape(n, -1)).float()
    signs = _signs(sg).reshape(n, -1, 4, 8)
    idx = qs.long() | (_bits(qh, 8).reshape(n, -1) << 8)
    grid = _grid(T.IQ3_S, b.device)[idx].reshape(n, -1, 4, 8)
    return (db[..., None, None] * grid * signs).reshape(n, -1)


_DELTA = float(_Q.IQ1_S.delta)


def _iq1_s(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    qs, qh = b[:, 2:34].long(), _u16(b[:, 34:50])              # qh [B, 8]: 4 x 3 high bits | scale << 12 | sign
    dl = d * (2 * ((qh >> 12) & 7) + 1).float()
    delta = torch.where((qh & 0x8000) == 0, _DELTA, -_DELTA).float()
    high = (qh[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    idx = qs | (high.reshape(n, -1) << 8)
    grid = _grid(T.IQ1_S, b.device)[idx].reshape(n, -1, 4, 8)
    return (dl[..., None, None] * (grid + delta[..., None, None])).reshape(n, -1)


def _iq1_m(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    qs, qh, sc = b[:, :32].long(), b[:, 32:48], _u16(b[:, 48:56])   # sc [B, 4]: 4 x 3-bit scales | d nibble
    dbits = (sc & 0xF000) >> torch.tensor([12, 8, 4, 0], device=b.device)
    d16 = dbits[:, 0] | dbits[:, 1] | dbits[:, 2] | dbits[:, 3]               # the fp16 bits, 0..0xFFFF
    d = (d16 - ((d16 >> 15) << 16)).to(torch.int16).view(torch.float16).float()  # as int16 without overflow
    scales = ((sc[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7).reshape(n, -1)   # [B, 16]
    dl = d[:, None] * (2 * scales + 1).float()
    nib = _bits(qh, 2)                                         # [B, 16, 2]: per 8-weight group 3 high bits | sign
    idx = qs | ((nib & 7).reshape(n, -1) << 8)
    delta = torch.where((nib & 8) == 0, _DELTA, -_DELTA).float().reshape(n, -1, 2, 2, 1)
    grid = _grid(T.IQ1_M, b.device)[idx].reshape(n, -1, 2, 2, 8)
    return (dl.reshape(n, -1, 2, 1, 1) * (grid + delta)).reshape(n, -1)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = _bits(b[:, 2:18], 2).transpose(1, 2).reshape(n, -1)   # low nibbles are weights 0-15, high 16-31
    return d * _kvalues(b.device)[q]


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    sh, sl, qs = _u16(b[:, 2:4]), b[:, 4:8], b[:, 8:136]
    low = _bits(sl, 2).reshape(n, -1)                          # [B, 8]
    high = (sh >> torch.arange(0, 16, 2, device=b.device)) & 3
    dl = d * ((low | (high << 4)) - 32).float()                # [B, 8]
    q = _bits(qs.reshape(n, 8, 16), 2).transpose(2, 3).reshape(n, 8, 32)
    return (dl[..., None] * _kvalues(b.device)[q]).reshape(n, -1)


_DEQUANT = {T.IQ2_XXS: _iq2_xxs, T.IQ2_XS: _iq2_xs, T.IQ2_S: _iq2_s, T.IQ3_XXS: _iq3_xxs, T.IQ3_S: _iq3_s,
            T.IQ1_S: _iq1_s, T.IQ1_M: _iq1_m, T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs}


def supports(qtype) -> bool:
    return qtype in _DEQUANT


def dequantize(qtype, blocks: torch.Tensor) -> torch.Tensor:
    """float32 [B, block] of B blocks' bytes (uint8 tensor [B, type_size]), on the bytes' device."""
    if qtype not in _DEQUANT:
        raise TwinquantError(f"no torch dequantizer for {gguf.GGMLQuantizationType(qtype).name}")
    if blocks.dtype != torch.uint8 or blocks.dim() != 2:
        raise TwinquantError(f"dequantize: uint8 [blocks, type_size] expected, got {blocks.dtype} "
                             f"{tuple(blocks.shape)}")
    if blocks.shape[0] == 0:
        return torch.empty(0, gguf.GGML_QUANT_SIZES[qtype][0], device=blocks.device)
    return _DEQUANT[qtype](blocks)
