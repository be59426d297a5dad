"""Byte-level helpers shared by the Triton kernels that read GGML blocks (`triton_kquants.py`, `triton_iquants.py`):
loads of little-endian fields at byte pointers, and a GEMV's store."""

from __future__ import annotations

import triton
import triton.language as tl

QK_K = tl.constexpr(256)     # weights per super-block; the kernels' type ids and block sizes: packed.KERNEL_TYPES


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """An fp16 stored little-endian at byte pointer p, as float32."""
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u16(p, mask):
    return _u8(p, mask) | (_u8(p + 1, mask) << 8)


@triton.jit
def _u32(p, mask):
    """A little-endian uint32 at byte pointer p, as int64 (its top bit set stays positive)."""
    return (_u16(p, mask).to(tl.int64)) | (_u16(p + 2, mask).to(tl.int64) << 16)


@triton.jit
def _half(bits):
    """fp16 bits (int32, 0..0xFFFF) as float32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _mant(v, BITS: tl.constexpr):
    """1 + v / 2**BITS for an int32 0 <= v < 2**BITS: v in the top mantissa bits of 1.0 (a shift and an or)."""
    return ((v << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _uf(v, BITS: tl.constexpr, OFF: tl.constexpr = 0):
    """float(v) − OFF for an int32 0 <= v < 2**BITS (BITS <= 8), exactly, without an int-to-float conversion: those
    issue at an eighth of the float rate on Hopper (16 a clock per SM), and a dequant-GEMV converts several values
    per weight. v placed in the top mantissa bits of 1.0 reads as 1 + v / 2**BITS; one multiply-add undoes it."""
    return _mant(v, BITS) * (1 << BITS) - ((1 << BITS) + OFF)


@triton.jit
def _gemv_program(R, BR: tl.constexpr, U: tl.constexpr):
    """A GEMV program's place: (activation row m, column part, its BR rows, their mask [BR, 1, 1], the U
    super-block offsets [1, U, 1]) for a grid (row tiles, activation rows, column parts)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    return tl.program_id(1), tl.program_id(2), rows, (rows < R)[:, None, None], tl.arange(0, U)[None, :, None]


@triton.jit
def _store_rows(y_row, rows, y, R, SPLIT: tl.constexpr, b_ptr, part, HAS_BIAS: tl.constexpr):
    """A GEMV's outputs (plus the bias, added once: by the programs of part 0): stored in y's dtype, or (columns
    split across SPLIT programs) added atomically into a zeroed float32 y."""
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=(rows < R) & (part == 0), other=0.0).to(tl.float32)
    if SPLIT == 1:
        tl.store(y_row + rows, y.to(y_row.dtype.element_ty), mask=rows < R)
    else:
        tl.atomic_add(y_row + rows, y, mask=rows < R)
