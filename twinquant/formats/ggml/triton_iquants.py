"""The weights of GGML i-quant blocks as GGUF stores them, for the dequant-GEMV and dequantize kernels of
`triton_kquants.py` (TYPE ids 10-17: packed.KERNEL_TYPES).

As for the K-quants, each of a super-block's 256 weights is computed in registers from its own bytes, so a decode
step reads 66 bytes per 256 weights for IQ2_XXS. The i-quants add lookups: a codebook entry (gguf-py's decoded grid,
float32 [points, width] in GPU memory: 8-32 KB, served from L1 and L2) and, for the 2- and 3-bit ones, a sign
pattern (IQ2_XXS.ksigns as ±1 float32 [128, 8]). Each weight is formed in the order `iq_dequant.py` uses (d times
the sub-block multiplier, times the grid value, times the sign), so the values equal gguf-py's. `gemv_iq2_kernel`
reads IQ2_XXS / IQ2_XS a group of 8 weights at a time instead (one codebook entry and one sign byte per group;
opt-in until timed on a GPU). Layouts (byte offsets in one super-block; d is fp16 at 0 unless said):

  IQ2_XXS  66 B: 8 × (4 grid bytes, u32: 4 × 7-bit sign index | 4-bit scale << 28) @2
  IQ2_XS   74 B: u16[32] @2 (9-bit grid index | 7-bit sign index << 9), 16 scale nibbles @66
  IQ2_S    82 B: grid bytes[32] @2, sign bytes[32] @34, high bits (2 a group) @66, 16 scale nibbles @74
  IQ3_XXS  98 B: grid bytes[64] @2 (width-4 grid), 8 × u32 (sign indices | scale << 28) @66
  IQ3_S   110 B: grid bytes[64] @2, high bits (1 a group) @66, sign bytes[32] @74, 8 scale nibbles @106
  IQ1_S    50 B: grid bytes[32] @2, 8 × u16 @34 (4 × 3 high bits | 3-bit scale << 12 | delta sign << 15)
  IQ1_M    56 B: grid bytes[32] @0, 16 bytes @32 (a nibble a group: 3 high bits | delta sign), 4 × u16 @48
                 (4 × 3-bit scales; their top nibbles together are d)
  IQ4_XS  136 B: high scale bits u16 @2, low scale nibbles[4] @4, 4-bit codes[128] @8 (kvalues table)
"""

from __future__ import annotations

import triton
import triton.language as tl

from twinquant.formats.ggml.triton_bytes import _f16, _gemv_program, _half, _store_rows, _u8, _u16, _u32


@triton.jit
def _iq_superblock(blk, e, mask, grid_ptr, sign_ptr, TYPE: tl.constexpr):
    """Weights e (int32 [1, 256]) of the i-quant super-blocks at byte pointers blk ([R, 1]) as float32 [R, 256];
    grid_ptr: the type's codebook (float32, row-major), sign_ptr: ksigns as ±1 (or IQ4's kvalues)."""
    if TYPE == 10:      # IQ2_XXS
        ib = e // 32
        aux = _u32(blk + 2 + 8 * ib + 4, mask)
        db = _f16(blk, mask) * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
        idx = _u8(blk + 2 + 8 * ib + (e % 32) // 8, mask)
        sidx = ((aux >> (7 * ((e % 32) // 8))) & 127).to(tl.int32)
        w = db * tl.load(grid_ptr + idx * 8 + e % 8) * tl.load(sign_ptr + sidx * 8 + e % 8)
    elif TYPE == 11:    # IQ2_XS
        q = _u16(blk + 2 + 2 * (e // 8), mask)
        sc = (_u8(blk + 66 + e // 32, mask) >> (4 * ((e // 16) % 2))) & 0xF
        db = _f16(blk, mask) * (0.5 + sc.to(tl.float32)) * 0.25
        w = db * tl.load(grid_ptr + (q & 511) * 8 + e % 8) * tl.load(sign_ptr + (q >> 9) * 8 + e % 8)
    elif TYPE == 12:    # IQ2_S
        g = e // 8
        idx = _u8(blk + 2 + g, mask) | (((_u8(blk + 66 + g // 4, mask) >> (2 * (g % 4))) & 3) << 8)
        sc = (_u8(blk + 74 + e // 32, mask) >> (4 * ((e // 16) % 2))) & 0xF
        db = _f16(blk, mask) * (0.5 + sc.to(tl.float32)) * 0.25
        neg = (_u8(blk + 34 + g, mask) >> (e % 8)) & 1
        w = db * tl.load(grid_ptr + idx * 8 + e % 8) * tl.where(neg == 1, -1.0, 1.0)
    elif TYPE == 13:    # IQ3_XXS
        aux = _u32(blk + 66 + 4 * (e // 32), mask)
        db = _f16(blk, mask) * (0.5 + (aux >> 28).to(tl.float32)) * 0.5
        idx = _u8(blk + 2 + e // 4, mask)
        sidx = ((aux >> (7 * ((e % 32) // 8))) & 127).to(tl.int32)
        w = db * tl.load(grid_ptr + idx * 4 + e % 4) * tl.load(sign_ptr + sidx * 8 + e % 8)
    elif TYPE == 14:    # IQ3_S
        g = e // 4
        idx = _u8(blk + 2 + g, mask) | (((_u8(blk + 66 + g // 8, mask) >> (g % 8)) & 1) << 8)
        sc = (_u8(blk + 106 + e // 64, mask) >> (4 * ((e // 32) % 2))) & 0xF
        db = _f16(blk, mask) * (1 + 2 * sc).to(tl.float32)
        neg = (_u8(blk + 74 + e // 8, mask) >> (e % 8)) & 1
        w = db * tl.load(grid_ptr + idx * 4 + e % 4) * tl.where(neg == 1, -1.0, 1.0)
    elif TYPE == 15:    # IQ1_S
        qh = _u16(blk + 34 + 2 * (e // 32), mask)
        dl = _f16(blk, mask) * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) == 0, 0.125, -0.125)
        idx = _u8(blk + 2 + e // 8, mask) | (((qh >> (3 * ((e % 32) // 8))) & 7) << 8)
        w = dl * (tl.load(grid_ptr + idx * 8 + e % 8) + delta)
    elif TYPE == 16:    # IQ1_M
        d16 = (((_u16(blk + 48, mask) >> 12) & 0xF) | (((_u16(blk + 50, mask) >> 12) & 0xF) << 4)
               | (((_u16(blk + 52, mask) >> 12) & 0xF) << 8) | (((_u16(blk + 54, mask) >> 12) & 0xF) << 12))
        s = e // 16
        sc = (_u16(blk + 48 + 2 * (s // 4), mask) >> (3 * (s % 4))) & 7
        dl = _half(d16) * (2 * sc + 1).to(tl.float32)
        g = e // 8
        nib = (_u8(blk + 32 + g // 2, mask) >> (4 * (g % 2))) & 0xF
        delta = tl.where((nib & 8) == 0, 0.125, -0.125)
        idx = _u8(blk + g, mask) | ((nib & 7) << 8)
        w = dl * (tl.load(grid_ptr + idx * 8 + e % 8) + delta)
    else:               # IQ4_XS
        ib = e // 32
        low = (_u8(blk + 4 + ib // 2, mask) >> (4 * (ib % 2))) & 0xF
        high = (_u16(blk + 2, mask) >> (2 * ib)) & 3
        dl = _f16(blk, mask) * ((low | (high << 4)) - 32).to(tl.float32)
        q = (_u8(blk + 8 + 16 * ib + e % 16, mask) >> (4 * ((e % 32) // 16))) & 0xF
        w = dl * tl.load(sign_ptr + q)
    return w


@triton.jit
def gemv_iq2_kernel(w_ptr, x_ptr, y_ptr, b_ptr, grid_ptr, sign_ptr, R, NB, row_bytes, stride_xm, stride_ym,
                    TYPE: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """IQ2_XXS / IQ2_XS GEMV by groups of 8 weights, as llama.cpp reads them: per group one codebook row (grid_ptr:
    float32 [entries, 8], the magnitudes) and one sign row (sign_ptr: int32 [128, 8], each weight's float sign bit,
    `packed._group_tables`), each 32 bytes from L1; per weight an xor of the sign into the magnitude and a
    multiply-add, no conversions (the int64 codebook this replaced cost ~16 instructions a weight in 64-bit shifts,
    masks and int64-to-float conversions: `benchmarks/kernel_ptx.py`); d and the group's scale applied per group.
    Tiles [BR, U, 32, 8]; U, SPLIT and the bias as in `triton_kquants.gemv_kernel`."""
    m, part, rows, rmask, u = _gemv_program(R, BR, U)
    g = tl.arange(0, 32)[None, None, :]                                     # group of 8 weights
    k = tl.arange(0, 8)[None, None, None, :]
    row_base = w_ptr + rows.to(tl.int64)[:, None, None] * row_bytes
    acc = tl.zeros((BR, U, 32), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = b0 + u                                                           # [1, U, 1]
        bmask = rmask & (b < NB)
        blk = row_base + b * BS                                              # [BR, U, 1]
        if TYPE == 10:      # IQ2_XXS: 8 chunks of (4 grid bytes, u32 of 4 sign indices | scale << 28)
            aux = _u32(blk + 2 + 8 * (g // 4) + 4, bmask)                    # [BR, U, 32]
            idx = _u8(blk + 2 + 8 * (g // 4) + g % 4, bmask)
            sidx = ((aux >> (7 * (g % 4))) & 127).to(tl.int32)
            db = _f16(blk, bmask) * (0.5 + (aux >> 28).to(tl.float32)) * 0.25
        else:               # IQ2_XS: u16 (9-bit grid index | 7-bit sign index), a scale nibble per 16 weights
            q = _u16(blk + 2 + 2 * g, bmask)
            idx = q & 511
            sidx = q >> 9
            sc = (_u8(blk + 66 + g // 4, bmask) >> (4 * ((g // 2) % 2))) & 0xF
            db = _f16(blk, bmask) * (0.5 + sc.to(tl.float32)) * 0.25
        gmask = bmask[:, :, :, None]
        mag = tl.load(grid_ptr + idx[:, :, :, None] * 8 + k, mask=gmask, other=0.0)          # [BR, U, 32, 8]
        sgn = tl.load(sign_ptr + sidx[:, :, :, None] * 8 + k, mask=gmask, other=0)
        w = (mag.to(tl.int32, bitcast=True) ^ sgn).to(tl.float32, bitcast=True)
        xv = tl.load(x_ptr + m * stride_xm + (b * 256 + g * 8)[:, :, :, None] + k, mask=(b < NB)[:, :, :, None],
                     other=0.0).to(tl.float32)                               # [1, U, 32, 8]
        acc += db * tl.sum(w * xv, axis=3)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)
