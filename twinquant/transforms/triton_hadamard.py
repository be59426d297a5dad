"""A fast Hadamard transform in Triton for every width twinquant builds a Hadamard matrix for (n = 2^k · m).

`twinquant.transforms.hadamard` defines H = S_p ⊗ B (S_p Sylvester, B a Paley matrix of order m, or m = 1), so a
row x viewed as X [p, m] maps to S_p · X · B. Each row is done in one pass over memory: it is held as a tile
[A, C, D] with p = A·C·(D if m = 1) (small tiles without S_A take several rows on their first axis), and each axis
gets one small matrix product on the tensor cores —

  last axis:   D = m rounded up to a power of two (≥ 16), times B zero-padded to D×D; or, when m = 1, a Sylvester
               factor S_D,
  middle axis: S_C,
  first axis:  S_A (skipped when A = 1),

with A, C ≤ 128. Random signs (a randomized Hadamard Q = H·diag(s)/√n) multiply the output, or the input for the
transpose; the normalization is folded into the store. Half and bfloat16 rows are multiplied in their own type
with float32 accumulation (each of the three products rounds once); float32 rows use 3-pass TF32 on the GPU
(PREC; the interpreter computes in float32). A program loops over tiles (a grid smaller than the tiles lets
Triton's pipelining load the next tile during the products); `hadamard.kernel_config` picks the launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_FACTOR = 128      # largest S_A / S_C (a 128×128 tile of ±1)
MAX_D = 256           # largest padded Paley order (m ≤ 256: every width up to 65536·m of the usual models)


TILE_BYTES = 64 * 1024      # a row tile above this, or an L above 2x this, runs out of shared memory on an H200
                            # (227 KB: float32 rows of 27648 and L of 256x256 float32 were refused there)


def fits(A: int, C: int, D: int, elem_bytes: int) -> bool:
    """True when the tiles of one row fit the shared memory of the GPUs we measured (H200)."""
    return A * C * D * elem_bytes <= TILE_BYTES and D * D * elem_bytes <= 2 * TILE_BYTES


def layout(p: int, m: int) -> tuple[int, int, int] | None:
    """(A, C, D) for n = p·m, or None where the kernel has no tiling (tiny or unusual widths)."""
    if m > 1:
        D = max(16, 1 << (m - 1).bit_length())
        q = p
    else:
        if p < 256:
            return None
        D = 64 if p >= 1 << 12 else 16
        q = p // D
    if D > MAX_D or q < 16 or q > MAX_FACTOR * MAX_FACTOR:
        return None
    if q <= MAX_FACTOR:
        return 1, q, D
    A = 1 << ((q.bit_length() - 1) // 2)
    return A, q // A, D


@triton.jit
def fwht_kernel(x_ptr, y_ptr, l_ptr, sa_ptr, sc_ptr, sign_ptr, n_rows, stride_x, stride_y, scale,
                M: tl.constexpr, A: tl.constexpr, C: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
                SIGN_IN: tl.constexpr, SIGN_OUT: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    """y[r] = (x[r] (·s)) @ (S_{A·C} ⊗ L) (·s) · scale for every row r; L is [D, D] (B padded, or S_D).

    A program takes tiles of ROWS rows (ROWS > 1 only when A = 1: the rows then fill the first axis, which gets no
    product) and loops over tiles program_id, program_id + programs, …: a grid smaller than the tiles keeps each
    program's next load in flight while it computes (STAGES, Triton's software pipelining)."""
    RA: tl.constexpr = A * ROWS                            # the tile's first axis: rows, or S_A's axis
    a = tl.arange(0, RA)[:, None, None]
    c = tl.arange(0, C)[None, :, None]
    j = tl.arange(0, D)[None, None, :]
    if ROWS > 1:
        col = c * M + j                                    # [1, C, D]
    else:
        col = (a * C + c) * M + j                          # [A, C, D]
    dd = tl.arange(0, D)
    L = tl.load(l_ptr + dd[:, None] * D + dd[None, :])
    cc = tl.arange(0, C)
    SC = tl.load(sc_ptr + cc[:, None] * C + cc[None, :])
    if A > 1:
        aa = tl.arange(0, A)
        SA = tl.load(sa_ptr + aa[:, None] * A + aa[None, :])
        oa = tl.arange(0, A)[None, None, :]
        oc = tl.arange(0, C)[None, :, None]
        oj = tl.arange(0, D)[:, None, None]
        ocol = (oa * C + oc) * M + oj                      # [D, C, A]
        orow = tl.zeros((1, 1, 1), dtype=tl.int64)
    else:
        orr = tl.arange(0, ROWS)[:, None, None]
        oc = tl.arange(0, C)[None, None, :]
        oj = tl.arange(0, D)[None, :, None]
        ocol = oc * M + oj                                 # [1, D, C]
        orow = orr.to(tl.int64)                            # [ROWS, 1, 1]
    if SIGN_IN:
        s_in = tl.load(sign_ptr + col, mask=j < M, other=0.0)
    if SIGN_OUT:
        s_out = tl.load(sign_ptr + ocol, mask=oj < M, other=0.0).to(tl.float32)
    n_tiles = tl.cdiv(n_rows, ROWS)
    for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), num_stages=STAGES):
        r0 = (tl.full((), 0, tl.int64) + tile) * ROWS      # 64-bit offsets (tile: a Python int when interpreted)
        if ROWS > 1:
            rr = r0 + a                                    # [ROWS, 1, 1]
            mask = (j < M) & (rr < n_rows)
            x = tl.load(x_ptr + rr * stride_x + col, mask=mask, other=0.0)
        else:
            x = tl.load(x_ptr + r0 * stride_x + col, mask=j < M, other=0.0)
        if SIGN_IN:
            x = x * s_in.to(x.dtype)
        dt = x.dtype
        t = tl.dot(tl.reshape(x, (RA * C, D)), L, input_precision=PREC)            # last axis
        t = tl.permute(tl.reshape(t.to(dt), (RA, C, D)), (0, 2, 1))                # [RA, D, C]
        t = tl.dot(tl.reshape(t, (RA * D, C)), SC, input_precision=PREC)           # middle axis (S symmetric)
        if A > 1:
            t = tl.permute(tl.reshape(t.to(dt), (A, D, C)), (1, 2, 0))             # [D, C, A]
            t = tl.dot(tl.reshape(t, (D * C, A)), SA, input_precision=PREC)        # first axis
            t = tl.reshape(t, (D, C, A))
            omask = oj < M
        else:
            t = tl.reshape(t, (ROWS, D, C))
            omask = (oj < M) & (r0 + orow < n_rows)
        t = t * scale
        if SIGN_OUT:
            t = t * s_out
        tl.store(y_ptr + (r0 + orow) * stride_y + ocol, t.to(y_ptr.dtype.element_ty), mask=omask)
