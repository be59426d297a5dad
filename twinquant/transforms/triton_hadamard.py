"""A fast Hadamard transform in Triton for every width twinquant builds a Hadamard matrix for (n = 2^k · m).

`twinquant.transforms.hadamard` defines H = S_p ⊗ B (S_p Sylvester, B a Paley matrix of order m, or m = 1), so a
row x viewed as X [p, m] maps to S_p · X · B. One program owns one row and does it in one pass over memory: the
row is held as a tile [A, C, D] with p = A·C·(D if m = 1), and each axis gets one small matrix product on the
tensor cores —

  last axis:   D = m rounded up to a power of two (≥ 16), times B zero-padded to D×D; or, when m = 1, a Sylvester
               factor S_D,
  middle axis: S_C,
  first axis:  S_A (skipped when A = 1),

with A, C ≤ 128. Random signs (a randomized Hadamard Q = H·diag(s)/√n) multiply the output, or the input for the
transpose; the normalization is folded into the store. Half and bfloat16 rows are multiplied in their own type
with float32 accumulation (each of the three products rounds once); float32 rows use 3-pass TF32 on the GPU
(PREC; the interpreter computes in float32).
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
def fwht_kernel(x_ptr, y_ptr, l_ptr, sa_ptr, sc_ptr, sign_ptr, stride_x, stride_y, scale,
                M: tl.constexpr, A: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                SIGN_IN: tl.constexpr, SIGN_OUT: tl.constexpr, PREC: tl.constexpr):
    """y[r] = (x[r] (·s)) @ (S_{A·C} ⊗ L) (·s) · scale for row r = program 0; L is [D, D] (B padded, or S_D)."""
    r = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, A)[:, None, None]
    c = tl.arange(0, C)[None, :, None]
    j = tl.arange(0, D)[None, None, :]
    idx = (a * C + c) * M + j                              # [A, C, D]; columns j >= M are padding
    mask = j < M
    x = tl.load(x_ptr + r * stride_x + idx, mask=mask, other=0.0)
    if SIGN_IN:
        x = x * tl.load(sign_ptr + idx, mask=mask, other=0.0).to(x.dtype)
    dt = x.dtype
    dd = tl.arange(0, D)
    L = tl.load(l_ptr + dd[:, None] * D + dd[None, :])
    t = tl.dot(tl.reshape(x, (A * C, D)), L, input_precision=PREC)              # last axis
    cc = tl.arange(0, C)
    SC = tl.load(sc_ptr + cc[:, None] * C + cc[None, :])
    t = tl.permute(tl.reshape(t.to(dt), (A, C, D)), (0, 2, 1))                  # [A, D, C]
    t = tl.dot(tl.reshape(t, (A * D, C)), SC, input_precision=PREC)             # middle axis (S symmetric)
    if A > 1:
        aa = tl.arange(0, A)
        SA = tl.load(sa_ptr + aa[:, None] * A + aa[None, :])
        t = tl.permute(tl.reshape(t.to(dt), (A, D, C)), (1, 2, 0))              # [D, C, A]
        t = tl.dot(tl.reshape(t, (D * C, A)), SA, input_precision=PREC)         # first axis
        t = tl.reshape(t, (D, C, A))
        oa = tl.arange(0, A)[None, None, :]
        oc = tl.arange(0, C)[None, :, None]
        oj = tl.arange(0, D)[:, None, None]
    else:
        t = tl.reshape(t, (1, D, C))
        oa = tl.arange(0, 1)[:, None, None]
        oc = tl.arange(0, C)[None, None, :]
        oj = tl.arange(0, D)[None, :, None]
    oidx = (oa * C + oc) * M + oj
    omask = oj < M
    t = t * scale
    if SIGN_OUT:
        t = t * tl.load(sign_ptr + oidx, mask=omask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_y + oidx, t.to(y_ptr.dtype.element_ty), mask=omask)
