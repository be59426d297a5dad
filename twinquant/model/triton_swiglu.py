"""SwiGLU's product silu(gate) · up as one Triton kernel: `F.silu(g) * u`'s arithmetic (silu in float32, rounded to
the activations' dtype, then the product rounded) in one launch instead of two. A decode step runs it once a block;
in a replayed CUDA graph each launch costs microseconds whatever its size. gate and up may be the two halves of one
joined GEMV's output (rows strided by both widths). The torch path stays the reference (tests/test_triton_kernels.py
runs both through Triton's interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, BLOCK: tl.constexpr):
    """Row program_id(0), columns program_id(1)·BLOCK ...: o = round(silu(g)) · u."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    g = tl.load(g_ptr + row * stride_g + i, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * stride_u + i, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(o_ptr + row * N + i, (s.to(tl.float32) * u.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=ok)


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


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) · u, contiguous, in g's dtype. Callers check `fits` first."""
    n = g.shape[-1]
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    rows = g.numel() // n if n else 0
    if rows:
        silu_mul_kernel[(rows, triton.cdiv(n, BLOCK))](g, u, out, n, row_stride(g), row_stride(u), BLOCK=BLOCK,
                                                        num_warps=4)
    return out
