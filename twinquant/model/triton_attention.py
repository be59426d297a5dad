"""Attention of one decode token over the KV cache as one Triton kernel (two past CHUNK cached positions): the
query heads of each key/value head together (GQA), keys up to the token's position only, read from the device
(`KVCache.at`: a replayed CUDA-graph step has static shapes, so the torch path scores every cached position and
masks the rest), online softmax in float32. Replaces baddbmm + softmax + bmm (three launches a block) in the
packed runtime's float32 step; `forward._grouped_decode_attention` stays the reference
(tests/test_triton_kernels.py runs both through Triton's interpreter).

Longer caches are cut into CHUNK-position parts, one program each (flash-decoding), whose partial maxima, sums
and outputs a second kernel combines; parts past the position exit at once. `TWINQUANT_ATTN_CHUNK=auto` cuts
shorter parts, so that a 32B model's 8 kv heads are not 8 programs on a GPU of 132 SMs (one such program over 256
cached positions took 46 µs on an H100, `benchmarks/results/q8_handover_s23-h100.md`); not measured yet, so not
the default (`chunk_for`)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from twinquant.errors import TwinquantError
from twinquant.formats.ggml.packed import q8_buffers, with_q8
from twinquant.formats.ggml.triton_kquants import store_q8

CHUNK = 256         # cached positions per program (the most)
BT = 32             # positions per step of a program's loop (the fewest a program takes)
PROGRAMS = 264      # `auto`: programs to aim at (two per SM of an H100)


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, xq_ptr, xd_ptr, xs_ptr, T, scale,
                            G: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr, HDP: tl.constexpr, BT: tl.constexpr,
                            CHUNK: tl.constexpr, SPLIT: tl.constexpr, Q8: tl.constexpr = False):
    """Program (b·Hkv + kv head, part): the G query heads of that kv head over cached positions part·CHUNK ..
    min(part·CHUNK + CHUNK, pos + 1). q [B·H, HD] and the cache [B·Hkv, T, HD] contiguous; SPLIT == 1: o [B·H, HD]
    normalised; else o [B·Hkv, SPLIT, GP, HD] unnormalised with the running max m and sum l [B·Hkv, SPLIT, GP].
    HDP: HD rounded up to a power of two (the tiles' width; the columns past HD are masked). Q8 (HD == HDP, SPLIT
    == 1): o's int8 form too (`store_q8`; the attention output rows [B, H·HD] as one run of blocks of 32)."""
    bh = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, HDP)
    dm = (d < HD)[None, :]
    t = tl.arange(0, BT)
    q = tl.load(q_ptr + (bh * G + g)[:, None] * HD + d[None, :], mask=(g < G)[:, None] & dm, other=0.0)
    q = q.to(tl.float32)
    kv = bh * T * HD
    pos = tl.load(pos_ptr)
    m = tl.full((GP,), float("-inf"), dtype=tl.float32)
    ls = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, HDP), dtype=tl.float32)
    for t0 in range(part * CHUNK, tl.minimum(part * CHUNK + CHUNK, pos + 1), BT):
        at = t0 + t
        ok = at <= pos
        k = tl.load(k_ptr + kv + at[:, None] * HD + d[None, :], mask=ok[:, None] & dm, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale                             # [GP, BT]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + kv + at[:, None] * HD + d[None, :], mask=ok[:, None] & dm, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        ls = ls * alpha + tl.sum(p, axis=1)
        m = m_new
    if SPLIT == 1:
        o = (acc / ls[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + (bh * G + g)[:, None] * HD + d[None, :], o, mask=(g < G)[:, None] & dm)
        if Q8:          # blocks of this program's G heads; those of the padding heads g >= G are not stored
            first = bh * G * (HD // 32)
            store_q8(tl.reshape(o.to(tl.float32), (GP * HD // 32, 2, 16)), first + tl.arange(0, GP * HD // 32),
                     first + G * (HD // 32), xq_ptr, xd_ptr, xs_ptr, True)
    else:
        row = (bh * SPLIT + part) * GP + g
        tl.store(o_ptr + row[:, None] * HDP + d[None, :], acc)
        tl.store(m_ptr + row, m)
        tl.store(l_ptr + row, ls)


@triton.jit
def combine_kernel(o_ptr, m_ptr, l_ptr, out_ptr, xq_ptr, xd_ptr, xs_ptr, n_blocks, G: tl.constexpr, GP: tl.constexpr,
                   HD: tl.constexpr, HDP: tl.constexpr, SPLIT: tl.constexpr, Q8: tl.constexpr = False):
    """Program (b·Hkv + kv head, query head g < G): its SPLIT parts rescaled to their common maximum and summed;
    Q8 (HD == HDP): the head's int8 form too, as `decode_attention_kernel`'s."""
    bh = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.arange(0, SPLIT)
    d = tl.arange(0, HDP)
    row = (bh * SPLIT + s) * GP + g
    m = tl.load(m_ptr + row)
    w = tl.exp(m - tl.max(m, axis=0))                       # parts past the position: m = -inf, weight 0
    total = tl.sum(tl.load(l_ptr + row) * w, axis=0)
    o = tl.sum(tl.load(o_ptr + row[:, None] * HDP + d[None, :]) * w[:, None], axis=0)
    o = (o / total).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (bh * G + g) * HD + d, o, mask=d < HD)
    if Q8:
        store_q8(tl.reshape(o.to(tl.float32), (HD // 32, 2, 16)), (bh * G + g) * (HD // 32) + tl.arange(0, HD // 32),
                 n_blocks, xq_ptr, xd_ptr, xs_ptr, True)


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """One float32 query token [B, H, 1, hd] against contiguous caches [B, Hkv, T, hd] (hd up to 256)."""
    B, H, L, hd = q.shape
    return (L == 1 and q.dtype == k.dtype == v.dtype == torch.float32 and k.is_contiguous() and v.is_contiguous()
            and k.shape == v.shape and k.shape[0] == B and H % k.shape[1] == 0 and k.shape[3] == hd
            and hd <= 256)


def chunk_for(T: int, rows: int, setting: str | int | None = None) -> int:
    """Cached positions per program for a cache of T positions and `rows` (batch × kv heads) programs a part:
    `setting` (default: TWINQUANT_ATTN_CHUNK) a power of two from BT to CHUNK, or `auto`: the fewest positions
    that keep about PROGRAMS programs (a power of two from BT to CHUNK); unset: CHUNK."""
    setting = str((os.environ.get("TWINQUANT_ATTN_CHUNK") if setting is None else setting) or CHUNK)
    if setting.strip().lower() == "auto":
        return min(CHUNK, max(BT, triton.next_power_of_2(triton.cdiv(T * rows, PROGRAMS))))
    c = int(setting) if setting.strip().isdigit() else 0
    if c < BT or c > CHUNK or c & (c - 1):      # (a program's loop steps BT positions: a part holds whole steps)
        raise TwinquantError(f"TWINQUANT_ATTN_CHUNK={setting}: a power of two from {BT} to {CHUNK}, or auto")
    return c


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     q8: bool = False, chunk: int | None = None) -> torch.Tensor:
    """softmax(q·kᵀ/√hd over positions 0..pos)·v: q [B, H, 1, hd], caches [B, Hkv, T, hd], pos a one-element int64
    tensor on the device; [B, H, 1, hd]. Callers check `fits` first. `q8`: the output also carries its int8 form
    as rows [B, H·hd] (`packed.with_q8`), where hd is a power of two from 32 and H·hd whole super-blocks. `chunk`:
    cached positions per program (default `chunk_for`)."""
    B, H, _, hd = q.shape
    hkv, T = k.shape[1], k.shape[2]
    G = H // hkv
    GP = max(16, triton.next_power_of_2(G))                 # tl.dot's least M
    hdp = max(16, triton.next_power_of_2(hd))
    chunk = chunk_for(T, B * hkv, chunk)
    split = triton.cdiv(T, chunk)
    q = q.contiguous()
    out = torch.empty_like(q)
    q8 = q8 and hd == hdp and hd >= 32 and H * hd % 256 == 0
    xq, xd, xs = q8_buffers(B, H * hd, q.device) if q8 else (out, out, out)
    if split == 1:
        decode_attention_kernel[(B * hkv, 1)](q, k, v, pos, out, out, out, xq, xd, xs, T, hd ** -0.5, G=G, GP=GP,
                                              HD=hd, HDP=hdp, BT=BT, CHUNK=chunk, SPLIT=1, Q8=q8, num_warps=4)
    else:
        split = triton.next_power_of_2(split)                    # the combine's arange (extra parts stay empty)
        o = torch.empty(B * hkv, split, GP, hdp, dtype=torch.float32, device=q.device)
        m = torch.empty(B * hkv, split, GP, dtype=torch.float32, device=q.device)
        ls = torch.empty_like(m)
        decode_attention_kernel[(B * hkv, split)](q, k, v, pos, o, m, ls, o, o, o, T, hd ** -0.5, G=G, GP=GP, HD=hd,
                                                  HDP=hdp, BT=BT, CHUNK=chunk, SPLIT=split, num_warps=4)
        combine_kernel[(B * hkv, G)](o, m, ls, out, xq, xd, xs, B * H * hd // 32, G=G, GP=GP, HD=hd, HDP=hdp,
                                     SPLIT=split, Q8=q8, num_warps=4)
    return with_q8(out, (xq.view(torch.int32), xd, xs)) if q8 else out
