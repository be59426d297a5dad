"""Triton kernels that read GGML K-quant blocks as GGUF stores them: dequant-GEMV (decode) and dequantize (prefill);
the same two kernels take the i-quants (their weights: `triton_iquants.py`).

A K-quant row is a run of super-blocks of 256 weights (llama.cpp's `block_q{2..6}_K`, ggml-common.h). The kernels
take the packed bytes as they are in the file ([rows, bytes per row] uint8, on the GPU) and compute each weight in
registers, so a decode step reads 84 bytes per 256 weights for Q2_K instead of 1 KB of float32. Layouts (byte
offsets inside one super-block; d/dmin are fp16):

  Q2_K  84 B: scales[16] @0 (lo 4 bits scale, hi 4 bits min), qs[64] @16, d @80, dmin @82
  Q3_K 110 B: hmask[32] @0, qs[64] @32, scales[12] @96 (16 six-bit scales, biased by 32), d @108
  Q4_K 144 B: d @0, dmin @2, scales[12] @4 (8 six-bit scales + 8 six-bit mins), qs[128] @16
  Q5_K 176 B: d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48
  Q6_K 210 B: ql[128] @0, qh[64] @128, scales[16] (int8) @192, d @208

Weight e of a super-block (0..255) is computed from its own byte(s): no shuffles, so one code path serves every
type; the same bytes are read by neighbouring lanes from L1, DRAM traffic stays the packed size. Tests run these
kernels on the CPU with Triton's interpreter against the codecs' dequantization; formats/ggml/packed.py calls them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from twinquant.formats.ggml.triton_bytes import (QK_K, _f16, _gemv_program, _half, _mant, _store_rows,  # noqa: F401
                                                _u8, _uf)
from twinquant.formats.ggml.triton_iquants import _iq_superblock


@triton.jit
def _scale_min_k4(sp, s, mask):
    """Q4_K/Q5_K's get_scale_min_k4: 6-bit scale and min of sub-block s (0..7) from the 12 bytes at sp."""
    lo = s < 4
    a = _u8(sp + s, mask)                                  # s < 4: scale;  s >= 4: top 2 bits of the min
    b = _u8(sp + s + 4, mask)                              # s < 4: min;    s >= 4: low nibbles of both
    c = _u8(sp + tl.where(lo, s, s - 4), mask)             # s >= 4: top 2 bits of the scale
    sc = tl.where(lo, a & 63, (b & 0xF) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _superblock(blk, e, mask, TYPE: tl.constexpr):
    """Weights e (int32 [1, 256]) of the super-blocks at byte pointers blk ([R, 1]) as float32 [R, 256]."""
    if TYPE == 2:
        q = _u8(blk + 16 + (e // 128) * 32 + e % 32, mask)
        q = (q >> (2 * ((e % 128) // 32))) & 3
        sc = _u8(blk + e // 16, mask)
        d = _f16(blk + 80, mask)
        dmin = _f16(blk + 82, mask)
        w = d * _uf(sc & 0xF, 4) * _uf(q, 2) - dmin * _uf(sc >> 4, 4)
    elif TYPE == 3:
        j = (e % 128) // 32
        q = (_u8(blk + 32 + (e // 128) * 32 + e % 32, mask) >> (2 * j)) & 3
        hbit = (_u8(blk + e % 32, mask) >> ((e // 128) * 4 + j)) & 1
        s = e // 16
        lo4 = tl.where(s < 8, _u8(blk + 96 + s % 8, mask) & 0xF, _u8(blk + 96 + s % 8, mask) >> 4)
        hi2 = (_u8(blk + 96 + 8 + s % 4, mask) >> (2 * (s // 4))) & 3
        d = _f16(blk + 108, mask)
        w = d * _uf(lo4 | (hi2 << 4), 6, 32) * _uf(q | (hbit << 2), 3, 4)
    elif TYPE == 4 or TYPE == 5:
        c = e // 64
        hi = (e % 64) // 32
        qb = _u8(blk + 16 + 32 * (TYPE - 4) + c * 32 + e % 32, mask)    # qs @16 (Q4_K) / @48 (Q5_K)
        q = tl.where(hi == 1, qb >> 4, qb & 0xF)
        if TYPE == 5:
            q += ((_u8(blk + 16 + e % 32, mask) >> (2 * c + hi)) & 1) * 16
        sc, mn = _scale_min_k4(blk + 4, e // 32, mask)
        d = _f16(blk, mask)
        dmin = _f16(blk + 2, mask)
        w = d * _uf(sc, 6) * _uf(q, 5) - dmin * _uf(mn, 6)
    else:   # Q6_K
        h = e // 128
        k = (e % 128) // 32
        l = e % 32
        qb = _u8(blk + h * 64 + (k % 2) * 32 + l, mask)
        lo = tl.where(k >= 2, qb >> 4, qb & 0xF)
        hb = (_u8(blk + 128 + h * 32 + l, mask) >> (2 * k)) & 3
        sc = _uf(_u8(blk + 192 + e // 16, mask) ^ 0x80, 8, 128)                     # int8: its byte + 128
        d = _f16(blk + 208, mask)
        w = d * sc * _uf(lo | (hb << 4), 6, 32)
    return w


@triton.jit
def gemv_kernel(w_ptr, x_ptr, y_ptr, b_ptr, tab_ptr, sign_ptr, R, NB, row_bytes, stride_xm, stride_ym,
                TYPE: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """y[m, r] (+)= sum_c W[r, c] x[m, c] (+ bias[r]) for BR rows and one activation row m. A program takes U
    super-blocks of its rows at a time (one tile [BR, U, 256], so U loads per row are in flight at once: a decode
    GEMV is bound by memory latency, not by arithmetic) and, with SPLIT > 1, only the runs of U super-blocks
    ≡ part (mod SPLIT), adding its partial sums atomically into a zeroed y (matrices with few rows). TYPE ≥ 10:
    an i-quant, whose codebook and sign tables are tab_ptr / sign_ptr (`triton_iquants.py`; unused for the
    K-quants)."""
    m, part, rows, rmask, u = _gemv_program(R, BR, U)
    e = tl.arange(0, QK_K)[None, None, :]
    row_base = w_ptr + rows.to(tl.int64)[:, None, None] * row_bytes
    acc = tl.zeros((BR, U, QK_K), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = b0 + u                                                                       # [1, U, 1]
        w = _weights(row_base + b * BS, e, rmask & (b < NB), tab_ptr, sign_ptr, TYPE)
        xv = tl.load(x_ptr + m * stride_xm + b * QK_K + e, mask=b < NB, other=0.0).to(tl.float32)
        acc += w * xv
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def _weights(blk, e, mask, tab_ptr, sign_ptr, TYPE: tl.constexpr):
    if TYPE >= 10:
        w = _iq_superblock(blk, e, mask, tab_ptr, sign_ptr, TYPE)
    else:
        w = _superblock(blk, e, mask, TYPE)
    return w


@triton.jit
def dequant_kernel(w_ptr, out_ptr, tab_ptr, sign_ptr, R, row_bytes, cols,
                   TYPE: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr):
    """out[r, b*256:(b+1)*256] = the weights of super-block b of rows r (BR rows per program)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    e = tl.arange(0, QK_K)[None, :]
    w = _weights(w_ptr + rows.to(tl.int64)[:, None] * row_bytes + b * BS, e, rmask, tab_ptr, sign_ptr, TYPE)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * cols + b * QK_K + e, w.to(out_ptr.dtype.element_ty),
             mask=rmask)


@triton.jit
def gemv_bytes_kernel(w_ptr, x_ptr, y_ptr, b_ptr, R, NB, row_bytes, stride_xm, stride_ym, TYPE: tl.constexpr,
                      BR: tl.constexpr, U: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Q2_K's and Q3_K's GEMV in the order their bytes lie, with sums per sub-block: a super-block's 64 code bytes
    are one contiguous load per row; shift j of byte l holds weight 128·(l // 32) + 32·j + l % 32 (Q3_K: its high
    bit is bit 4·(l // 32) + j of hmask byte l % 32), so for each j the 64 codes times x read in that order, summed
    in groups of 16, are the dot products of 4 sub-blocks; their scale (and Q2_K's min) are applied once per
    sub-block (Q2_K: y = Σ_s d·sc_s·Σ q·x − dmin·m_s·Σ x; Q3_K: y = Σ_s d·(sc_s − 32)·Σ (q − 4·!hbit)·x). Per
    weight: a few shifts and masks, a conversion and a multiply-add; x and its sub-block sums are shared by the BR
    rows of a program. U super-blocks of each row at a time, SPLIT and the bias as in `gemv_kernel`."""
    m, part, rows, rmask, u = _gemv_program(R, BR, U)
    l = tl.arange(0, 64)[None, None, :]
    quarter = tl.arange(0, 4)[None, None, :]                # l // 16: (half h, which 16 of its 32 bytes)
    row_base = w_ptr + rows.to(tl.int64)[:, None, None] * row_bytes
    acc = tl.zeros((BR, U, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = b0 + u                                                                       # [1, U, 1]
        bmask = rmask & (b < NB)
        xb = x_ptr + m * stride_xm + b * QK_K + (l // 32) * 128 + l % 32                 # [1, U, 64]
        if TYPE == 2:
            blk = row_base + b * 84                                                      # [BR, U, 1]
            q = tl.load(blk + 16 + l, mask=bmask, other=0).to(tl.int32)                  # [BR, U, 64]
            d = _f16(blk + 80, bmask)
            dmin = _f16(blk + 82, bmask)
        else:
            blk = row_base + b * 110
            q = tl.load(blk + 32 + l, mask=bmask, other=0).to(tl.int32)
            hm = tl.load(blk + l % 32, mask=bmask, other=0).to(tl.int32)
            d = _f16(blk + 108, bmask)
        for j in tl.static_range(4):
            xj = tl.load(xb + 32 * j, mask=b < NB, other=0.0).to(tl.float32)
            s = (quarter // 2) * 8 + 2 * j + (quarter % 2)                              # the sub-blocks [1, 1, 4]
            xs = tl.sum(tl.reshape(xj, (1, U, 4, 16)), axis=3)                           # [1, U, 4]
            # codes as f = 1 + c / 2^bits (`_mant`: no conversion instruction); per sub-block Σ c·x is then
            # 2^bits·(Σ f·x − Σ x) (Q3_K: c − 4 from 3 bits: 8·Σ f·x − 12·Σ x)
            if TYPE == 2:
                fx = tl.sum(tl.reshape(_mant((q >> (2 * j)) & 3, 2) * xj, (BR, U, 4, 16)), axis=3)   # [BR, U, 4]
                sc = _u8(blk + s, bmask)                                                 # [BR, U, 4]
                acc += d * _uf(sc & 0xF, 4) * (4.0 * fx - 4.0 * xs) - dmin * _uf(sc >> 4, 4) * xs
            else:
                c = _mant(((q >> (2 * j)) & 3) | (((hm >> (4 * (l // 32) + j)) & 1) << 2), 3)
                fx = tl.sum(tl.reshape(c * xj, (BR, U, 4, 16)), axis=3)
                lo = _u8(blk + 96 + s % 8, bmask)
                hi2 = (_u8(blk + 104 + s % 4, bmask) >> (2 * (s // 4))) & 3
                acc += d * _uf(tl.where(s < 8, lo & 0xF, lo >> 4) | (hi2 << 4), 6, 32) * (8.0 * fx - 12.0 * xs)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def _quad(t, A: tl.constexpr, B: tl.constexpr, C: tl.constexpr):
    """t[..., 0], .., t[..., 3] of an [A, B, C, 4] tensor (its last dim in one lane's registers: no data moves)."""
    lo, hi = tl.split(tl.reshape(t, (A, B, C, 2, 2)))                                    # t = 0, 2 / 1, 3
    t0, t2 = tl.split(lo)
    t1, t3 = tl.split(hi)
    return t0, t1, t2, t3


@triton.jit
def _code_mant(w, POS: tl.constexpr, BITS: tl.constexpr):
    """1 + c / 2**BITS for the BITS-bit codes c at bit POS of int32 words: the code moved to the top of 1.0's
    mantissa (a shift and an and-or: two instructions where a conversion would issue at an eighth of the rate)."""
    if POS <= 23 - BITS:
        v = w << (23 - BITS - POS)
    else:
        v = w >> (POS - 23 + BITS)
    return ((v & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot(xp, w, fx, sx, XR: tl.constexpr, U: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """(fx + Σ_t f_t·x_t, sx + Σ_t x_t) for the 4 codes of word w (byte t's, at bit SHIFT + 8t; f = `_code_mant`)
    and the 4 consecutive x at xp ([XR, U, 4, 4] pointers: XR 1, or the rows where `_word_lanes` broadcast them):
    one 16-byte load, split into its values in registers."""
    x0, x1, x2, x3 = _quad(tl.load(xp).to(tl.float32), XR, U, 4)
    sx += (x0 + x1) + (x2 + x3)
    fx += _code_mant(w, SHIFT, BITS) * x0
    fx += _code_mant(w, SHIFT + 8, BITS) * x1
    fx += _code_mant(w, SHIFT + 16, BITS) * x2
    fx += _code_mant(w, SHIFT + 24, BITS) * x3
    return fx, sx


@triton.jit
def _word_lanes(w_ptr, x_ptr, stride_xm, R, row_stride, BR: tl.constexpr, U: tl.constexpr,
                XB: tl.constexpr = False):
    """A word-lane GEMV program's place: (activation row m, column part, its BR rows, lane g [1, 1, 4] (g = 2h + q:
    code bytes 16g..16g+15), super-blocks u [1, U, 1], row starts [BR, 1, 1] (rows past R read row R - 1: not
    stored), and x pointers [1, 1, 4, 4] of sub-block position g's first 4 weights, 128h + 16q + t; XB: broadcast
    to [BR, 1, 4, 4], so that x is loaded in the lanes' own layout (`packed._x_broadcast`))."""
    m = tl.program_id(1)
    g = tl.arange(0, 4)[None, None, :]
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_base = w_ptr + tl.minimum(rows, R - 1).to(tl.int64)[:, None, None] * row_stride
    xg = (x_ptr + m * stride_xm + 128 * (g // 2) + 16 * (g % 2))[:, :, :, None] + tl.arange(0, 4)[None, None, None, :]
    if XB:
        xg = xg + tl.zeros((BR, 1, 1, 1), dtype=tl.int32)
    return m, tl.program_id(2), rows, g, tl.arange(0, U)[None, :, None], row_base, xg


@triton.jit
def _q2k_lane_block(row_base, NB, b, g, BR: tl.constexpr, U: tl.constexpr, PLANES: tl.constexpr):
    """Lane g's share of Q2_K super-block b ([1, U, 1]) of the rows at row_base ([BR, 1, 1] int32 pointers): its
    code words 4g..4g+3 (code bytes 16g..16g+15), the scale words 2h, 2h + 1 (scale bytes 8h..8h+7, h = g // 2)
    and the d|dmin word. GGUF's layout (84-byte blocks, 4-byte aligned): seven word loads. PLANES (`packed.planes`,
    the same bytes moved at load): a row's codes, then its scales, then its d|dmin, so one 16-byte, one 8-byte and
    one 4-byte load where the row is 16-byte aligned (the caller's row stride tells Triton)."""
    if PLANES:
        e = tl.arange(0, 4)[None, None, None, :]
        words = _quad(tl.load((row_base + b * 16 + 4 * g)[:, :, :, None] + e), BR, U, 4)
        sc = tl.load((row_base + NB * 16 + b * 4 + 2 * (g // 2))[:, :, :, None] + tl.arange(0, 2)[None, None, None, :])
        scales = tl.split(sc)
        dd = tl.load(row_base + NB * 20 + b + 0 * g)              # [BR, U, 4]: the lanes' layout (no conversion)
    else:
        blk = row_base + b * 21
        words = (tl.load(blk + 4 + 4 * g), tl.load(blk + 5 + 4 * g), tl.load(blk + 6 + 4 * g), tl.load(blk + 7 + 4 * g))
        scales = (tl.load(blk + 2 * (g // 2)), tl.load(blk + 2 * (g // 2) + 1))
        dd = tl.load(blk + 20 + 0 * g)
    return words, scales, dd


@triton.jit
def gemv_q2k_words_kernel(w_ptr, x_ptr, y_ptr, b_ptr, R, NB, row_n, stride_xm, stride_ym, BR: tl.constexpr,
                          U: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PLANES: tl.constexpr = False,
                          ALIGN: tl.constexpr = 1, XB: tl.constexpr = False):
    """Q2_K's GEMV with each lane owning whole sub-blocks: no sums across lanes inside the loop (the byte-order
    kernel's reshaped sums compile to shuffles; `benchmarks/kernel_ptx.py` counts each kernel's instructions per
    weight). Lane (row, super-block, g) loads the 4 code words 4g..4g+3 (bytes 16g..16g+15 of qs, g = 2h + q):
    shifted by 2j their 16 codes are the whole sub-block 8h + 2j + q, weights 128h + 32j + 16q + 4r + t for word r,
    byte t (x: one 16-byte load per word, split into its 4 values in registers). Codes become floats through the
    mantissa (`_word_dot`), so per weight a shift, an and-or and a multiply-add; per sub-block Σx for Q2_K's min
    and the mantissa's offset: y = Σ_s d·sc_s·4·(Σ f·x − Σ x) − dmin·m_s·Σ x. The scale bytes 8h + q + 2j sit in
    scale words 2h (j < 2) and 2h + 1 (`_q2k_lane_block`, either layout). No masked loads: rows past R and
    super-blocks past NB read the last ones again and are dropped (rows not stored, super-blocks weighed 0). U
    super-blocks of each row at a time, SPLIT and the bias as in `gemv_kernel`; a row is row_n·ALIGN int32 words
    (84·NB bytes; ALIGN 4 where that is a multiple of 16 bytes, so Triton may load planes 16 bytes at a time).
    XB: x loaded at the lanes' full shape, as in `gemv_q2k_q8_words_kernel`."""
    m, part, rows, g, u, row_base, xg = _word_lanes(w_ptr, x_ptr, stride_xm, R, row_n * ALIGN, BR, U, XB)
    XR: tl.constexpr = BR if XB else 1                                                  # x's rows
    acc = tl.zeros((BR, U, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = tl.minimum(b0 + u, NB - 1)                                                  # [1, U, 1]
        words, scales, dd = _q2k_lane_block(row_base, NB, b, g, BR, U, PLANES)
        aq = tl.zeros((BR, U, 4), dtype=tl.float32)
        am = tl.zeros((BR, U, 4), dtype=tl.float32)
        for j in tl.static_range(4):
            fx = tl.zeros((BR, U, 4), dtype=tl.float32)
            sx = tl.zeros((XR, U, 4), dtype=tl.float32)
            for r in tl.static_range(4):
                fx, sx = _word_dot(xg + (b * QK_K + 32 * j + 4 * r)[:, :, :, None], words[r], fx, sx, XR, U, 2 * j, 2)
            sb = (scales[j // 2] >> (8 * (g % 2) + 16 * (j % 2))) & 0xFF                  # scale byte 8h + q + 2j
            aq += _uf(sb & 0xF, 4) * (fx - sx)
            am += _uf(sb >> 4, 4) * sx
        sums = 4.0 * _half(dd & 0xFFFF) * aq - _half((dd >> 16) & 0xFFFF) * am
        acc += tl.where(b0 + u < NB, sums, 0.0)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def _pair(p):
    """The int32 word of the two little-endian 16-bit halves at p, p + 1 (int16 pointers)."""
    return (tl.load(p).to(tl.int32) & 0xFFFF) | (tl.load(p + 1).to(tl.int32) << 16)


@triton.jit
def gemv_q3k_words_kernel(w_ptr, x_ptr, y_ptr, b_ptr, R, NB, row_halves, stride_xm, stride_ym, BR: tl.constexpr,
                          U: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Q3_K's GEMV with each lane owning whole sub-blocks, as `gemv_q2k_words_kernel` reads Q2_K. A Q3_K
    super-block is 110 bytes (55 halves: rows and super-blocks are only 2-byte aligned, so words are loaded as two
    16-bit halves, w_ptr an int16 view). Lane (row, super-block, g = 2h + q) takes code bytes 16g..16g+15 (qs @32)
    and hmask bytes 16q..16q+15 (@0, shifted by 4h once): for each j, (qs >> 2j) & 3 | ((hmask >> j) & 1) << 2 is
    the 3-bit code c of sub-block 8h + 2j + q in each byte (4 codes a word, five operations), its weights
    128h + 32j + 16q + 4r + t; per weight a shift, an and-or and a multiply-add (`_word_dot`: f = 1 + c / 8).
    Weight = d·(sc − 32)·(c − 4), so a sub-block adds d·(sc − 32)·(8·Σ f·x − 12·Σ x). Its 6-bit scale: the low 4
    bits are nibble h of scale byte 2j + q, the high 2 bits bits 2·(2h + j // 2) of byte 8 + (2j + q) % 4
    (scales @96); d @108. No masked loads (rows past R and super-blocks past NB as in the Q2_K kernel)."""
    m, part, rows, g, u, row_base, xg = _word_lanes(w_ptr, x_ptr, stride_xm, R, row_halves, BR, U)
    h = g // 2
    q = g % 2
    acc = tl.zeros((BR, U, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = tl.minimum(b0 + u, NB - 1)                                                  # [1, U, 1]
        blk = row_base + b * 55
        qs = (_pair(blk + 16 + 8 * g), _pair(blk + 18 + 8 * g), _pair(blk + 20 + 8 * g), _pair(blk + 22 + 8 * g))
        hm = (_pair(blk + 8 * q) >> (4 * h), _pair(blk + 2 + 8 * q) >> (4 * h), _pair(blk + 4 + 8 * q) >> (4 * h),
              _pair(blk + 6 + 8 * q) >> (4 * h))
        lo = (_pair(blk + 48), _pair(blk + 50))             # scale bytes 0..3, 4..7
        hi = _pair(blk + 52)                                # scale bytes 8..11
        sums = tl.zeros((BR, U, 4), dtype=tl.float32)
        for j in tl.static_range(4):
            fx = tl.zeros((BR, U, 4), dtype=tl.float32)
            sx = tl.zeros((1, U, 4), dtype=tl.float32)
            for r in tl.static_range(4):
                c = ((qs[r] >> (2 * j)) & 0x03030303) | (((hm[r] >> j) & 0x01010101) << 2)
                fx, sx = _word_dot(xg + (b * QK_K + 32 * j + 4 * r)[:, :, :, None], c, fx, sx, 1, U, 0, 3)
            sc = ((lo[j // 2] >> (16 * (j % 2) + 8 * q + 4 * h)) & 0xF) | (((hi >> (8 * ((2 * j + q) % 4)
                                                                                    + 2 * (2 * h + j // 2))) & 3) << 4)
            sums += _uf(sc, 6, 32) * (8.0 * fx - 12.0 * sx)
        d = _half(tl.load(blk + 54).to(tl.int32) & 0xFFFF)
        acc += tl.where(b0 + u < NB, d * sums, 0.0)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def gemv_q6k_words_kernel(w_ptr, x_ptr, y_ptr, b_ptr, R, NB, row_halves, stride_xm, stride_ym, BR: tl.constexpr,
                          U: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Q6_K's GEMV with each lane owning whole sub-blocks, as `gemv_q3k_words_kernel` reads Q3_K (210-byte
    super-blocks, 105 halves: w_ptr an int16 view). Lane (row, super-block, g = 2h + q) takes ql bytes
    64h + 16q + 0..15 and 64h + 32 + 16q + 0..15 (@0) and qh bytes 32h + 16q + 0..15 (@128): for each k,
    (ql[k % 2] >> 4·(k // 2)) & 0xF | ((qh >> 2k) & 3) << 4 is the 6-bit code c of sub-block 8h + 2k + q in each
    byte, its weights 128h + 32k + 16q + 4r + t; per weight a shift, an and-or and a multiply-add (f = 1 + c / 64).
    Weight = d·sc·(c − 32) with sc the sub-block's int8 scale (@192), so a sub-block adds d·sc·(64·Σ f·x − 96·Σ x);
    d @208. No masked loads (rows past R and super-blocks past NB as in the Q2_K kernel)."""
    m, part, rows, g, u, row_base, xg = _word_lanes(w_ptr, x_ptr, stride_xm, R, row_halves, BR, U)
    h = g // 2
    q = g % 2
    acc = tl.zeros((BR, U, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = tl.minimum(b0 + u, NB - 1)                                                  # [1, U, 1]
        blk = row_base + b * 105
        lo0 = blk + 32 * h + 8 * q                          # ql bytes 64h + 16q (k = 0, 2), + 32 (k = 1, 3)
        ql = ((_pair(lo0), _pair(lo0 + 2), _pair(lo0 + 4), _pair(lo0 + 6)),
              (_pair(lo0 + 16), _pair(lo0 + 18), _pair(lo0 + 20), _pair(lo0 + 22)))
        hi0 = blk + 64 + 16 * h + 8 * q
        qh = (_pair(hi0), _pair(hi0 + 2), _pair(hi0 + 4), _pair(hi0 + 6))
        sums = tl.zeros((BR, U, 4), dtype=tl.float32)
        for k in tl.static_range(4):
            fx = tl.zeros((BR, U, 4), dtype=tl.float32)
            sx = tl.zeros((1, U, 4), dtype=tl.float32)
            for r in tl.static_range(4):
                c = ((ql[k % 2][r] >> (4 * (k // 2))) & 0x0F0F0F0F) | (((qh[r] >> (2 * k)) & 0x03030303) << 4)
                fx, sx = _word_dot(xg + (b * QK_K + 32 * k + 4 * r)[:, :, :, None], c, fx, sx, 1, U, 0, 6)
            sc = (tl.load(blk + 96 + 4 * h + k).to(tl.int32) >> (8 * q)) & 0xFF                # int8 scale's byte
            sums += _uf(sc ^ 0x80, 8, 128) * (64.0 * fx - 96.0 * sx)
        d = _half(tl.load(blk + 104).to(tl.int32) & 0xFFFF)
        acc += tl.where(b0 + u < NB, d * sums, 0.0)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def _dot4(a, b, acc, ASM: tl.constexpr):
    """acc + Σ_t byte_t(a) · sbyte_t(b): a's 4 unsigned bytes times b's 4 signed bytes (int32 lanes). On CUDA one
    dp4a instruction; elsewhere (Triton's interpreter) the same integer sum byte by byte."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        for t in tl.static_range(4):
            acc += ((a >> (8 * t)) & 0xFF) * ((b << (24 - 8 * t)) >> 24)
        return acc


@triton.jit
def gemv_q2k_q8_kernel(w_ptr, xq_ptr, xd_ptr, xs_ptr, y_ptr, R, NB, row_words, stride_xq, stride_xd, stride_xs,
                       stride_ym, BR: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr):
    """Q2_K GEMV against int8 activations, as llama.cpp's CUDA kernel computes it: x quantized per 32 values
    (`xq` int8 as int32 words, scales `xd`; `quantize_q8`), four 2-bit codes of a word times four int8 values per
    dp4a. Word k of a super-block's codes shifted by 2j holds, one per byte, the codes of weights
    128·(k // 8) + 32·j + 4·(k % 8) + 0..3: consecutive, so one int32 of xq; words 4g..4g+3 make sub-block
    8·(g // 2) + 2·j + g % 2. The min term uses the float sums of x per sub-block (`xs`), not the int8 ones.
    Rows, loads and integer sums per lane: no reductions across lanes inside the loop."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    g = tl.arange(0, 4)[None, :]                            # [1, 4]: (half h = g // 2, quarter q = g % 2)
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_words
    xq_row = xq_ptr + m * stride_xq
    acc = tl.zeros((BR, 1), dtype=tl.float32)
    for b in range(part, NB, SPLIT):
        blk = row_base + b * 21
        dd = tl.load(blk + 20, mask=rmask, other=0)
        d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((dd >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        sq = tl.zeros((BR, 1), dtype=tl.float32)
        sm = tl.zeros((BR, 1), dtype=tl.float32)
        for j in tl.static_range(4):
            isum = tl.zeros((BR, 4), dtype=tl.int32)
            for r in tl.static_range(4):                    # word k = 4g + r (one [BR, 16] load summed across
                c = (tl.load(blk + 4 + 4 * g + r, mask=rmask, other=0) >> (2 * j)) & 0x03030303    # lanes: slower)
                xw = tl.broadcast_to(tl.load(xq_row + b * 64 + 32 * (g // 2) + 8 * j + 4 * (g % 2) + r), (BR, 4))
                isum = _dot4(c, xw, isum, ASM)
            s = 8 * (g // 2) + 2 * j + g % 2                 # the 4 sub-blocks of this j
            sc = (tl.load(blk + s // 4, mask=rmask, other=0) >> (8 * (s % 4))) & 0xFF
            xd = tl.load(xd_ptr + m * stride_xd + b * 8 + 4 * (g // 2) + j)                    # [1, 4]
            xs = tl.load(xs_ptr + m * stride_xs + b * 16 + s)                                   # [1, 4]
            sq += tl.sum(((sc & 0xF) * isum).to(tl.float32) * xd, axis=1, keep_dims=True)
            sm += tl.sum((sc >> 4).to(tl.float32) * xs, axis=1, keep_dims=True)
        acc += d * sq - dmin * sm
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(acc, axis=1), R, SPLIT, y_ptr, 0, False)


@triton.jit
def gemv_q2k_q8_words_kernel(w_ptr, xq_ptr, xd_ptr, xs_ptr, y_ptr, b_ptr, R, NB, row_n, stride_ym, BR: tl.constexpr,
                             U: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr,
                             PLANES: tl.constexpr = False, ALIGN: tl.constexpr = 1, PREFETCH: tl.constexpr = False,
                             XB: tl.constexpr = True):
    """`gemv_q2k_q8_kernel`'s arithmetic (Q2_K × int8 x per 32, dp4a) with `gemv_q2k_words_kernel`'s lanes: lane
    (row, super-block, g = 2h + q) owns code words 4g..4g+3, so for each j its 4 words masked to shift 2j times the
    4 int8 x words 32h + 8j + 4q + 0..3 (one 16-byte load) are sub-block 8h + 2j + q's integer dot in 4 dp4a; then
    d·sc·xd·Σ − dmin·m·xs per sub-block (xd: x's scale per 32, blocks 4h + 0..3 one 16-byte load; xs: x's float
    sums per 16 in lane order, `quantize_q8(lanes=True)`, 8h + 4q + 0..3 one 16-byte load). x's three arrays are
    contiguous rows of NB·64 words, NB·8 and NB·16 floats. No sums across lanes inside the loop, no masked loads
    (rows and super-blocks past the end as in the word-lane kernel); either layout (`_q2k_lane_block`; the row
    stride row_n·ALIGN words as there). The bias and the output dtype as in `gemv_kernel`. PREFETCH: the next step's
    weight loads are issued before this step's products (twice the bytes in flight per program)."""
    m, part, rows, g, u, row_base, _ = _word_lanes(w_ptr, xq_ptr, 0, R, row_n * ALIGN, BR, U)
    h = g // 2
    q = g % 2
    # XB: x's pointers broadcast over the rows before loading. Where the lanes fill the program's threads, a
    # [1, U, 4, 4] load has fewer values than threads: Triton loaded it a word at a time and moved it through shared
    # memory (barriers in the loop) into the weights' layout. Where they do not, broadcasting is what adds the moves
    # (`packed._x_broadcast` decides; tests/test_kernel_sass.py checks the runtime's launches)
    XR: tl.constexpr = BR if XB else 1                                                  # x's rows
    e = tl.arange(0, 4)[None, None, None, :] + tl.zeros((XR, 1, 1, 1), dtype=tl.int32)
    xw = (xq_ptr + m * (NB * 64) + 32 * h + 4 * q)[:, :, :, None] + e
    xd_row = xd_ptr + m * (NB * 8) + 4 * h
    xs_row = xs_ptr + m * (NB * 16) + 8 * h + 4 * q
    acc = tl.zeros((BR, U, 4), dtype=tl.float32)
    if PREFETCH:
        words, scales, dd = _q2k_lane_block(row_base, NB, tl.minimum(part * U + u, NB - 1), g, BR, U, PLANES)
        w0, w1, w2, w3 = words
        s0, s1 = scales
    for b0 in range(part * U, NB, SPLIT * U):
        b = tl.minimum(b0 + u, NB - 1)                                                  # [1, U, 1]
        if PREFETCH:
            words, scales, dd_now = (w0, w1, w2, w3), (s0, s1), dd
            nw, ns, dd = _q2k_lane_block(row_base, NB, tl.minimum(b0 + SPLIT * U + u, NB - 1), g, BR, U, PLANES)
            w0, w1, w2, w3 = nw
            s0, s1 = ns
        else:
            words, scales, dd_now = _q2k_lane_block(row_base, NB, b, g, BR, U, PLANES)
        xd = _quad(tl.load((xd_row + b * 8)[:, :, :, None] + e), XR, U, 4)
        xs = _quad(tl.load((xs_row + b * 16)[:, :, :, None] + e), XR, U, 4)
        aq = tl.zeros((BR, U, 4), dtype=tl.float32)
        am = tl.zeros((BR, U, 4), dtype=tl.float32)
        for j in tl.static_range(4):
            x0, x1, x2, x3 = _quad(tl.load(xw + (b * 64 + 8 * j)[:, :, :, None]), XR, U, 4)  # int32 words
            isum = tl.zeros((BR, U, 4), dtype=tl.int32)
            isum = _dot4((words[0] >> (2 * j)) & 0x03030303, x0, isum, ASM)
            isum = _dot4((words[1] >> (2 * j)) & 0x03030303, x1, isum, ASM)
            isum = _dot4((words[2] >> (2 * j)) & 0x03030303, x2, isum, ASM)
            isum = _dot4((words[3] >> (2 * j)) & 0x03030303, x3, isum, ASM)
            sb = (scales[j // 2] >> (8 * q + 16 * (j % 2))) & 0xFF                       # scale byte 8h + q + 2j
            aq += _uf(sb & 0xF, 4) * isum.to(tl.float32) * xd[j]
            am += _uf(sb >> 4, 4) * xs[j]
        sums = _half(dd_now & 0xFFFF) * aq - _half((dd_now >> 16) & 0xFFFF) * am
        acc += tl.where(b0 + u < NB, sums, 0.0)
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, b_ptr, part, HAS_BIAS)


@triton.jit
def quantize_q8_kernel(x_ptr, q_ptr, d_ptr, s_ptr, n_blocks, stride_x, stride_q, stride_d, stride_s,
                       BB: tl.constexpr, LANES: tl.constexpr = False):
    """`packed.quantize_q8` for BB blocks of 32 values of one activation row per program (row = program_id(1));
    LANES: the sums per 16 in the word-lane kernels' order (`packed.quantize_q8`)."""
    m = tl.program_id(1)
    blocks = tl.program_id(0) * BB + tl.arange(0, BB)
    x = tl.load(x_ptr + m * stride_x + blocks[:, None, None] * 32 + q8_halves(), mask=(blocks < n_blocks)[:, None, None],
                other=0.0)
    store_q8(x.to(tl.float32), blocks, n_blocks, q_ptr + m * stride_q, d_ptr + m * stride_d, s_ptr + m * stride_s,
             LANES)


@triton.jit
def q8_halves():
    """[1, 2, 16]: the offsets of a block of 32 values as two halves of 16 (`store_q8`'s layout; a kernel that makes
    x in tiles [blocks, 2, 16] hands it to `store_q8` without moving values between threads)."""
    return tl.arange(0, 2)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]


@triton.jit
def store_q8(x, blocks, n_blocks, q_ptr, d_ptr, s_ptr, LANES: tl.constexpr):
    """x [blocks, 2, 16] float32 (blocks `blocks` of one row, each as two halves of 16; those past n_blocks not
    stored) as `packed.quantize_q8` stores it at the row's q / d / sums pointers: the quantize kernel's body, and
    the tail of the kernels that make a GEMV's input (RMSNorm, SwiGLU, the decode attention) and hand it over
    already quantized (`packed.with_q8`)."""
    ok = (blocks < n_blocks)[:, None, None]
    d = tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=2), axis=1), 127.0)    # (Triton's `/` is not correctly rounded)
    d3 = d[:, None, None]
    v = tl.where(d3 > 0, tl.math.div_rn(x, d3), 0.0)
    q = tl.where(v < 0, -tl.floor(-v + 0.5), tl.floor(v + 0.5))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
    tl.store(q_ptr + blocks[:, None, None] * 32 + q8_halves(), q, mask=ok)
    tl.store(d_ptr + blocks, d, mask=blocks < n_blocks)
    halves = tl.sum(x, axis=2)
    q16 = tl.arange(0, 2)[None, :]
    if LANES:           # block 8b + 4h + j, half q -> 16b + 8h + 4q + j
        at = (blocks // 8 * 16 + blocks % 8 // 4 * 8 + blocks % 4)[:, None] + 4 * q16
    else:
        at = blocks[:, None] * 2 + q16
    tl.store(s_ptr + at, halves, mask=(blocks < n_blocks)[:, None])


@triton.jit
def gemm_q2k_i8_kernel(w_ptr, xq_ptr, sx_ptr, y_ptr, M, R, NB, row_bytes, stride_xq, stride_ym,
                       BM: tl.constexpr, BN: tl.constexpr):
    """Q2_K weights times per-token int8 activations on int8 tensor cores (the INT2×INT8 path): y[m, r] =
    sx[m] · Σ_b (d·Σ_k xq·(code·sc) − dmin·Σ_k xq·mn) over super-blocks b. A sub-block's 4-bit scale times its
    2-bit codes (0..45) and its 4-bit min (0..15) are int8, so each super-block is two int8 products [BM, 256] x
    [256, BN] with exact int32 sums; d and dmin (fp16, per row and super-block) weigh them in float32. Weight k
    (0..255) of a super-block is bits 2·((k % 128) // 32) of code byte 32·(k // 128) + k % 32, in sub-block k // 16."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ms = pm * BM + tl.arange(0, BM)
    rows = pn * BN + tl.arange(0, BN)
    mmask = (ms < M)[:, None]
    rmask = (rows < R)[None, :]
    k = tl.arange(0, QK_K)
    byte = (16 + (k // 128) * 32 + k % 32)[:, None]                # [256, 1]
    shift = (2 * ((k % 128) // 32))[:, None]
    row_base = w_ptr + rows.to(tl.int64)[None, :] * row_bytes      # [1, BN]
    x_base = xq_ptr + ms.to(tl.int64)[:, None] * stride_xq + k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for b in range(NB):
        blk = row_base + b * 84
        code = (_u8(blk + byte, rmask) >> shift) & 3                 # [256, BN]
        sc = _u8(blk + (k // 16)[:, None], rmask)
        x = tl.load(x_base + b * QK_K, mask=mmask, other=0)           # [BM, 256] int8
        qs = tl.dot(x, (code * (sc & 0xF)).to(tl.int8), out_dtype=tl.int32)
        mn = tl.dot(x, (sc >> 4).to(tl.int8), out_dtype=tl.int32)
        d = _f16(blk + 80, rmask)                                     # [1, BN]
        dmin = _f16(blk + 82, rmask)
        acc += d * qs.to(tl.float32) - dmin * mn.to(tl.float32)
    sx = tl.load(sx_ptr + ms, mask=ms < M, other=0.0)
    tl.store(y_ptr + ms.to(tl.int64)[:, None] * stride_ym + rows[None, :], acc * sx[:, None], mask=mmask & rmask)
