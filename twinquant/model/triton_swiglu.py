"""SwiGLU's product silu(gate) · up as one Triton kernel: `F.silu(g) * u`'s arithmetic (silu in float32, rounded to
the activations' dtype, then the product rounded) in one launch instead of two. A decode step runs it once a block;
in a replayed CUDA graph each launch costs microseconds whatever its size. gate and up may be the two halves of one
joined GEMV's output (rows strided by both widths). The torch path stays the reference (tests/test_triton_kernels.py
runs both through Triton's interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from twinquant.formats.ggml.packed import q8_buffers, with_q8
from twinquant.formats.ggml.triton_kquants import q8_halves, store_q8

BLOCK = 1024


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, o_ptr, q_ptr, d_ptr, s_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr,
                    Q8: tl.constexpr = False):
    """Row program_id(0), columns program_id(1)·BLOCK ...: o = round(silu(g)) · u; Q8: o's int8 form too
    (`packed.quantize_q8` in the word-lane order, for the GEMV that reads o: `packed.with_q8`). Columns in tiles
    [BLOCK / 32, 2, 16], `store_q8`'s layout."""
    m = tl.program_id(0)
    row = m.to(tl.int64)
    blocks = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
    i = blocks[:, None, None] * 32 + q8_halves()
    ok = i < N
    g = tl.load(g_ptr + row * stride_g + i, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + i, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    o = (s.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + row * N + i, o, mask=ok)
    if Q8:
        store_q8(o.to(tl.float32), blocks, N // 32, q_ptr + row * N, d_ptr + m * (N // 32), s_ptr + m * (N // 16),
                 True)


def row_stride(t: torch.Tensor) -> int | None:
    """The stride between t's rows when its leading dimensions flatten into evenly spaced rows of contiguous
    values (a [B, L, F] view of a wider joined output included), else None."""
    if t.dim() not in (2, 3) or t.stride(-1) != 1:
        return None
    if t.dim() == 3 and t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
        return None
    return t.stride(-2)


def fits(g: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether the kernel takes this product: same shape and float dtype (not float64), rows as `row_stride`."""
    return (g.shape == u.shape and g.dtype == u.dtype != torch.float64 and g.dtype.is_floating_point
            and row_stride(g) is not None and row_stride(u) is not None)


def silu_mul(g: torch.Tensor, u: torch.Tensor, q8: bool = False) -> torch.Tensor:
    """silu(g) · u, contiguous, in g's dtype. Callers check `fits` first. `q8` (a width of whole super-blocks): the
    product also carries its int8 form (`packed.with_q8`), for an int8-x GEMV to read."""
    n = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    rows = g.numel() // n if n else 0
    q, d, s = q8_buffers(rows, n, g.device) if q8 else (out, out, out)
    if rows:
        silu_mul_kernel[(rows, triton.cdiv(n, BLOCK))](g, u, out, q, d, s, n, row_stride(g), row_stride(u),
                                                        BLOCK=BLOCK, Q8=q8, num_warps=4)
    return with_q8(out, (q.view(torch.int32), d, s)) if q8 else out
