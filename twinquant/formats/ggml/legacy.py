"""Q8_0, Q4_0, Q5_0: blocks of 32 weights with one fp16 scale and symmetric codes (block = sub = 32);
Q4_1, Q5_1: blocks of 32 weights with an fp16 scale d and an fp16 min m, weight d*q + m, q in [0, qmax].

Codes are stored shifted to [0, qmax] with offset = -zero_code * d: Q8_0 q+128 (int8 stored), Q4_0 q in [0, 15]
(weight d*(q-8)), Q5_0 q in [0, 31] (weight d*(q-16)).

llama.cpp rounds these with a float32 multiplier, not with the stored fp16 scale, so `fit` keeps it (packed.iscale)
and `codes` reproduces its rounding rule:
  "ref" (no imatrix, quantize_row_*_ref): Q8_0 roundf(x*id); Q4_0/Q5_0 min(qmax, trunc(x*id + zero + 0.5)),
        with d = amax/127 (Q8_0) or max/-8, max/-16 (max: the first value of largest magnitude), id = 1/d;
  "qx"  (imatrix, quantize_row_q4_0/q5_0_impl -> make_qx_quants): nearest_int(iscale*x) clamped, + zero; Q8_0
        ignores the imatrix like llama.cpp.

Q1_0: blocks of 128 weights, one fp16 scale d = mean |x| (sequential float32 sum / 128) and one sign bit a weight
(bit j of byte j/8, little-endian bit order; weight +d if set, else -d; quantize_row_q1_0_ref sets it for x >= 0). The
codes are that bit, with scale 2d and offset -d. llama.cpp ignores the imatrix, and so does this codec.

Q2_0: blocks of 64 weights, one fp16 scale d = max |x| and 2-bit codes q = (int)roundf(x/d) + 1 clamped to [0, 3],
weight (q - 1)*d: the grid is {-d, 0, d, 2d} (quantize_row_q2_0_ref; code 3 is reached only by values beyond max |x|,
e.g. GPTQ's updated weights). Four codes a byte, code j in bits 2(j%4) of byte j/4. llama.cpp ignores the imatrix;
with one, this codec searches the scale (`_Legacy._fit` with `Q2_0.qx_nmax` / `qx_sign`) and its bytes are no longer
libggml's (without one they are).

Q4_1 / Q5_1 keep the stored m in `dmin` (added: offset = +m) and round from a float32 origin that is not stored,
so `iscale` is float32 [B, 2]: (multiplier, origin); codes are
  "ref"  (no imatrix, quantize_row_q4_1/q5_1_ref): min(qmax, trunc((x - min)*id + 0.5)), origin = min (the block's
         first minimum), d = (max - min)/qmax, id = 1/d or 0;
  "qkx"  (imatrix, quantize_row_q4_1/q5_1_impl -> make_qkx3_quants(-0.9, 0.05, 36) with weights
         qw*sqrt(sigma2 + x^2), sigma2 the whole row's mean square): clamp(nearest_int(iscale*(x - min)), 0, qmax)
         with the iscale and min of the search candidate llama.cpp kept (`_qkx3_search`);
  None   (unpacked parameters): nearest on the effective grid, clamp(nearest_int((x - m)/d), 0, qmax), 0 if d = 0.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._base import GGMLCodec
from twinquant.formats.ggml._num import (c_int8, div, f32, first_absmax, first_extreme, fp16, make_qkx_quants,
                                       make_qx_quants, nearest_int, roundf, seqsum, sqrt)



def _pack5(codes):
    """Q5_0 / Q5_1 code bytes of 32 5-bit codes: (qh: the high bits as a little-endian uint32, qs: the low nibbles)."""
    qs = (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)
    qh = np.packbits((codes >> 4) & 1, axis=1, bitorder="little")           # bit j of the LE uint32
    return qh, qs


def _unpack5(qh, qs):
    hi = np.unpackbits(qh, axis=1, bitorder="little")
    return np.concatenate([qs & 0xF, qs >> 4], axis=1) | (hi << 4)

class _Legacy(GGMLCodec):
    sub = 32
    uses_imatrix = True
    qx_nmax: int | None = None      # make_qx_quants' grid [-nmax, nmax - 1] with an imatrix (None: zero_code)
    qx_sign = 1                     # -1: that grid negated (Q2_0's [-1, 2] is [-2, 1] mirrored)

    def _ref(self, x) -> torch.Tensor:          # float32 d before fp16 rounding
        raise NotImplementedError

    def _fit(self, x, qw, sigma2):
        if qw is None or not self.uses_imatrix:
            d = self._ref(x)
            iscale = torch.where(d != 0, div(1.0, d), 0.0)
            return {"d": fp16(d), "iscale": iscale, "rule": "ref", "fallback": None}
        if sigma2 is None:
            sigma2 = div(seqsum(x * x), float(x.shape[1]))
        w = qw * sqrt(sigma2[:, None] + x * x)
        scale, _, iscale = make_qx_quants(x, self.qx_nmax or self.zero_code, w)
        if self.qx_sign < 0:                     # the search's grid mirrored onto the type's (exact negation)
            scale, iscale = -scale, -iscale
        return {"d": fp16(scale), "iscale": iscale, "rule": "qx", "fallback": None}

    def _effective(self, hdr):
        d = hdr["d"].float().reshape(-1, 1)
        return d, d * f32(-self.zero_code)

    def _codes(self, x, hdr, scale, offset):
        z = self.zero_code
        rule = hdr.get("rule")
        iscale = hdr.get("iscale")
        if rule == "ref":                        # int8 stores of roundf(x*id) / MIN(qmax, (int8_t)(x*id + z + 0.5f))
            v = x * iscale.reshape(-1, 1)
            if self.qmax == 255:
                q = (c_int8(roundf(v)) + z) & 0xFF
            else:
                q = c_int8(v + f32(z + 0.5)).clamp_(0, self.qmax)
        elif rule == "qx":
            isc = iscale.reshape(-1, 1)
            q = nearest_int(isc * x).clamp_(-z, self.qmax - z) + z
            q = torch.where(isc == 0, 0, q)
        else:                                    # nearest on the effective grid
            q = torch.where(scale != 0, nearest_int(div(x, scale)).clamp_(-z, self.qmax - z) + z, z)
        return q.to(torch.uint8)

    def _d_bytes(self, hdr):
        return np.asarray(hdr["d"], dtype=np.float16).reshape(-1, 1).view(np.uint8)

    @staticmethod
    def _hdr_from_d(d):
        return {"d": d.copy().view(np.float16).reshape(-1), "iscale": None, "rule": None, "fallback": None}


class Q8_0(_Legacy):
    name, ggml_type, qmax, zero_code = "Q8_0", gguf.GGMLQuantizationType.Q8_0, 255, 128
    uses_imatrix = False

    def _ref(self, x):
        return div(x.abs().amax(-1), 127.0)

    def _pack(self, codes, hdr):
        return np.concatenate([self._d_bytes(hdr), codes ^ np.uint8(0x80)], axis=1)

    def _unpack(self, b):
        return b[:, 2:] ^ np.uint8(0x80), self._hdr_from_d(b[:, :2])


class Q4_0(_Legacy):
    name, ggml_type, qmax, zero_code = "Q4_0", gguf.GGMLQuantizationType.Q4_0, 15, 8
    _needs_row_sigma2 = True

    def _ref(self, x):
        return div(first_absmax(x)[1], -8.0)

    def _pack(self, codes, hdr):
        qs = codes[:, :16] | (codes[:, 16:] << 4)
        return np.concatenate([self._d_bytes(hdr), qs], axis=1)

    def _unpack(self, b):
        qs = b[:, 2:]
        return np.concatenate([qs & 0xF, qs >> 4], axis=1), self._hdr_from_d(b[:, :2])


class Q5_0(_Legacy):
    name, ggml_type, qmax, zero_code = "Q5_0", gguf.GGMLQuantizationType.Q5_0, 31, 16
    _needs_row_sigma2 = True

    def _ref(self, x):
        return div(first_absmax(x)[1], -16.0)

    def _pack(self, codes, hdr):
        return np.concatenate([self._d_bytes(hdr), *_pack5(codes)], axis=1)

    def _unpack(self, b):
        return _unpack5(b[:, 2:6], b[:, 6:]), self._hdr_from_d(b[:, :2])


class Q1_0(_Legacy):
    name, ggml_type, qmax, zero_code = "Q1_0", gguf.GGMLQuantizationType.Q1_0, 1, 0
    sub = 128
    uses_imatrix = False

    def _ref(self, x):
        return div(seqsum(x.abs()), float(x.shape[1]))

    def _effective(self, hdr):
        d = hdr["d"].float().reshape(-1, 1)
        return d + d, -d                         # +d for code 1, -d for code 0 (2d - d == d exactly)

    def _codes(self, x, hdr, scale, offset):
        # the sign is the nearest of {-d, +d} whatever d is; llama.cpp's rule puts x = 0 (and -0.0) on +d
        return (x >= 0).to(torch.uint8)

    def _pack(self, codes, hdr):
        return np.concatenate([self._d_bytes(hdr), np.packbits(codes, axis=1, bitorder="little")], axis=1)

    def _unpack(self, b):
        return np.unpackbits(b[:, 2:], axis=1, bitorder="little"), self._hdr_from_d(b[:, :2])


class Q2_0(_Legacy):
    name, ggml_type, qmax, zero_code = "Q2_0", gguf.GGMLQuantizationType.Q2_0, 3, 1
    sub = 64
    _needs_row_sigma2 = True
    # Without an imatrix: llama.cpp's d = max |x| (its bytes). That leaves code 3 (2d) unused: a ternary grid at ±max,
    # 3.6x the squared error of the best scale on Gaussian blocks. llama.cpp ignores the imatrix; with one (GPTQ
    # passes its Hessian's diagonal) this codec runs the weighted search llama.cpp runs for Q4_0 (make_qx_quants,
    # weights qw·sqrt(sigma2 + x²)) on {-2, -1, 0, 1}·s, which is Q2_0's {-1, 0, 1, 2}·d with d = -s: a signed d puts
    # the extra level on the heavier side. On every block of the codec tests its weighted error is at most that of
    # llama.cpp's bytes (tests/test_ggml_codecs.py).
    qx_nmax, qx_sign = 2, -1
    libggml_imatrix = False          # so libggml's bytes with an imatrix are not this codec's

    def _ref(self, x):
        return x.abs().amax(-1)

    def _codes(self, x, hdr, scale, offset):
        if hdr.get("rule") != "ref":
            return super()._codes(x, hdr, scale, offset)
        v = roundf(x * hdr["iscale"].reshape(-1, 1))      # (int)roundf(w*id): out of int's range (and NaN) -> INT_MIN
        q = torch.where(v.abs() < 2147483648.0, v, -2147483648.0).to(torch.int64) + 1
        return q.clamp_(0, self.qmax).to(torch.uint8)

    def _pack(self, codes, hdr):
        qs = codes[:, 0::4] | (codes[:, 1::4] << 2) | (codes[:, 2::4] << 4) | (codes[:, 3::4] << 6)
        return np.concatenate([self._d_bytes(hdr), qs], axis=1)

    def _unpack(self, b):
        qs = b[:, 2:]
        codes = np.stack([qs & 3, (qs >> 2) & 3, (qs >> 4) & 3, qs >> 6], axis=2).reshape(len(b), -1)
        return codes, self._hdr_from_d(b[:, :2])


# ---- Q4_1 / Q5_1 ----------------------------------------------------------------------------------------------------

_QKX3 = (-0.9, 0.05, 36)                    # rmin, rdelta, nstep of quantize_row_q4_1/q5_1_impl


def _qkx3_search(x: torch.Tensor, w: torch.Tensor, nmax: int):
    """llama.cpp's weighted qkx3 search (quantize_row_q4_1/q5_1_impl) -> (scale, the_min, iscale, origin):
    the kept candidate's multiplier and min are what its codes are rounded from."""
    scale, the_min, _, iscale, origin = make_qkx_quants(x, w, nmax, *_QKX3, use_mad=False, rounding=True)
    return scale, the_min, iscale, origin


class _LegacyMin(GGMLCodec):
    sub = 32
    _needs_row_sigma2 = True

    def _fit(self, x, qw, sigma2):
        if qw is None:
            mn, mx = first_extreme(x, False), first_extreme(x, True)
            d = div(mx - mn, float(self.qmax))
            iscale = torch.where(d != 0, div(1.0, d), 0.0)
            return {"d": fp16(d), "dmin": fp16(mn), "iscale": torch.stack([iscale, mn], dim=1), "rule": "ref",
                    "fallback": None}
        if sigma2 is None:
            sigma2 = div(seqsum(x * x), float(x.shape[1]))
        w = qw * sqrt(sigma2[:, None] + x * x)
        scale, the_min, iscale, origin = _qkx3_search(x, w, self.qmax)
        return {"d": fp16(scale), "dmin": fp16(-the_min), "iscale": torch.stack([iscale, origin], dim=1),
                "rule": "qkx", "fallback": None}

    def _effective(self, hdr):
        return hdr["d"].float().reshape(-1, 1), hdr["dmin"].float().reshape(-1, 1)

    def _codes(self, x, hdr, scale, offset):
        rule = hdr.get("rule")
        if rule in ("ref", "qkx"):
            isc = hdr["iscale"].reshape(-1, 2)
            mul, org = isc[:, :1], isc[:, 1:]
            if rule == "ref":
                q = c_int8((x - org) * mul + 0.5).clamp_(0, self.qmax)         # MIN(qmax, (int8_t)(...))
            else:
                q = torch.where(mul != 0, nearest_int(mul * (x - org)).clamp_(0, self.qmax), 0)
        else:                                    # nearest on the effective grid
            q = torch.where(scale != 0, nearest_int(div(x - offset, scale)).clamp_(0, self.qmax), 0)
        return q.to(torch.uint8)

    @staticmethod
    def _dm_bytes(hdr):
        return np.concatenate([np.asarray(hdr[k], dtype=np.float16).reshape(-1, 1).view(np.uint8)
                               for k in ("d", "dmin")], axis=1)

    @staticmethod
    def _hdr_from_dm(b):
        f = b[:, :4].copy().view(np.float16)
        return {"d": f[:, 0].copy(), "dmin": f[:, 1].copy(), "iscale": None, "rule": None, "fallback": None}


class Q4_1(_LegacyMin):
    name, ggml_type, qmax = "Q4_1", gguf.GGMLQuantizationType.Q4_1, 15

    def _pack(self, codes, hdr):
        qs = codes[:, :16] | (codes[:, 16:] << 4)
        return np.concatenate([self._dm_bytes(hdr), qs], axis=1)

    def _unpack(self, b):
        qs = b[:, 4:]
        return np.concatenate([qs & 0xF, qs >> 4], axis=1), self._hdr_from_dm(b)


class Q5_1(_LegacyMin):
    name, ggml_type, qmax = "Q5_1", gguf.GGMLQuantizationType.Q5_1, 31

    def _pack(self, codes, hdr):
        return np.concatenate([self._dm_bytes(hdr), *_pack5(codes)], axis=1)

    def _unpack(self, b):
        return _unpack5(b[:, 4:8], b[:, 8:]), self._hdr_from_dm(b)
