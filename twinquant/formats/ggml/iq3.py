"""IQ3_XXS (3.06 bpw) and IQ3_S (3.44 bpw): super-blocks of 256 weights in 8 sub-blocks of 32, each sub-block 8
groups of 4 magnitudes that are one point of a lattice codebook, signs stored apart, one 4-bit scale per sub-block.

  IQ3_XXS  d fp16 | 64 grid indices (256-point grid) | per sub-block a uint32: 4 x 7 sign bits (the 8th sign of each
           8 weights is the parity) + 4-bit scale l << 28; weight = d*(0.5+l)*0.5 * grid * sign       98 bytes
  IQ3_S    d fp16 | 64 low bytes of the 9-bit indices (512-point grid) | 8 bytes of high bits | 32 sign bytes |
           4 bytes of scale nibbles; weight = d*(1+2l) * grid * sign                                   110 bytes

llama.cpp (iq3xs_init_impl, quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl; both run with or without an
imatrix: weights qw*sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2) of the super-block, else x^2) quantizes each sub-block
with |x| (xval), trying the multipliers id = (15 + 0.2*is)/max: codes l = nearest_int(0.5*(id*xval - 1)) in
[0, 7] per weight; a group of 4 codes not on the grid is replaced by its best neighbour, the grid point among the
precomputed neighbours of that lattice point (the grid points at the 2 (XXS) or 3 (S) smallest integer distances,
sorted by distance then index) with the smallest sum_i sqrt(w_i)*(s*q_i - xval_i)^2 at the scale s = 1/id, the
first one on a tie. The candidate with the best weighted fit is kept; if any of its groups was off the grid, the
groups that were (XXS) or all 8 (S: its `continue` is commented out) are re-rounded at the fitted scale and the
scale refitted (S starts with every group "off the grid", so a sub-block where no candidate won is re-rounded too).
The super-block's d = max_scale/31 times a fudge factor (1.0125 XXS, 1.033 S).

Here the neighbour search runs for all off-grid groups of a candidate at once: the 4 x 8 terms (w*diff)*diff of
each group are computed once, each lattice point's neighbour list is padded (to the cap of its length bucket: most
lists are far shorter than the longest, 36 / 38) with entries naming a column of +inf, the candidates' distances
are summed from the gathered terms in C's order, and the first minimum taken.

ggml quantizes both without an imatrix (ggml_quantize_requires_imatrix: no); llama-quantize itself refuses
IQ3_XXS without one except for token_embd / output (tensor_requires_imatrix), not IQ3_S.

Oddities reproduced: in IQ3_XXS an odd number of negative weights among 8 flips the sign of the one with the
smallest w*x*x (its magnitude enters the fit negated, so a negative scale can win; it is then negated along with
the stored signs); a sub-block with max < 1e-8 (XXS) or max == 0 (S) is skipped: scale 0, and in IQ3_S its
`qs`/`signs` pointers are not advanced, so the later sub-blocks' indices and signs are written one slot early
(the last slots stay zero), while its scale nibble is 0, i.e. it dequantizes to the shifted data at d*1.
"""

from __future__ import annotations

import functools
import math

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.ggml._num import (accept_in_order, candidates_per_pass, F32, div, f32,
                                           fp16, nearest_int_, seqsum, sqrt)

QK_K = 256
_SHIFTS = (0, 3, 6, 9)                      # lattice point u = l0 | l1<<3 | l2<<6 | l3<<9
_BLOCKS_PER_STEP = {"cpu": 1024, "cuda": 4096}   # super-blocks per pass (CPU: buffers that stay in cache)
_CAPS = (4, 6, 8, 12, 17, 24)              # neighbour-list lengths the lists are padded to


class _Lattice:
    """iq3xs_init_impl's tables for one grid, as tensors on one device.

    kmap    int64 [4096]   grid index of lattice point u, -1 off the grid
    q       float32 [G, 4] the grid's odd values 2l+1
    bucket  uint8 [4096]   which of `caps` the length of u's neighbour list falls in (the lists are padded to
                           their bucket's cap, not all to the longest: most are far shorter); len(caps) on the grid
    nb_j[b] int64 [4096, cap_b]    neighbour grid indices of u in C's order, padded
    nb_t[b] int64 [4096, 4*cap_b]  for term i of neighbour j, at i*cap_b + j: the column i*8 + l_i of a group's
                                   table of terms (w_i*diff)*diff; the padding points at column 32, +inf
    """

    def __init__(self, quant, nwant: int, device: torch.device):
        quant.init_grid()
        grid = np.asarray(quant.grid, np.float32).reshape(quant.grid_shape)
        lv = np.searchsorted(np.asarray(quant.grid_map, np.float32), grid).astype(np.int64)   # [G, 4] in 0..7
        G = lv.shape[0]
        kmap = np.full(4096, -1, np.int64)
        kmap[(lv << np.array(_SHIFTS)).sum(1)] = np.arange(G)
        pts = (np.arange(4096)[:, None] >> np.array(_SHIFTS)) & 7
        d2 = ((lv[None] - pts[:, None]) ** 2 * 4).sum(-1)                                    # [4096, G]
        order = np.argsort(d2 * G + np.arange(G), axis=1, kind="stable")                    # by distance, then index
        ds = np.take_along_axis(d2, order, 1)
        rank = np.concatenate([np.zeros((4096, 1), np.int64), np.cumsum(ds[:, 1:] != ds[:, :-1], 1)], 1)
        keep = (rank < nwant) & (kmap < 0)[:, None]           # the nwant nearest distances; a prefix of each row
        n = keep.sum(1)
        self.caps = [c for c in _CAPS if c < n.max()] + [int(n.max())]
        t = functools.partial(torch.as_tensor, device=device)
        self.kmap, self.q, self.bucket = t(kmap), t(2 * lv + 1, dtype=F32), \
            t(np.where(kmap < 0, np.searchsorted(self.caps, n), len(self.caps)).astype(np.uint8))
        self.nb_j, self.nb_t = [], []
        for cap in self.caps:
            k, o = keep[:, :cap], order[:, :cap]
            terms = np.arange(4)[None, :, None] * 8 + np.moveaxis(lv[o], 2, 1)              # [4096, 4, cap]
            self.nb_j.append(t(np.where(k, o, 0)))
            self.nb_t.append(t(np.where(k[:, None, :], terms, 32).reshape(4096, 4 * cap)))
        self.odd = t(np.arange(1, 16, 2), dtype=F32)                                        # q = 2l+1, l = 0..7


@functools.cache
def _lattice(grid_size: int, device: torch.device) -> _Lattice:
    if grid_size == 256:
        return _Lattice(gguf.quants.IQ3_XXS, 2, device)
    return _Lattice(gguf.quants.IQ3_S, 3, device)


class _Scratch:
    """Buffers reused across the candidate passes of one call: fresh large CPU tensors cost page faults."""

    def __init__(self, device: torch.device):
        self.device, self.bufs = device, {}

    def __call__(self, name: str, shape: tuple, dtype=F32) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=dtype, device=self.device)
        return buf[:n].view(shape)


def _snap(lat: _Lattice, id_: torch.Tensor, xg: torch.Tensor, wg: torch.Tensor, scale: torch.Tensor, ws: _Scratch):
    """Round groups onto the lattice at the multiplier id_ [n] and move those off the grid to their best
    neighbour at `scale` [n] (iq3_find_best_neighbour). xg, wg [n, 4]: xval and sqrt(weight).
    -> (grid index [n], on-grid [n])."""
    n = xg.shape[0]
    l = nearest_int_(torch.mul(xg, id_[:, None], out=ws("l", (n, 4))).sub_(1.0).mul_(0.5)).clamp_(0, 7)
    u = l[:, 0] | (l[:, 1] << 3) | (l[:, 2] << 6) | (l[:, 3] << 9)                        # int32
    gi = lat.kmap.index_select(0, u)
    on = gi >= 0
    # the off-grid groups, sorted by the length bucket of their neighbour lists (on-grid ones sort last)
    key = lat.bucket.index_select(0, u)
    counts = torch.bincount(key, minlength=len(lat.caps) + 1).tolist()
    n_off = sum(counts[:-1])
    if not n_off:
        return gi, on
    rows = torch.argsort(key)[:n_off]
    uo = u.index_select(0, rows)
    # terms[g, 8i + l] = (w_i*(s*q_l - x_i))*(s*q_l - x_i), q_l = 2l+1; column 32 = +inf for the padding
    xt, wt = xg.index_select(0, rows).T.contiguous(), wg.index_select(0, rows).T.contiguous()
    sq = torch.mul(lat.odd[:, None], scale.index_select(0, rows), out=ws("sq", (8, n_off)))
    terms = ws("terms", (n_off, 33))
    diff = ws("diff", (8, n_off))
    for i in range(4):          # element-major: contiguous inner loops, written transposed into the table
        torch.mul(torch.sub(sq, xt[i], out=diff), wt[i], out=terms[:, 8 * i: 8 * i + 8].T).mul_(diff)
    terms[:, 32] = float("inf")
    best = torch.empty_like(gi[:n_off])
    start = 0
    for b, cap in enumerate(lat.caps):
        m = counts[b]
        if not m:
            continue
        sl = slice(start, start + m)
        start += m
        ub = uo[sl]
        idx = torch.index_select(lat.nb_t[b], 0, ub, out=ws("idx", (m, 4 * cap), torch.int64))
        t = torch.gather(terms[sl], 1, idx, out=ws("t", (m, 4 * cap))).view(m, 4, cap)
        d2 = torch.add(t[:, 0], t[:, 1], out=ws("d2", (m, cap))).add_(t[:, 2]).add_(t[:, 3])   # C: d2 = 0; d2 += ..
        j = d2.argmin(1)                                                                    # the first minimum
        best[sl] = lat.nb_j[b].view(-1).index_select(0, ub * cap + j)
    gi.index_copy_(0, rows, best)
    return gi, on


def _fit(weight: torch.Tensor, wx: torch.Tensor, q: torch.Tensor):
    """C's `sumqx += w*xval*q; sumq2 += w*q*q` over the 32 values of each sub-block ([S, 32] inputs)."""
    return seqsum(wx * q, axis=1), seqsum((weight * q) * q, axis=1)


def _quantize(x: torch.Tensor, qw: torch.Tensor | None, xxs: bool):
    """quantize_row_iq3_{xxs,s}_impl on B super-blocks x [B, 256] -> dict of per-sub-block tensors."""
    lat = _lattice(256 if xxs else 512, x.device)
    B = x.shape[0]
    S = 8 * B
    sigma2 = div(seqsum(x * x, axis=1) * 2.0, float(QK_K))
    weight = x * x if qw is None else qw * sqrt(sigma2[:, None] + x * x)
    waux = sqrt(weight)

    # signs per 8 weights; xval = |x| (x >= 0 keeps x, so -0.0 stays)
    x8 = x.reshape(S, 4, 8)
    neg = ~(x8 >= 0)
    xval = torch.where(neg, -x8, x8)
    bits = torch.tensor([1 << i for i in range(8)], device=x.device)
    signs = (neg * bits).sum(-1)                                                            # [S, 4]
    if xxs:         # 7 sign bits per 8: with an odd number of negatives the one of least w*x*x is flipped
        odd = (neg.sum(-1) % 2) == 1
        imin = ((weight.reshape(S, 4, 8) * x8) * x8).argmin(-1)
        hit = odd[..., None] & (torch.arange(8, device=x.device) == imin[..., None])
        xval = torch.where(hit, -xval, xval)
        signs = (signs ^ torch.where(odd, bits[imin], 0)) & 127

    xval = xval.reshape(S, 32)
    weight, waux = weight.reshape(S, 32), waux.reshape(S, 32)
    mx = xval.amax(1)
    skip = mx < f32(1e-8) if xxs else mx == 0
    mx = torch.where(skip, 1.0, mx)                 # skipped sub-blocks are computed on a harmless max, then dropped
    xg, wg = xval.reshape(S * 8, 4), waux.reshape(S * 8, 4)
    ws = _Scratch(x.device)
    wx = weight * xval

    scale = div(mx, 15.0)
    best = torch.zeros_like(mx)
    gbest = torch.zeros((S, 8), dtype=torch.int64, device=x.device)        # L = 0: lattice point 0, grid index 0
    onbest = torch.full((S, 8), xxs, device=x.device)
    # the candidates do not depend on each other: k of them are snapped in one pass (a few hundred ops and host
    # syncs per pass instead of per candidate: small calls, as block LDLQ makes on a GPU, were bound by them);
    # only the acceptance is sequential, in C's order
    steps = list(range(-15, 16) if xxs else range(-9, 10))
    k = candidates_per_pass(len(steps), S * 32, x.device)
    for c in range(0, len(steps), k):
        part = steps[c:c + k]
        K = len(part)
        id_ = torch.stack([div(f32(np.float32(15) + np.float32(is_) * np.float32(0.2)), mx) for is_ in part])
        this_scale = div(1.0, id_)                                                      # [K, S]
        gi, on = _snap(lat, id_.repeat_interleave(8, 1).view(-1), xg.repeat(K, 1), wg.repeat(K, 1),
                       this_scale.repeat_interleave(8, 1).view(-1), ws)
        sumqx, sumq2 = _fit(weight.repeat(K, 1), wx.repeat(K, 1), lat.q.index_select(0, gi).view(K * S, 32))
        gi, on, sumqx, sumq2 = gi.view(K, S, 8), on.view(K, S, 8), sumqx.view(K, S), sumq2.view(K, S)
        best, scale, (gbest, onbest) = accept_in_order(best, scale, sumqx, sumq2, [(gbest, gi), (onbest, on)])

    # re-round at the fitted scale: XXS the groups off the grid, S every group (of sub-blocks with one off the grid)
    need = (~onbest).any(1) & (scale > 0)
    if bool(need.any()):
        redo = need[:, None] & (~onbest if xxs else True)
        sc8 = scale.repeat_interleave(8)
        gi, _ = _snap(lat, div(1.0, scale).repeat_interleave(8), xg, wg, sc8, ws)
        gbest = torch.where(redo, gi.view(S, 8), gbest)
        sumqx, sumq2 = _fit(weight, wx, lat.q.index_select(0, gbest.view(-1)).view(S, 32))
        scale = torch.where(need & (sumq2 > 0), div(sumqx, sumq2), scale)

    flip = scale < 0                                # "should never happen": possible in XXS through the parity flip
    scale = torch.where(flip, -scale, scale)
    signs = torch.where(flip[:, None], ~signs & (127 if xxs else 255), signs)
    scale = torch.where(skip, 0.0, scale)
    gbest = gbest.masked_fill(skip[:, None], 0)
    signs = signs.masked_fill(skip[:, None], 0)

    scales = scale.view(B, 8)
    max_scale = scales.amax(1)
    zero = max_scale == 0
    d = div(max_scale, 31.0)
    dh = fp16(d * f32(1.0125 if xxs else 1.033)).masked_fill(zero, 0)
    l = nearest_int_((scales * div(1.0, d)[:, None]).sub_(1.0).mul_(0.5)).clamp_(0, 15).masked_fill(zero[:, None], 0)
    return {"d": dh, "grid": gbest.view(B, 8, 8), "signs": signs.view(B, 8, 4), "scale": l, "skip": skip.view(B, 8),
            "zero": zero}


class _IQ3(BlockwiseCodec):
    needs_imatrix = False           # both quantize without one (weights x^2)
    xxs: bool

    def _quantize_blocks(self, x, qw):
        step = _BLOCKS_PER_STEP.get(x.device.type, _BLOCKS_PER_STEP["cuda"])
        parts = []
        for s in range(0, x.shape[0], step):
            r = _quantize(x[s:s + step], None if qw is None else qw[s:s + step], self.xxs)
            parts.append(self._pack({k: v.cpu().numpy() for k, v in r.items()}))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


class IQ3_XXS(_IQ3):
    name, ggml_type, xxs = "IQ3_XXS", gguf.GGMLQuantizationType.IQ3_XXS, True

    def _pack(self, r) -> np.ndarray:
        B = r["d"].shape[0]
        sg = r["signs"].astype(np.uint32)
        sas = sg[..., 0] | (sg[..., 1] << 7) | (sg[..., 2] << 14) | (sg[..., 3] << 21) \
            | (r["scale"].astype(np.uint32) << 28)
        sas[r["zero"]] = 0                              # llama.cpp zeroes all but d of a block whose scales are 0
        grid = r["grid"].reshape(B, 64).astype(np.uint8)
        grid[r["zero"]] = 0
        return np.concatenate([r["d"].reshape(B, 1).view(np.uint8), grid, sas.astype("<u4").view(np.uint8)], 1)


class IQ3_S(_IQ3):
    name, ggml_type, xxs = "IQ3_S", gguf.GGMLQuantizationType.IQ3_S, False

    def _pack(self, r) -> np.ndarray:
        B = r["d"].shape[0]
        grid = r["grid"]                                                  # [B, 8 sub-blocks, 8 groups]
        qh = ((grid >> 8) << np.arange(8)).sum(-1).astype(np.uint8)        # qh[ib] bit k: sub-block ib, group k
        # skipped sub-blocks do not advance llama.cpp's qs / signs pointers: the others move up, the tail stays 0
        keep = ~r["skip"]
        slot = np.where(keep, np.cumsum(keep, 1) - 1, 8)
        qs = np.zeros((B, 9, 8), np.uint8)
        sg = np.zeros((B, 9, 4), np.uint8)
        rows = np.arange(B)[:, None]
        qs[rows, slot] = (grid & 255).astype(np.uint8)
        sg[rows, slot] = r["signs"].astype(np.uint8)
        sc = r["scale"].astype(np.uint8)
        scales = sc[:, 0::2] | (sc[:, 1::2] << 4)
        return np.concatenate([r["d"].reshape(B, 1).view(np.uint8), qs[:, :8].reshape(B, 64), qh,
                               sg[:, :8].reshape(B, 32), scales], 1)
