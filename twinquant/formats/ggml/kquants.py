"""K-quants: super-blocks of 256 weights whose sub-block scales (and mins) are themselves quantized.

  Q2_K  sub 16, codes 0..3,  weight d*sc*q - dmin*m     (sc, m: 4-bit)          84 bytes
  Q3_K  sub 16, codes 0..7,  weight d*(sc-32)*(q-4)     (sc: 6-bit)            110 bytes
  Q4_K  sub 32, codes 0..15, weight d*sc*q - dmin*m     (sc, m: 6-bit)         144 bytes
  Q5_K  sub 32, codes 0..31, weight d*sc*q - dmin*m     (sc, m: 6-bit)         176 bytes
  Q6_K  sub 16, codes 0..63, weight d*sc*(q-32)         (sc: int8)             210 bytes

`_fit` follows quantize_row_<t>_ref (no imatrix) or quantize_row_<t>_impl (imatrix); the final codes are, as in
llama.cpp, the nearest codes on the effective (fp16 d x quantized sc) grid: nearest_int((x - offset)/scale) for the
affine types, nearest_int(x/scale) + zero for the symmetric ones; where that scale is 0 llama.cpp keeps the codes of
its sub-block search (`fallback`), which do not change the dequantized weights.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._base import GGMLCodec
from twinquant.formats.ggml._num import (GROUP_MAX_EPS, div, first_absmax, fp16, make_q3_quants, make_qkx_quants,
                                       make_qp_quants, make_qx_quants, nearest_int, seqsum, sqrt)

QK_K = 256


def _f16_bytes(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float16).reshape(-1, 1).view(np.uint8)


def _d(hdr, key: str = "d") -> torch.Tensor:
    """A stored fp16 field as float32 [B, 1] (exact)."""
    return hdr[key].float().reshape(-1, 1)


def _rowmax0(v):
    """C's `float m = 0; if (v > m) m = v;` over the last axis."""
    m = v.amax(-1)
    return torch.where(m > 0, m, 0.0)


def _pack_lowbits(L, bits: int) -> np.ndarray:
    """Q2_K/Q3_K/Q6_K-style interleave: within each group of 32*(8//bits) codes, byte l holds codes l, l+32, ...
    at bit offsets 0, bits, 2*bits ...  L [B, n] (values < 2**bits) -> [B, n*bits/8]."""
    per = 8 // bits
    B, n = L.shape
    g = L.reshape(B, n // (32 * per), per, 32).astype(np.uint8)
    out = np.zeros((B, n // (32 * per), 32), dtype=np.uint8)
    for k in range(per):
        out |= g[:, :, k, :] << np.uint8(bits * k)
    return out.reshape(B, -1)


def _unpack_lowbits(b, bits: int) -> np.ndarray:
    per = 8 // bits
    B = b.shape[0]
    g = b.reshape(B, -1, 1, 32) >> (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    return (g & np.uint8((1 << bits) - 1)).reshape(B, -1)


# ---- 6-bit scale + min packing of Q4_K / Q5_K (get_scale_min_k4), on the fit's device -------------------------------

def pack_scale_min_k4(ls, lm) -> torch.Tensor:
    """12 bytes from 8 scales and 8 mins (ints as stored in C's uint8: assignments wrap modulo 256)."""
    ls, lm = ls.long() & 0xFF, lm.long() & 0xFF
    s = torch.cat([ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6), lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6),
                   (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)], dim=1)
    return (s & 0xFF).to(torch.uint8)


def get_scale_min_k4(s) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.long()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


# ---- 6-bit signed scale packing of Q3_K ------------------------------------------------------------------------------

def pack_scales_q3(l) -> torch.Tensor:
    """12 bytes from 16 values in [0, 63] (scale + 32)."""
    l = l.long()
    hi = (l >> 4).reshape(-1, 4, 4) << (2 * torch.arange(4, device=l.device)).reshape(1, 4, 1)   # [B, j//4, j%4]
    hb = hi[:, 0] | hi[:, 1] | hi[:, 2] | hi[:, 3]
    s = torch.cat([(l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4), hb], dim=1)
    return (s & 0xFF).to(torch.uint8)


def unpack_scales_q3(s) -> torch.Tensor:
    """-> int64 [B, 16]: the signed sub-block scales (sc - 32)."""
    s = s.long()
    lo = torch.cat([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], dim=1)
    hi = (s[:, None, 8:12] >> (2 * torch.arange(4, device=s.device)).reshape(1, 4, 1)) & 3       # [B, j//4, j%4]
    return (lo | (hi.reshape(-1, 16) << 4)) - 32


class _KQuant(GGMLCodec):
    affine = False          # weight = scale*q - min (Q2_K/Q4_K/Q5_K) rather than scale*(q - zero)

    def _codes(self, x, hdr, scale, offset):
        B = x.shape[0]
        xs = x.reshape(B, self.nsub, self.sub)
        s = scale.reshape(B, self.nsub, 1)
        if self.affine:
            q = nearest_int(div(xs - offset.reshape(B, self.nsub, 1), s)).clamp_(0, self.qmax)
        else:
            z = self.zero_code
            q = nearest_int(div(xs, s)).clamp_(-z, self.qmax - z) + z
        fb = hdr.get("fallback")
        q = torch.where(s != 0, q, 0 if fb is None else fb.reshape(B, self.nsub, self.sub))
        return q.reshape(B, self.block).to(torch.uint8)


class _Q45K(_KQuant):
    sub = 32
    affine = True
    ref_search: tuple                       # (rmin, rdelta, nstep) of make_qkx2_quants
    clamp_impl = False                      # quantize_row_q5_K_impl clamps Ls/Lm to 63, q4_K_impl does not

    def _fit(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B, 8, 32)
        if qw is None:
            sum_x2 = seqsum(xs * xs)
            av_x = sqrt(div(sum_x2, 32.0))
            w = av_x[..., None] + xs.abs()
            rmin, rdelta, nstep = self.ref_search
            scales, mins, L = make_qkx_quants(xs.reshape(-1, 32), w.reshape(-1, 32), self.qmax, rmin, rdelta,
                                              nstep, False)
            scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
            max_scale, max_min = _rowmax0(scales), _rowmax0(mins)
            inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), 0.0)
            inv_min = torch.where(max_min > 0, div(63.0, max_min), 0.0)
            ls = (nearest_int(inv_scale[:, None] * scales) & 0xFF).clamp_(max=63)
            lm = (nearest_int(inv_min[:, None] * mins) & 0xFF).clamp_(max=63)
            d, dmin = fp16(div(max_scale, 63.0)), fp16(div(max_min, 63.0))
        else:
            sum_x2 = seqsum(x * x)
            sigma2 = div(sum_x2 * 2.0, float(QK_K))
            w = qw.reshape(B, 8, 32) * sqrt(sigma2[:, None, None] + xs * xs)
            sw = seqsum(w)
            scales, mins, L = make_qkx_quants(xs.reshape(-1, 32), w.reshape(-1, 32), self.qmax, -0.9, 0.05, 36,
                                              False)
            scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
            d_block, ls = make_qp_quants(scales, 63, sw)
            m_block, lm = make_qp_quants(mins, 63, sw)
            if self.clamp_impl:
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
            d, dmin = fp16(d_block), fp16(m_block)
        return {"d": d, "dmin": dmin, "scales": pack_scale_min_k4(ls, lm), "fallback": L.reshape(B, QK_K)}

    def _effective(self, hdr):
        sc, m = get_scale_min_k4(hdr["scales"])
        return _d(hdr) * sc.float(), -(_d(hdr, "dmin") * m.float())


class Q4_K(_Q45K):
    name, ggml_type, qmax = "Q4_K", gguf.GGMLQuantizationType.Q4_K, 15
    ref_search = (-1.0, 0.1, 20)

    def _pack(self, codes, hdr):
        g = codes.reshape(-1, 4, 2, 32)
        qs = (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(-1, 128)
        return np.concatenate([_f16_bytes(hdr["d"]), _f16_bytes(hdr["dmin"]), hdr["scales"], qs], axis=1)

    def _unpack(self, b):
        qs = b[:, 16:].reshape(-1, 4, 1, 32)
        codes = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, QK_K)
        return codes, {"d": b[:, 0:2].copy().view(np.float16)[:, 0], "dmin": b[:, 2:4].copy().view(np.float16)[:, 0],
                       "scales": b[:, 4:16].copy(), "fallback": None}


class Q5_K(_Q45K):
    name, ggml_type, qmax = "Q5_K", gguf.GGMLQuantizationType.Q5_K, 31
    ref_search = (-0.5, 0.1, 15)
    clamp_impl = True

    def _pack(self, codes, hdr):
        g = codes.reshape(-1, 4, 2, 32)
        qs = ((g[:, :, 0] & 0xF) | ((g[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
        hb = (g >> 4).reshape(-1, 8, 32)                               # bit k of qh[l]: code 32k + l >= 16
        qh = np.zeros((codes.shape[0], 32), dtype=np.uint8)
        for k in range(8):
            qh |= hb[:, k] << np.uint8(k)
        return np.concatenate([_f16_bytes(hdr["d"]), _f16_bytes(hdr["dmin"]), hdr["scales"], qh, qs], axis=1)

    def _unpack(self, b):
        qh, qs = b[:, 16:48], b[:, 48:].reshape(-1, 4, 1, 32)
        lo = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
        hi = (qh[:, None, :] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        codes = (lo | (hi << 4)).reshape(-1, QK_K)
        return codes, {"d": b[:, 0:2].copy().view(np.float16)[:, 0], "dmin": b[:, 2:4].copy().view(np.float16)[:, 0],
                       "scales": b[:, 4:16].copy(), "fallback": None}


class Q2_K(_KQuant):
    name, ggml_type, qmax, sub = "Q2_K", gguf.GGMLQuantizationType.Q2_K, 3, 16
    affine = True

    def _fit(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B, 16, 16)
        if qw is None:
            scales, mins, L = make_qkx_quants(xs.reshape(-1, 16), xs.abs().reshape(-1, 16), 3, -0.5, 0.1, 15,
                                              True)
            scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
            max_scale, max_min = _rowmax0(scales), _rowmax0(mins)
            ls = torch.where(max_scale[:, None] > 0, nearest_int(div(15.0, max_scale)[:, None] * scales) & 0xFF, 0)
            lm = torch.where(max_min[:, None] > 0, nearest_int(div(15.0, max_min)[:, None] * mins), 0)
            d = fp16(torch.where(max_scale > 0, div(max_scale, 15.0), 0.0))
            dmin = fp16(torch.where(max_min > 0, div(max_min, 15.0), 0.0))
        else:
            sumx2 = seqsum(x * x)
            sigma2 = div(sumx2, float(QK_K))
            w = qw.reshape(B, 16, 16) * sqrt(sigma2[:, None, None] + xs * xs)
            sw = seqsum(w)
            scales, mins, L = make_qkx_quants(xs.reshape(-1, 16), w.reshape(-1, 16), 3, -0.9, 0.05, 36, False)
            dm, ls = make_qp_quants(scales.reshape(B, 16), 15, sw)
            mm, lm = make_qp_quants(mins.reshape(B, 16), 15, sw)
            d, dmin = fp16(dm), fp16(mm)
        sb = ((ls | (lm << 4)) & 0xFF).to(torch.uint8)
        return {"d": d, "dmin": dmin, "scales": sb, "fallback": L.reshape(B, QK_K)}

    def _effective(self, hdr):
        s = hdr["scales"]
        return _d(hdr) * (s & 0xF).float(), -(_d(hdr, "dmin") * (s >> 4).float())

    def _pack(self, codes, hdr):
        return np.concatenate([hdr["scales"], _pack_lowbits(codes, 2), _f16_bytes(hdr["d"]),
                               _f16_bytes(hdr["dmin"])], axis=1)

    def _unpack(self, b):
        return _unpack_lowbits(b[:, 16:80], 2), {"d": b[:, 80:82].copy().view(np.float16)[:, 0],
                                                 "dmin": b[:, 82:84].copy().view(np.float16)[:, 0],
                                                 "scales": b[:, 0:16].copy(), "fallback": None}


class Q3_K(_KQuant):
    name, ggml_type, qmax, sub, zero_code = "Q3_K", gguf.GGMLQuantizationType.Q3_K, 7, 16, 4

    def _fit(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B, 16, 16)
        if qw is None:
            scales, L = make_q3_quants(xs.reshape(-1, 16), 4)
            scales = scales.reshape(B, 16)
            _, max_scale = first_absmax(scales)
            iscale = div(-32.0, max_scale)
            l = nearest_int(iscale[:, None] * scales)
            l = ((l + 128) & 0xFF) - 128                                       # int8_t l = nearest_int(...)
            l = l.clamp_(-32, 31) + 32
            nz = max_scale != 0
            l = torch.where(nz[:, None], l, 0)
            d = fp16(torch.where(nz, div(1.0, iscale), 0.0))
        else:
            sumx2 = seqsum(x * x)
            sigma2 = div(sumx2 * 2.0, float(QK_K))
            w = qw.reshape(B, 16, 16) * sqrt(sigma2[:, None, None] + xs * xs)
            sw = seqsum(w)
            scales, L, _ = make_qx_quants(xs.reshape(-1, 16), 4, w.reshape(-1, 16))
            d_block, l, _ = make_qx_quants(scales.reshape(B, 16), 32, sw)
            d = fp16(d_block)
        return {"d": d, "scales": pack_scales_q3(l), "fallback": L.reshape(B, QK_K)}

    def _effective(self, hdr):
        scale = _d(hdr) * unpack_scales_q3(hdr["scales"]).float()
        return scale, scale * -4.0

    def _pack(self, codes, hdr):
        B = codes.shape[0]
        hb = (codes >> 2).reshape(B, 8, 32)                            # element j: hmask[j % 32] bit j // 32
        hmask = np.zeros((B, 32), dtype=np.uint8)
        for k in range(8):
            hmask |= hb[:, k] << np.uint8(k)
        return np.concatenate([hmask, _pack_lowbits(codes & 3, 2), hdr["scales"], _f16_bytes(hdr["d"])], axis=1)

    def _unpack(self, b):
        hi = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        codes = _unpack_lowbits(b[:, 32:96], 2) | (hi.reshape(-1, QK_K) << 2)
        return codes, {"d": b[:, 108:110].copy().view(np.float16)[:, 0], "scales": b[:, 96:108].copy(),
                       "fallback": None}


class Q6_K(_KQuant):
    name, ggml_type, qmax, sub, zero_code = "Q6_K", gguf.GGMLQuantizationType.Q6_K, 63, 16, 32

    def _fit(self, x, qw, sigma2):
        B = x.shape[0]
        xs = x.reshape(B, 16, 16)
        scales, L, _ = make_qx_quants(xs.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
        scales = scales.reshape(B, 16)
        max_abs, max_scale = first_absmax(scales)
        zero = max_abs < GROUP_MAX_EPS
        iscale = div(-128.0, max_scale)
        d = fp16(torch.where(zero, 0.0, div(1.0, iscale)))
        sc = nearest_int(iscale[:, None] * scales).clamp_(max=127) & 0xFF       # int8_t, stored as its byte
        sc = sc.masked_fill(zero[:, None], 0).to(torch.uint8)
        return {"d": d, "scales": sc, "fallback": L.reshape(B, QK_K).masked_fill(zero[:, None], 0)}

    def _effective(self, hdr):
        scale = _d(hdr) * hdr["scales"].view(torch.int8).float()
        return scale, scale * -32.0

    def _pack(self, codes, hdr):
        B = codes.shape[0]
        g = codes.reshape(B, 2, 4, 32)                                 # half h, quarter k: element 128h + 32k + l
        ql = np.concatenate([(g[:, :, 0] & 0xF) | ((g[:, :, 2] & 0xF) << 4),
                             (g[:, :, 1] & 0xF) | ((g[:, :, 3] & 0xF) << 4)], axis=2).reshape(B, 128)
        qh = np.zeros((B, 2, 32), dtype=np.uint8)
        for k in range(4):
            qh |= (g[:, :, k] >> 4) << np.uint8(2 * k)
        return np.concatenate([ql, qh.reshape(B, 64), hdr["scales"], _f16_bytes(hdr["d"])], axis=1)

    def _unpack(self, b):
        B = b.shape[0]
        ql = b[:, 0:128].reshape(B, 2, 2, 32)                          # half, (first/second 32 bytes), l
        qh = b[:, 128:192].reshape(B, 2, 1, 32) >> (np.arange(4, dtype=np.uint8) * 2).reshape(1, 1, 4, 1)
        lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        codes = (lo | ((qh & 3) << 4)).reshape(B, QK_K)
        return codes, {"d": b[:, 208:210].copy().view(np.float16)[:, 0], "scales": b[:, 192:208].copy(),
                       "fallback": None}
