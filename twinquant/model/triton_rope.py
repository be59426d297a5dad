"""One Triton kernel for a decode step's RoPE and KV-cache write: q and k rotated (rotate-half layout), k and v
stored at their positions in the cache, q returned. In torch that is ~14 launches a block (two RoPEs of five
kernels, the table rows, two index copies); in a replayed CUDA graph each launch costs microseconds, the work
itself almost nothing. `forward.attention_mix` uses it for device-position steps (`KVCache.at`) where Triton runs;
the torch path stays the reference (tests/test_triton_kernels.py runs both through Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, qo_ptr, kc_ptr, vc_ptr, L, H, HKV,
                      sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sqo_b, sqo_h, sqo_l,
                      skc_b, skc_h, skc_t, svc_b, svc_h, svc_t, s_tab, HD: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b·L + l, head): heads [0, H) are q's, [H, H + HKV) k's, [H + HKV, H + 2·HKV) v's. out[i] =
    x[i]·cos[i] + sign(i)·x[partner(i)]·sin[i] with partner i ± HD/2 (first half: −x[i + HD/2]), in float32,
    rounded once to the output's dtype."""
    bl = tl.program_id(0)
    h = tl.program_id(1)
    b = bl // L
    l = bl % L
    pos = tl.load(pos_ptr + l)
    i = tl.arange(0, BLOCK)
    ok = i < HD
    if h < H + HKV:
        first = i < HD // 2
        partner = tl.where(first, i + HD // 2, i - HD // 2)
        c = tl.load(cos_ptr + pos * s_tab + i, mask=ok, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * s_tab + i, mask=ok, other=0.0).to(tl.float32)
        if h < H:
            src = q_ptr + b * sq_b + h * sq_h + l * sq_l
            dst = qo_ptr + b * sqo_b + h * sqo_h + l * sqo_l
        else:
            src = k_ptr + b * sk_b + (h - H) * sk_h + l * sk_l
            dst = kc_ptr + b * skc_b + (h - H) * skc_h + pos * skc_t
        x = tl.load(src + i, mask=ok, other=0.0).to(tl.float32)
        xp = tl.load(src + partner, mask=ok, other=0.0).to(tl.float32)
        y = x * c + tl.where(first, -xp, xp) * s
        tl.store(dst + i, y.to(dst.dtype.element_ty), mask=ok)
    else:
        hv = h - H - HKV
        x = tl.load(v_ptr + b * sv_b + hv * sv_h + l * sv_l + i, mask=ok, other=0.0)
        tl.store(vc_ptr + b * svc_b + hv * svc_h + pos * svc_t + i, x.to(vc_ptr.dtype.element_ty), mask=ok)


def rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    pos: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """q [B, H, L, hd], k / v [B, Hkv, L, hd] (any strides, the last one 1); cos / sin the whole tables
    [positions, hd]; pos [L] int64 on the device. Writes RoPE(k) and v into cache_k / cache_v [B, Hkv, T, hd] at
    pos; returns RoPE(q) [B, H, L, hd] (contiguous)."""
    B, H, L, hd = q.shape
    hkv = k.shape[1]
    for t in (q, k, v, cos, sin):
        if t.stride(-1) != 1:
            raise ValueError("rope_into_cache: the last axis must be contiguous")
    qo = torch.empty((B, H, L, hd), dtype=q.dtype, device=q.device)
    rope_cache_kernel[(B * L, H + 2 * hkv)](
        q, k, v, cos, sin, pos, qo, cache_k, cache_v, L, H, hkv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *qo.stride()[:3], *cache_k.stride()[:3], *cache_v.stride()[:3], cos.stride(0), HD=hd,
        BLOCK=triton.next_power_of_2(hd), num_warps=1)
    return qo
