"""Why the Q2_K batch-1 GEMV is slow: kernel variants timed against the byte-order kernel on one GPU (an experiment
kept for the next attempt; none of these variants is in the package).

    python benchmarks/gemv_q2k_variants.py --set A     # bytes, 1 + c/4 mantissa codes, tensor-core sums (f16, bf16)
    python benchmarks/gemv_q2k_variants.py --set B     # bytes, U super-blocks per iteration, int32 word loads
    python benchmarks/gemv_q2k_variants.py --set C     # int32 word-load ceiling; int8 x with one lane per sub-block
    python benchmarks/gemv_q2k_variants.py --set D     # the same on a repacked layout (codes 16-byte aligned)

Each variant's best rows per program / warps / split on the Qwen2.5-32B shapes, with its error against float64.
What one H100 showed (benchmarks/results/gemv_q2k_variants_s12.md): no variant beats the byte-order kernel by more
than 6%: neither the int->float conversion (mantissa trick), nor the per-sub-block sums (tensor cores), nor memory
latency (unrolling) is its limit; int32 word loads with the bytes split in registers are ~1.6x slower. ncu on
27648x5120: 0.61 instructions issued per scheduler-cycle, 72 registers (0.94 waves), DRAM 23% busy; a kernel that
only loads the blocks byte-wise reads at most ~1.6 TB/s. The int8-activation kernel (`packed.gemv_q8`, dp4a, about
1 instruction per 4 weights) is the way that cut instructions; the rest of the gap is the loads.
Under TRITON_INTERPRET=1 on the CPU it checks each variant's result on one small shape.
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from twinquant.formats.ggml.packed import PackedWeight, dequantize, random_blocks  # noqa: E402
from twinquant.formats.ggml.packed import gemv_q8, quantize_q8  # noqa: E402
from twinquant.formats.ggml.triton_kquants import _dot4, _f16, _u8, _store_rows, gemv_bytes_kernel  # noqa: E402
from twinquant.triton_env import interpreted  # noqa: E402


@triton.jit
def v2_mantissa(w_ptr, x_ptr, y_ptr, R, NB, row_bytes, stride_xm, stride_ym, BR: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    l = tl.arange(0, 64)
    quarter = tl.arange(0, 4)
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BR, 4), dtype=tl.float32)
    for b in range(part, NB, SPLIT):
        blk = row_base + b * 84
        q = tl.load(blk + 16 + l[None, :], mask=rmask, other=0).to(tl.int32)
        d = _f16(blk + 80, rmask)
        dmin = _f16(blk + 82, rmask)
        xb = x_ptr + m * stride_xm + b * 256 + (l // 32) * 128 + l % 32
        for j in tl.static_range(4):
            xj = tl.load(xb + 32 * j).to(tl.float32)
            f = (((q << (21 - 2 * j)) & (3 << 21)) | 0x3F800000).to(tl.float32, bitcast=True)    # 1 + c/4
            xs = tl.sum(tl.reshape(xj, (4, 16)), axis=1)
            fx = tl.sum(tl.reshape(f * xj[None, :], (BR, 4, 16)), axis=2)
            qx = 4.0 * (fx - xs[None, :])
            sc = _u8(blk + (quarter // 2)[None, :] * 8 + 2 * j + (quarter % 2)[None, :], rmask)
            acc += d * (sc & 0xF).to(tl.float32) * qx - dmin * (sc >> 4).to(tl.float32) * xs[None, :]
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(acc, axis=1), R, SPLIT, y_ptr, 0, False)


@triton.jit
def v3_dot(w_ptr, x_ptr, y_ptr, R, NB, row_bytes, stride_xm, stride_ym, BR: tl.constexpr, SPLIT: tl.constexpr,
           BF16: tl.constexpr):
    """Per-sub-block sums on tensor cores: codes (1024 + c as fp16 bits, or 128 + c as bf16) times a block-diagonal
    x [64, 16] per shift j; the bias removed with the sums of the same rounded x."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    l = tl.arange(0, 64)
    n16 = tl.arange(0, 16)
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BR,), dtype=tl.float32)
    for b in range(part, NB, SPLIT):
        blk = row_base + b * 84
        q = tl.load(blk + 16 + l[None, :], mask=rmask, other=0).to(tl.int32)
        s_acc = tl.zeros((BR, 16), dtype=tl.float32)
        xs = tl.zeros((16,), dtype=tl.float32)
        xb = x_ptr + m * stride_xm + b * 256 + (l // 32) * 128 + l % 32
        for j in tl.static_range(4):
            xj = tl.load(xb + 32 * j)
            sidx = 8 * (l // 32) + 2 * j + (l % 32) // 16
            if BF16:
                a = (((q >> (2 * j)) & 3) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
                bj = tl.where(sidx[:, None] == n16[None, :], xj[:, None], 0.0).to(tl.bfloat16)
            else:
                a = (((q >> (2 * j)) & 3) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
                bj = tl.where(sidx[:, None] == n16[None, :], xj[:, None], 0.0).to(tl.float16)
            s_acc = tl.dot(a, bj, s_acc)
            xs += tl.sum(bj.to(tl.float32), axis=0)
        bias = 128.0 if BF16 else 1024.0
        qx = s_acc - bias * xs[None, :]
        sc = _u8(blk + n16[None, :], rmask)
        d = _f16(blk + 80, rmask)
        dmin = _f16(blk + 82, rmask)
        part_y = d * tl.sum((sc & 0xF).to(tl.float32) * qx, axis=1)[:, None] \
            - dmin * tl.sum((sc >> 4).to(tl.float32) * xs[None, :], axis=1)[:, None]
        acc += tl.sum(part_y, axis=1)
    _store_rows(y_ptr + m * stride_ym, rows, acc, R, SPLIT, y_ptr, 0, False)


@triton.jit
def v4_unrolled(w_ptr, x_ptr, y_ptr, R, NB, row_bytes, stride_xm, stride_ym, BR: tl.constexpr, SPLIT: tl.constexpr,
                U: tl.constexpr):
    """The byte-order kernel with U super-blocks per iteration (their loads issued together: more bytes in flight)."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    l = tl.arange(0, 64)
    quarter = tl.arange(0, 4)
    row_base = w_ptr + rows.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BR, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        for u in tl.static_range(U):
            b = b0 + u
            ok = rmask & (b < NB)
            blk = row_base + b * 84
            q = tl.load(blk + 16 + l[None, :], mask=ok, other=0).to(tl.int32)
            d = _f16(blk + 80, ok)
            dmin = _f16(blk + 82, ok)
            xb = x_ptr + m * stride_xm + b * 256 + (l // 32) * 128 + l % 32
            for j in tl.static_range(4):
                xj = tl.load(xb + 32 * j, mask=b < NB, other=0.0).to(tl.float32)
                c = ((q >> (2 * j)) & 3).to(tl.float32)
                qx = tl.sum(tl.reshape(c * xj[None, :], (BR, 4, 16)), axis=2)
                xs = tl.sum(tl.reshape(xj, (4, 16)), axis=1)
                sc = _u8(blk + (quarter // 2)[None, :] * 8 + 2 * j + (quarter % 2)[None, :], ok)
                acc += d * (sc & 0xF).to(tl.float32) * qx - dmin * (sc >> 4).to(tl.float32) * xs[None, :]
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(acc, axis=1), R, SPLIT, y_ptr, 0, False)


@triton.jit
def v5_words_loads(w_ptr, x_ptr, y_ptr, R, NB, row_bytes, stride_xm, stride_ym, BR: tl.constexpr,
                   SPLIT: tl.constexpr, U: tl.constexpr):
    """v4 with the 64 code bytes loaded as 16 int32 words (w_ptr viewed as int32) and split into bytes in
    registers: a quarter of the load instructions."""
    pid = tl.program_id(0)
    m = tl.program_id(1)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    rmask = (rows < R)[:, None]
    l = tl.arange(0, 64)
    quarter = tl.arange(0, 4)
    row_words = row_bytes // 4
    wrow = w_ptr.to(tl.pointer_type(tl.int32)) + rows.to(tl.int64)[:, None] * row_words
    brow = w_ptr + rows.to(tl.int64)[:, None] * row_bytes
    acc = tl.zeros((BR, 4), dtype=tl.float32)
    for b0 in range(part * U, NB, SPLIT * U):
        for u in tl.static_range(U):
            b = b0 + u
            ok = rmask & (b < NB)
            wq = tl.load(wrow + b * 21 + 4 + l[None, :] // 4, mask=ok, other=0)       # each word read by 4 lanes
            q = (wq >> (8 * (l[None, :] % 4))) & 0xFF
            blk = brow + b * 84
            d = _f16(blk + 80, ok)
            dmin = _f16(blk + 82, ok)
            xb = x_ptr + m * stride_xm + b * 256 + (l // 32) * 128 + l % 32
            for j in tl.static_range(4):
                xj = tl.load(xb + 32 * j, mask=b < NB, other=0.0).to(tl.float32)
                c = ((q >> (2 * j)) & 3).to(tl.float32)
                qx = tl.sum(tl.reshape(c * xj[None, :], (BR, 4, 16)), axis=2)
                xs = tl.sum(tl.reshape(xj, (4, 16)), axis=1)
                sc = _u8(blk + (quarter // 2)[None, :] * 8 + 2 * j + (quarter % 2)[None, :], ok)
                acc += d * (sc & 0xF).to(tl.float32) * qx - dmin * (sc >> 4).to(tl.float32) * xs[None, :]
    _store_rows(y_ptr + m * stride_ym, rows, tl.sum(acc, axis=1), R, SPLIT, y_ptr, 0, False)


@triton.jit
def c0_load_words(w_ptr, y_ptr, R, NB, row_words, BR: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr):
    """The ceiling of the layout: every int32 word of BR rows' super-blocks loaded (21 of 32 lanes) and xor-ed."""
    pid = tl.program_id(0)
    part = tl.program_id(2)
    rows = pid * BR + tl.arange(0, BR)
    k = tl.arange(0, 32)[None, :]
    ok = (rows < R)[:, None] & (k < 21)
    base = w_ptr + rows.to(tl.int64)[:, None] * row_words + k
    acc = tl.zeros((BR, 32), dtype=tl.int32)
    for b in tl.range(part, NB, SPLIT, num_stages=STAGES):
        acc ^= tl.load(base + b * 21, mask=ok, other=0)
    tl.atomic_xor(y_ptr + rows, tl.reduce(acc, 1, _xor), mask=rows < R)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def c1_q8_subblocks(w_ptr, wb_ptr, xq_ptr, xd_ptr, xs_ptr, y_ptr, R, NB, row_words, BR: tl.constexpr,
                    SPLIT: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr):
    """Q2_K × int8 x with one lane per sub-block: sub-block s (16 weights) of a super-block is code words
    k = 8·(s // 8) + 4·(s % 2) + r (r = 0..3) shifted by 2·j, j = (s % 8) // 2; its x words 32·(s // 8) + 8·j +
    4·(s % 2) + r, its x scale 4·(s // 8) + j. Four chained dp4a per lane and super-block, the scale and min applied
    per lane in float, one reduction per program at the end."""
    from_pid = tl.program_id(0)
    part = tl.program_id(2)
    rows = from_pid * BR + tl.arange(0, BR)
    ok = (rows < R)[:, None]
    s = tl.arange(0, 16)[None, :]
    j = (s % 8) // 2
    kw = 8 * (s // 8) + 4 * (s % 2)
    xw0 = 32 * (s // 8) + 8 * j + 4 * (s % 2)
    xdi = 4 * (s // 8) + j
    rw = w_ptr + rows.to(tl.int64)[:, None] * row_words
    rb = wb_ptr + rows.to(tl.int64)[:, None] * (row_words * 4)
    acc = tl.zeros((BR, 16), dtype=tl.float32)
    for b in tl.range(part, NB, SPLIT, num_stages=STAGES):
        blk = rw + b * 21
        isum = tl.zeros((BR, 16), dtype=tl.int32)
        for r in tl.static_range(4):
            c = (tl.load(blk + 4 + kw + r, mask=ok, other=0) >> (2 * j)) & 0x03030303
            isum = _dot4(c, tl.load(xq_ptr + b * 64 + xw0 + r), isum, ASM)
        sc = tl.load(rb + b * 84 + s, mask=ok, other=0).to(tl.int32)
        dd = tl.load(blk + 20, mask=ok, other=0)
        d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((dd >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        xd = tl.load(xd_ptr + b * 8 + xdi)
        xs = tl.load(xs_ptr + b * 16 + s)
        acc += d * ((sc & 0xF) * isum).to(tl.float32) * xd - dmin * (sc >> 4).to(tl.float32) * xs
    _store_rows(y_ptr, rows, tl.sum(acc, axis=1), R, SPLIT, y_ptr, 0, False)


def bench(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3


def setup():
    """(device, shapes, copy GB/s): the 32B shapes and a measured copy on CUDA; one small shape on the CPU."""
    if not torch.cuda.is_available():
        return "cpu", [(40, 512)], 1.0
    x0 = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    x1 = torch.empty_like(x0)
    copy = 2 * x0.numel() * 2 / bench(lambda: x1.copy_(x0)) / 1e9
    print(f"copy {copy:.0f} GB/s")
    return "cuda", [(27648, 5120), (5120, 27648), (5120, 5120), (4096, 14336)], copy


class _Shipped:
    """The runtime's byte-order kernel (one super-block a step, no bias) with the variants' launch signature."""

    def __getitem__(self, grid):
        def launch(w, x, y, rows, nb, row_bytes, sx, sy, BR, SPLIT, num_warps):
            gemv_bytes_kernel[grid](w, x, y, y, rows, nb, row_bytes, sx, sy, TYPE=2, BR=BR, U=1, SPLIT=SPLIT,
                                    HAS_BIAS=False, num_warps=num_warps)
        return launch


gemv_q2k_kernel = _Shipped()


def run(kernel, w, x, y, br, warps, split, **kw):
    rows = w.rows
    nb = w.cols // 256
    grid = (triton.cdiv(rows, br), x.shape[0], split)
    if split > 1:
        y.zero_()
    kernel[grid](w.data, x, y, rows, nb, w.data.shape[1], x.stride(0), y.stride(0), BR=br, SPLIT=split,
                 num_warps=warps, **kw)
    return y


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", choices=["A", "B", "C", "D"], default="A")
    which = ap.parse_args().set
    if which in ("C", "D"):
        return sweep_int(which)
    dev, shapes, copy = setup()
    if which == "A":
        variants = [("bytes", gemv_q2k_kernel, {}), ("mantissa", v2_mantissa, {}),
                    ("dot-f16", v3_dot, {"BF16": False}), ("dot-bf16", v3_dot, {"BF16": True})]
    else:
        variants = [("bytes", gemv_q2k_kernel, {})] + [(f"unroll{u}", v4_unrolled, {"U": u}) for u in (2, 4)] \
            + [(f"wordld{u}", v5_words_loads, {"U": u}) for u in (1, 2, 4)]
    for rows, cols in shapes:
        w = PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, cols), cols, dev)
        wd = dequantize(w).double()
        x = torch.randn(1, cols, device=dev)
        want = x.double() @ wd.T
        nbytes = w.data.numel() + cols * 4 + rows * 4
        for name, k, kw in variants:
            best = None
            for br in ((16, 32, 64) if dev == "cuda" else (16,)):
                for warps in ((2, 4, 8) if dev == "cuda" else (4,)):
                    for split in ((1, 2, 4) if dev == "cuda" else (2,)):
                        y = torch.zeros(1, rows, device=dev)
                        try:
                            got = run(k, w, x, y, br, warps, split, **kw).double()
                            err = ((got - want).abs().max() / want.abs().max()).item()
                            t = bench(lambda: run(k, w, x, y, br, warps, split, **kw)) if dev == "cuda" else 0.0
                        except Exception as e:
                            print(f"{name} {rows}x{cols} br{br} w{warps} s{split}: FAILED {str(e).splitlines()[0][:200]}")
                            continue
                        if best is None or t < best[0]:
                            best = (t, br, warps, split, err)
            if best:
                t, br, warps, split, err = best
                pct = 100 * nbytes / t / 1e9 / copy if dev == "cuda" else 0
                print(f"{name:9s} {rows}x{cols}: {t * 1e6:7.1f} us  {pct:5.1f}% of copy  br{br} w{warps} s{split} "
                      f"err {err:.1e}", flush=True)


def planes(data: torch.Tensor, T: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K rows [R, NB·84] repacked (the same bytes, moved) into three flat planes, each tiled by T rows (the T rows'
    entries of one super-block side by side, so a program of T rows reads one contiguous run per super-block):
    codes (16 int32 words a super-block, 16-byte aligned), scale words (4 int32 a super-block: word 2·h + q holds
    the scale bytes 8·h + 2·j + q, j = 0..3, the ones code word k = 8·h + 4·q + (0..3) needs) and d|dmin (1 int32)."""
    R = data.shape[0]
    blocks = data.reshape(R, -1, 84)
    nb = blocks.shape[1]
    g = torch.arange(4)
    order = (8 * (g // 2) + g % 2)[:, None] + 2 * torch.arange(4)[None, :]       # [word g, byte j] -> scale byte

    def tiled(t: torch.Tensor) -> torch.Tensor:                 # [R, NB, W] -> [R / T, NB, T, W], flat
        return t.reshape(R // T, T, nb, -1).transpose(1, 2).contiguous().reshape(-1)

    codes = blocks[:, :, 16:80].contiguous().view(torch.int32)
    scales = blocks[:, :, order.reshape(-1).to(data.device)].contiguous().view(torch.int32)
    dd = blocks[:, :, 80:84].contiguous().view(torch.int32)
    return tiled(codes), tiled(scales), tiled(dd)


@triton.jit
def _plane_setup(R, NB, BR: tl.constexpr, U: tl.constexpr, T: tl.constexpr):
    """This program's rows and mask [BR, 1, 1], the lanes k [1, 1, 16] and super-blocks u [1, U, 1] of an iteration,
    and where its rows start in a plane of W = 1 entry a super-block (times W for wider planes)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r = rows.to(tl.int64)[:, None, None]
    start = (r // T) * NB * T + r % T
    return rows, r < R, tl.arange(0, 16)[None, None, :], tl.arange(0, U)[None, :, None], start


@triton.jit
def d0_load_planes(c_ptr, s_ptr, dd_ptr, y_ptr, R, NB, BR: tl.constexpr, SPLIT: tl.constexpr,
                   STAGES: tl.constexpr, U: tl.constexpr, T: tl.constexpr):
    """The ceiling of the repacked layout: every code word, scale word and d|dmin of BR rows loaded (U super-blocks
    an iteration) and xor-ed."""
    rows, ok, k, u, start = _plane_setup(R, NB, BR, U, T)
    acc = tl.zeros((BR, U, 16), dtype=tl.int32)
    for b0 in tl.range(tl.program_id(2) * U, NB, SPLIT * U, num_stages=STAGES):
        b = b0 + u
        m = ok & (b < NB)
        acc ^= tl.load(c_ptr + (start + b * T) * 16 + k, mask=m, other=0)
        acc ^= tl.load(s_ptr + (start + b * T) * 4 + k // 4, mask=m, other=0)
        acc ^= tl.load(dd_ptr + start + b * T, mask=m, other=0)
    tl.atomic_xor(y_ptr + rows, tl.reduce(tl.reduce(acc, 2, _xor), 1, _xor), mask=rows < R)


@triton.jit
def d1_q8_planes(c_ptr, s_ptr, dd_ptr, xq_ptr, xd_ptr, xs_ptr, y_ptr, R, NB, BR: tl.constexpr,
                 SPLIT: tl.constexpr, STAGES: tl.constexpr, ASM: tl.constexpr, U: tl.constexpr, T: tl.constexpr):
    """Q2_K × int8 x on the repacked layout, U super-blocks an iteration: code word k masked (not shifted) to shift
    2j holds 4^j × the weights 128·h + 32·j + 4·(k % 8) + 0..3 (h = k // 8; x word 32·h + 8·j + k % 8, x scale
    4·h + j, 4^-j folded into it); its 4 scales are byte j of scale word k // 4; lane k also takes the min of
    sub-block 8·h + 2·(k % 4) + (k % 8) // 4 (byte k % 4 of that word, high nibble)."""
    rows, ok, k, u, start = _plane_setup(R, NB, BR, U, T)
    h = k // 8
    acc = tl.zeros((BR, U, 16), dtype=tl.float32)
    for b0 in tl.range(tl.program_id(2) * U, NB, SPLIT * U, num_stages=STAGES):
        b = b0 + u
        m = ok & (b < NB)
        w = tl.load(c_ptr + (start + b * T) * 16 + k, mask=m, other=0)
        sw = tl.load(s_ptr + (start + b * T) * 4 + k // 4, mask=m, other=0)
        dd = tl.load(dd_ptr + start + b * T, mask=m, other=0)
        d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        dmin = ((dd >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        bx = b < NB
        f = tl.zeros((BR, U, 16), dtype=tl.float32)
        for j in tl.static_range(4):
            if j == 3:
                c = w & -0x3F3F3F40                   # 0xC0C0C0C0 as int32
            else:
                c = w & (0x03030303 << (2 * j))
            p = _dot4(c, tl.load(xq_ptr + b * 64 + 32 * h + 8 * j + k % 8, mask=bx,
                                                              other=0), tl.zeros_like(w), ASM)
            xd = tl.load(xd_ptr + b * 8 + 4 * h + j, mask=bx, other=0.0) * (0.25 ** j)
            f += (((sw >> (8 * j)) & 0xF) * p).to(tl.float32) * xd
        mn = ((sw >> (8 * (k % 4) + 4)) & 0xF).to(tl.float32)
        xs = tl.load(xs_ptr + b * 16 + 8 * h + 2 * (k % 4) + (k % 8) // 4, mask=bx, other=0.0)
        acc += d * f - dmin * mn * xs
    _store_rows(y_ptr, rows, tl.sum(tl.sum(acc, axis=2), axis=1), R, SPLIT, y_ptr, 0, False)


def sweep_int(which: str):
    """Sets C and D: load-only ceilings and int8-activation kernels, each at its best rows / warps / split /
    stages, beside the shipped int8 kernel (`packed.gemv_q8`); the int8 kernels' times include quantizing x
    (`quantize_q8`, one launch). C reads the GGUF layout (84-byte blocks, 4-byte aligned); D a repacked one
    (`planes`: the same bytes, codes 16-byte aligned, scales and d|dmin apart)."""
    dev, shapes, copy = setup()
    asm = dev == "cuda" and not interpreted()
    if which == "C":
        grid = [(br, wp, sp, st) for br in (16, 32, 64) for wp in (2, 4) for sp in (1, 2, 4)
                for st in (1, 3)] if dev == "cuda" else [(8, 4, 2, 1)]
    else:           # + super-blocks an iteration U, rows tiled T (1: row-major planes, BR: a program's rows)
        grid = [(br, wp, sp, st, u, t) for br in (16, 32, 64) for wp in (4, 8) for sp in (1, 4) for st in (1, 3)
                for u in (1, 4) for t in (1, br)] if dev == "cuda" else [(8, 4, 2, 1, 4, 8), (8, 2, 1, 1, 1, 1)]
    for rows, cols in shapes:
        w = PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, cols), cols, dev)
        x = torch.randn(1, cols, device=dev)
        ref = x.double() @ dequantize(w).double().T
        nb = cols // 256
        words = w.data.view(torch.int32)
        nbytes = w.data.numel() + cols * 4 + rows * 4
        y = torch.zeros(1, rows, device=dev)
        yi = torch.zeros(rows, dtype=torch.int32, device=dev)
        packs = {}

        def plane_args(cfg):                     # the planes for cfg's row tiling (made once per tiling)
            t = cfg[5]
            if t not in packs:
                packs[t] = planes(w.data, t)
            return packs[t]

        def extra(cfg):
            return {"U": cfg[4], "T": cfg[5]} if len(cfg) > 4 else {}

        def int8(kernel, weights):
            def fn(br, wp, sp, st, *rest):
                xq, xd, xs = quantize_q8(x)
                y.zero_()
                kernel[(triton.cdiv(rows, br), 1, sp)](*weights((br, wp, sp, st, *rest)), xq, xd, xs, y, rows, nb, *(
                    (words.shape[1],) if kernel is c1_q8_subblocks else ()), BR=br, SPLIT=sp, STAGES=st, ASM=asm,
                    num_warps=wp, **extra((br, wp, sp, st, *rest)))
                return y
            return fn

        def loads(kernel, args):
            def fn(br, wp, sp, st, *rest):
                cfg = (br, wp, sp, st, *rest)
                kernel[(triton.cdiv(rows, br), 1, sp)](*args(cfg), BR=br, SPLIT=sp, STAGES=st, num_warps=wp,
                                                       **extra(cfg))
                return None
            return fn

        kernels = ({"load words": loads(c0_load_words, lambda cfg: (words, yi, rows, nb, words.shape[1])),
                    "q8 sub-blocks": int8(c1_q8_subblocks, lambda cfg: (words, w.data))} if which == "C" else
                   {"load planes": loads(d0_load_planes, lambda cfg: (*plane_args(cfg), yi, rows, nb)),
                    "q8 planes": int8(d1_q8_planes, plane_args)})
        res = {"shipped gemv_q8": (bench(lambda: gemv_q8(x, w)) if dev == "cuda" else 0.0, "defaults",
                                   ((gemv_q8(x, w).double() - ref).abs().max() / ref.abs().max()).item())}
        for name, fn in kernels.items():
            best = None
            for cfg in grid:
                try:
                    got = fn(*cfg)
                    err = ((got.double() - ref).abs().max() / ref.abs().max()).item() if got is not None else 0.0
                    t = bench(lambda: fn(*cfg)) if dev == "cuda" else 0.0
                except Exception as e:
                    print(f"{name} {rows}x{cols} {cfg}: FAILED {str(e).splitlines()[0][:200]}")
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg, err)
            if best:
                res[name] = best
        for name, (t, cfg, err) in res.items():
            pct = 100 * nbytes / t / 1e9 / copy if t else 0.0
            print(f"{name:15s} {rows}x{cols}: {t * 1e6:7.1f} us  {pct:5.1f}% of copy  (br, warps, split, stages"
                  f"{', U, T' if isinstance(cfg, tuple) and len(cfg) > 4 else ''}) {cfg}  err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
