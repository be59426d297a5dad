"""IQ4_NL and IQ4_XS: 4-bit indices into llama.cpp's non-linear 16-level grid kvalues_iq4nl
(-127 ... 113, denser near 0), weight = scale * kvalues_iq4nl[q].

  IQ4_NL  blocks of 32: fp16 d, 16 bytes of nibbles                                  4.5 bpw, 18 bytes
  IQ4_XS  super-blocks of 256: fp16 d, 8 sub-blocks of 32 with 6-bit scales ls (scale d*(ls-32)),
          scales_h (2 high bits each, uint16) + scales_l (4 low bits each), 128 bytes of nibbles  4.25 bpw, 136 bytes

Nibble layout (both): byte j of a group of 32 holds code j (low nibble) and code j+16 (high nibble).

llama.cpp's quantize_row_iq4_nl_impl (ntry = 7 through ggml_quantize_chunk, with or without an imatrix) does, per
sub-block of 32 with weights w = x^2 (no imatrix) or qw*sqrtf(sigma2 + x^2) (sigma2 = 2*mean square of the whole
block: 32 values for IQ4_NL, 256 for IQ4_XS):
  1. max = the first value of largest |x| (a sub-block with amax < 1e-15 gets scale 0);
  2. 16 candidate multipliers: 1/(max/127) and (itry - 127)/max for itry = -7..7; each rounds x to the nearest
     level (best_index_int8) and gives the weighted least-squares scale sumqx/sumq2; the first guess sets `best`,
     later candidates replace it when sumqx^2 > best*sumq2 (strict: the first best wins);
  3. IQ4_NL: d = that float32 scale, stored as fp16; the codes are re-rounded with 1/d (the float32 d, not the
     stored fp16 one).
     IQ4_XS: the super-block d = -max_scale/32 (max_scale: the first sub-block scale of largest magnitude; all-zero
     super-blocks thus store fp16 -0.0), ls = clamp(nearest_int(scale/d'), -32, 31) with d' = 1/d in float32, and
     the codes are re-rounded with 1/(d*ls) (again float32 d, not fp16); a 0 multiplier gives code 8 (level 1).
Neither type requires an imatrix. All candidates of step 2 are independent, so they are evaluated at once; only
the choice among them is sequential.

best_index_int8 returns the nearer of two neighbouring levels, the upper one on a tie, comparing x - lo < hi - x
in float32. Near a midpoint |x| >= 4.5 and both differences are exact, so this is `x >= midpoint` exactly; all
midpoints are half-integers, hence the level only depends on floor(2x), looked up in a small table. NaN goes to
the top level as in C.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.ggml._num import (F32, GROUP_MAX_EPS, div, f32, first_absmax, fp16, nearest_int, seqsum,
                                       sqrt)

KVALUES = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.int8)          # kvalues_iq4nl
_NTRY = 7
_SUB = 32

# level index as a function of k = floor(2x) for k in [_LO, _HI]: the number of doubled midpoints <= k
_MID2 = KVALUES[:-1].astype(np.int64) + KVALUES[1:]                    # 2 * midpoints, integers
_LO, _HI = int(_MID2[0]) - 1, int(_MID2[-1])
_IDX_TABLE = np.searchsorted(_MID2, np.arange(_LO, _HI + 1), side="right").astype(np.int32)
_VAL_TABLE = KVALUES[_IDX_TABLE].astype(np.float32)
_CHUNK = {"cpu": 2048}                      # sub-blocks per candidate batch (CPU: buffers stay in cache)
_CHUNK_OTHER = 1 << 16

_TABLES = {"idx": _IDX_TABLE, "val": _VAL_TABLE, "kv": KVALUES.astype(np.float32)}
_on_device: dict = {}


def _table(kind: str, device) -> torch.Tensor:
    key = (kind, str(device))
    if key not in _on_device:
        _on_device[key] = torch.from_numpy(_TABLES[kind]).to(device)
    return _on_device[key]


def _level_slot(u: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """slot (int32, u's shape) = table row of the level nearest to u/2; u (float32, overwritten) holds 2*x."""
    u.nan_to_num_(nan=float(_HI), posinf=float(_HI), neginf=float(_LO)).clamp_(_LO, _HI).floor_().sub_(_LO)
    return slot.copy_(u)


def best_index(a: torch.Tensor) -> torch.Tensor:
    """llama.cpp's best_index_int8(16, kvalues_iq4nl, a) elementwise: int32 level indices."""
    slot = _level_slot(a * 2.0, torch.empty(a.shape, dtype=torch.int32, device=a.device))
    return _table("idx", a.device)[slot.long()]


def _subblock_scales(x: torch.Tensor, w: torch.Tensor, flat: tuple) -> torch.Tensor:
    """llama.cpp's float32 scale of each sub-block (step 2 above): x, w [32, S] element-major -> [S].
    flat: three scratch buffers (float32, float32, int32) of at least 32*16*S elements, reused across calls (on
    the CPU, fresh large tensors cost page faults)."""
    n, S = x.shape
    amax, mx = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    mx = mx.masked_fill(zero, 1.0)                  # keeps the unused candidates of zero sub-blocks finite
    ids = torch.empty(2 * _NTRY + 2, S, dtype=F32, device=x.device)
    ids[0] = div(1.0, div(-mx, f32(KVALUES[0])))
    consts = torch.arange(-_NTRY, _NTRY + 1, dtype=F32, device=x.device) + float(KVALUES[0])
    ids[1:] = div(consts[:, None], mx[None, :])
    ids.mul_(2.0)                                   # 2*(id*x) == (2*id)*x exactly: the doubled abscissa directly
    u, q, slot = (f[: n * ids.shape[0] * S].view(n, -1, S) for f in flat)
    torch.mul(x[:, None, :], ids[None], out=u)      # [n, 16, S]
    torch.index_select(_table("val", x.device), 0, _level_slot(u, slot).view(-1), out=q.view(-1))
    wq = torch.mul(q, w[:, None, :], out=u)         # C: w*q*x = (w*q)*x, w*q*q = (w*q)*q
    sumqx = seqsum(torch.mul(wq, x[:, None, :], out=slot.view(F32)), axis=0)        # [16, S]
    sumq2 = seqsum(wq.mul_(q), axis=0)
    pos = sumq2 > 0
    d = torch.where(pos[0], div(sumqx[0], sumq2[0]), 0.0)
    best = d * sumqx[0]
    cand = div(sumqx, sumq2)
    for k in range(1, ids.shape[0]):               # strict `>`: the first best candidate is kept
        upd = pos[k] & (sumqx[k] * sumqx[k] > best * sumq2[k])
        d = torch.where(upd, cand[k], d)
        best = torch.where(upd, cand[k] * sumqx[k], best)
    return d.masked_fill(zero, 0.0)


def _scales(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x, qw [B, block] -> float32 sub-block scales [B, block/32] (sigma2 over the whole block of `block`)."""
    B, n = x.shape
    if qw is None:
        w = x * x
    else:
        sigma2 = seqsum(x * x, axis=1) * f32(2.0 / n)
        w = qw * sqrt(sigma2[:, None] + x * x)
    xs, ws = x.reshape(-1, _SUB), w.reshape(-1, _SUB)
    step = min(_CHUNK.get(x.device.type, _CHUNK_OTHER), xs.shape[0])
    size = _SUB * (2 * _NTRY + 2) * step
    flat = (torch.empty(size, dtype=F32, device=x.device), torch.empty(size, dtype=F32, device=x.device),
            torch.empty(size, dtype=torch.int32, device=x.device))
    out = [_subblock_scales(xs[s:s + step].T.contiguous(), ws[s:s + step].T.contiguous(), flat)
           for s in range(0, xs.shape[0], step)]
    return torch.cat(out).reshape(B, n // _SUB)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """C's `d ? 1/d : 0`."""
    return torch.where(d != 0, div(1.0, d), 0.0)


def _pack_nibbles(L: np.ndarray) -> np.ndarray:
    """codes [B, n] -> [B, n/2]: per 32 codes, byte j = code j | code j+16 << 4."""
    g = L.reshape(L.shape[0], -1, 2, 16).astype(np.uint8)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(L.shape[0], -1)


def _f16_bytes(d: torch.Tensor) -> np.ndarray:
    return fp16(d).cpu().numpy().reshape(-1, 1).view(np.uint8)


class _IQ4(BlockwiseCodec):
    needs_imatrix = False
    levels = KVALUES

    @staticmethod
    def nearest_levels(w, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The code llama.cpp gives each weight for a given float32 scale (its final re-rounding:
        best_index_int8(w * (scale ? 1/scale : 0))) and that code's value scale * kvalues_iq4nl[code].
        w, scale: tensors of one shape (e.g. [rows, n]) -> (uint8 codes, float32 values); with the stored
        effective scale (fp16 d, times ls-32 for IQ4_XS) the values are the dequantized weights exactly."""
        w, scale = torch.as_tensor(w, dtype=F32), torch.as_tensor(scale, dtype=F32)
        idx = best_index(w * _inverse(scale))
        return idx.to(torch.uint8), scale * _table("kv", w.device)[idx.long()]


class IQ4_NL(_IQ4):
    name, ggml_type = "IQ4_NL", gguf.GGMLQuantizationType.IQ4_NL

    def _quantize_blocks(self, x, qw):
        d = _scales(x, qw)[:, 0]
        L = best_index(x * _inverse(d)[:, None])                    # re-rounded with the float32 d, not fp16(d)
        return np.concatenate([_f16_bytes(d), _pack_nibbles(L.cpu().numpy())], axis=1)


class IQ4_XS(_IQ4):
    name, ggml_type = "IQ4_XS", gguf.GGMLQuantizationType.IQ4_XS

    def _quantize_blocks(self, x, qw):
        B = x.shape[0]
        scales = _scales(x, qw)                                     # [B, 8]
        max_scale = first_absmax(scales, 1)[1]
        d = div(-max_scale, 32.0)
        ls = nearest_int(_inverse(d)[:, None] * scales).clamp_(-32, 31)
        dl = d[:, None] * ls.float()                                # float32 d again, not the stored fp16
        L = best_index(x.reshape(B, -1, _SUB) * _inverse(dl)[:, :, None]).reshape(B, -1)
        ls = (ls + 32).cpu().numpy().astype(np.uint16)
        scales_h = (((ls >> 4) & 3) << (2 * np.arange(ls.shape[1], dtype=np.uint16))).sum(1, dtype=np.uint16)
        scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
        scales_h = scales_h.astype("<u2").reshape(-1, 1).view(np.uint8)
        return np.concatenate([_f16_bytes(d), scales_h, scales_l.astype(np.uint8), _pack_nibbles(L.cpu().numpy())],
                              axis=1)
