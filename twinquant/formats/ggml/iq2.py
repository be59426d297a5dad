"""IQ2_XXS, IQ2_XS, IQ2_S: super-blocks of 256 weights cut into groups of 8, each group stored as the index of a
point of an E8-like lattice codebook (magnitudes 2l+1, l in {0, 1, 2}) plus 8 sign bits, one 4-bit scale per
sub-block and an fp16 super-block scale d:

  IQ2_XXS  256-point grid, sub-blocks of 32, 7 sign bits per group (the 8th makes the parity even)    66 bytes
  IQ2_XS   512-point grid, sub-blocks of 16, 7 sign bits per group (idem)                            74 bytes
  IQ2_S   1024-point grid, sub-blocks of 16, 8 sign bits per group                                    82 bytes

llama.cpp (quantize_row_iq2_{xxs,xs,s}_impl), per sub-block: weights w = qw*sqrt(sigma2 + x^2) (sigma2: the
super-block's mean square; IQ2_S: twice it, and w = sigma2/4 + x^2 without an imatrix), the groups' magnitudes
|x| (XXS/XS: where a group has an odd number of negatives, the element of smallest w*x^2 gets the wrong sign bit
so that the count is even, and its magnitude enters the fit negated); then candidate scales (XXS: 13 around make_qp_quants' scale, XS/S: 19 around max/5) in
order: round each group onto {0, 1, 2}^8 and, where that point is not in the codebook, take the best of its
precomputed neighbours (`iq2_find_best_neighbour`: weights sqrt(w), the first strict minimum in the list's order);
the candidate maximising sumqx^2/sumq2 wins (first one on ties); finally the off-grid groups are redone at the
winning scale and the scale refitted. Sub-block scales become 4-bit l with scale ~ d*(2l+1), d = max/31
(IQ2_S stores d*0.9875).

IQ2_XXS and IQ2_XS need an imatrix (ggml_quantize_requires_imatrix; their impl asserts quant_weights); IQ2_S does
not. The neighbour lists (iq2xs_init_impl) hold, for every off-grid lattice point, the codebook points at the
`nwant` smallest distinct squared distances (XXS/XS 2, S 1), sorted by (distance, index); we rebuild them from
gguf-py's grids once per type and evaluate a whole list at once, padded with entries whose distance is +inf.
Surprises: XXS's make_qp_quants sees a negated magnitude; a candidate's scale can come out negative (then every
group's signs are inverted); IQ2_S keeps a sub-block's codes when the whole super-block's scale is 0, the others
zero them.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.ggml._num import (accept_in_order, candidates_per_pass, div, f32, fp16,
                                           make_qp_quants, nearest_int, seqsum, sqrt)

QK_K = 256
_NPTS = 3 ** 8                         # lattice points {0, 1, 2}^8, indexed by sum(l_i * 3^i)
_PAD = 3                               # the level of padding entries: its term is +inf (pads never win)
_SEARCH_BUDGET = {"cpu": 1 << 21, "cuda": 1 << 25}   # gathered distance terms per search chunk (bounds buffers)


# ----------------------------------------------------------------------------------------------------------------
# codebook, lattice map and neighbour lists (iq2xs_init_impl)
# ----------------------------------------------------------------------------------------------------------------

def _grid_levels(qtype) -> np.ndarray:
    """The codebook as levels l in {0, 1, 2}: int64 [n, 8] (gguf-py packs each point as 8 2-bit fields)."""
    cls = {gguf.GGMLQuantizationType.IQ2_XXS: gguf.quants.IQ2_XXS, gguf.GGMLQuantizationType.IQ2_XS:
           gguf.quants.IQ2_XS, gguf.GGMLQuantizationType.IQ2_S: gguf.quants.IQ2_S}[qtype]
    h = np.frombuffer(cls.grid_hex, dtype=np.uint8).reshape(-1, 2)
    h = np.where(h > 0x40, h + 9, h) & 0x0F                             # hex digits
    b = (h[:, 0] << 4) | h[:, 1]
    lev = (b[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return lev.reshape(cls.grid_shape).astype(np.int64)


# list widths the search pads to: lattice points are bucketed by the length of their list (at most ~20% padding on
# a CPU, where padded terms cost time; a GPU's small calls are bound by the ops a bucket takes, so it pads to 4
# widths). Padding never wins (its terms are +inf), so every width list gives the same choice.
_WIDTHS = {"cpu": (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192,
                   224, 256, 320, 384),
           "cuda": (8, 32, 128, 384)}


def _widths(device: torch.device) -> tuple[int, ...]:
    return _WIDTHS.get(device.type, _WIDTHS["cuda"])


@functools.cache
def _np_tables(qtype, nwant: int, widths: tuple[int, ...]) -> dict:
    """levels [n, 8]; map3 [6561] (grid index of a lattice point, -1 off the grid); bucket / row [6561] (where an
    off-grid point's list lives); per bucket b: lev_b uint8 [points, 8, width] (level of element i of neighbour j,
    _PAD in padding) and grid_b [points, width] (the neighbours' grid indices)."""
    lev = _grid_levels(qtype)
    ngrid = lev.shape[0]
    pow3 = 3 ** np.arange(8, dtype=np.int64)
    map3 = np.full(_NPTS, -1, dtype=np.int64)
    map3[lev @ pow3] = np.arange(ngrid)
    pts = (np.arange(_NPTS)[:, None] // pow3) % 3                       # [6561, 8]
    d2 = ((2 * (lev[None, :, :] - pts[:, None, :])) ** 2).sum(-1)        # (pg - pos)^2 with pg = 2l+1, pos = 2l'+1
    order = np.argsort(d2, axis=1, kind="stable")                       # by (distance, index) like C's qsort
    ds = np.take_along_axis(d2, order, axis=1)
    rank = np.cumsum(np.concatenate([np.ones((_NPTS, 1), bool), ds[:, 1:] != ds[:, :-1]], axis=1), axis=1)
    count = (rank <= nwant).sum(1)                                      # list lengths
    assert count.max() <= widths[-1]
    bucket = np.where(map3 < 0, np.searchsorted(widths, count), -1)
    row = np.zeros(_NPTS, dtype=np.int64)
    out = {"levels": lev, "map3": map3, "pow3": pow3, "bucket": bucket, "row": row}
    for b in np.unique(bucket[bucket >= 0]):
        width = widths[b]
        p = np.flatnonzero(bucket == b)
        row[p] = np.arange(len(p))
        nb = order[p, :width]
        nb = np.pad(nb, ((0, 0), (0, width - nb.shape[1])))          # a width past the grid's size: padding only
        pad = np.arange(width) >= count[p, None]
        out[f"lev{b}"] = np.where(pad[:, None, :], _PAD, np.moveaxis(lev[nb], 2, 1)).astype(np.uint8)
        out[f"grid{b}"] = nb
    return out


@functools.cache
def _tables(qtype, nwant: int, device: torch.device) -> dict[str, torch.Tensor]:
    widths = _widths(device)
    return {"widths": widths, **{k: torch.from_numpy(v).to(device)
                                 for k, v in _np_tables(qtype, nwant, widths).items()}}


def _best_neighbour(tab, x8, w8, scale, t) -> torch.Tensor:
    """iq2_find_best_neighbour for K off-grid groups (x8, w8 float32 [K, 8]: magnitudes and sqrt weights, scale
    [K], t [K] lattice index): the grid index of the neighbour of least sum_i (w*(scale*q - x))*(scale*q - x)
    (summed in order i = 0..7), the first of equal ones in the list's order. Each element's three possible terms
    are computed once; the groups are sorted by bucket and each neighbour list is gathered from them at once
    (the uint8 level tables are widened to int64 per chunk)."""
    bucket = tab["bucket"][t]
    order = torch.argsort(bucket)
    widths = tab["widths"]
    sizes = torch.bincount(bucket, minlength=len(widths)).tolist()
    x8, w8, scale, t = x8[order], w8[order], scale[order], t[order]
    K = t.shape[0]
    q = torch.tensor([1.0, 3.0, 5.0], dtype=x8.dtype, device=x8.device)
    diff = scale[:, None, None] * q - x8[:, :, None]                    # [K, 8, 3]: every (element, level)
    terms = torch.empty(K, 8, 4, dtype=x8.dtype, device=x8.device)
    terms[:, :, :3] = (w8[:, :, None] * diff) * diff
    # C's `d2 < best` skips a NaN sum: terms are >= 0 or NaN, so a NaN term may as well be +inf (never wins)
    terms.nan_to_num_(nan=float("inf"), posinf=float("inf"))
    terms[:, :, _PAD] = float("inf")
    out = torch.empty_like(t)
    budget = _SEARCH_BUDGET.get(t.device.type, _SEARCH_BUDGET["cuda"])
    start = 0
    for b, size in enumerate(sizes):
        if not size:
            continue
        width = widths[b]
        step = max(1, budget // (8 * width))
        for a in range(start, start + size, step):
            e = min(start + size, a + step)
            rows = tab["row"][t[a:e]]
            idx = tab[f"lev{b}"].index_select(0, rows).long()
            v = torch.gather(terms[a:e], 2, idx)                        # [k, 8, width]
            d2 = seqsum(v, axis=1, zero_start=False)                    # v[:, 0] + v[:, 1] + … in order
            out[a:e] = tab[f"grid{b}"][rows, d2.argmin(1)]
        start += size
    return torch.empty_like(out).scatter_(0, order, out)


# ----------------------------------------------------------------------------------------------------------------
# the codecs
# ----------------------------------------------------------------------------------------------------------------

class _IQ2(BlockwiseCodec):
    sub: int                    # sub-block size (one 4-bit scale)
    nwant: int                  # distinct neighbour distances kept in the lists
    parity: bool                # 7 sign bits per group: an odd count of negatives keeps one sign
    eps: float                  # C's GROUP_MAX_EPS(_IQ2_S): an all-zero sub-block
    steps: range                # candidate offsets `is`
    xxs: bool = False           # candidates around make_qp_quants' scale, every group redone at the end
    sigma_mul: float = 1.0      # sigma2 = sigma_mul * mean square of the super-block
    d_mul: float = 1.0          # stored d = fp16(d * d_mul)

    # ---- one candidate scale: codes of every group -----------------------------------------------------------
    def _project(self, tab, xv, wa, iscale, scale, todo=None):
        """Grid indices [S, ng] and on-grid flags of the sub-blocks' groups rounded with iscale [S]; off-grid
        groups take their best neighbour at `scale` [S]. `todo` [S, ng]: only those groups (others: index -1)."""
        S, n = xv.shape
        ng = n // 8
        l = nearest_int((iscale[:, None] * xv - 1.0) * 0.5).clamp_(0, 2)
        t = (l.view(S * ng, 8) * tab["pow3"]).sum(1)
        g = tab["map3"][t]
        on = g >= 0
        search = ~on if todo is None else ~on & todo.reshape(-1)
        idx = search.nonzero().squeeze(1)
        if idx.numel():
            g[idx] = _best_neighbour(tab, xv.view(-1, 8)[idx], wa.view(-1, 8)[idx], scale[idx // ng], t[idx])
        if todo is not None:
            g = torch.where(todo.reshape(-1), g, -1)
        return g.view(S, ng), on.view(S, ng)

    @staticmethod
    def _sums(tab, g, w, wx):
        """C's sumqx = sum w*x*q, sumq2 = sum w*q*q (q = 2l+1 of the groups' grid points), in order."""
        q = (tab["levels"][g].reshape(w.shape) * 2 + 1).to(w.dtype)
        return seqsum(wx * q, axis=1), seqsum((w * q) * q, axis=1)

    def _subblocks(self, tab, xv, w, wa, scale0, denom):
        """The candidate search and the final refit of S active sub-blocks -> (scale [S], grid indices [S, ng])."""
        S, n = xv.shape
        ng = n // 8
        wx = w * xv
        best = torch.zeros_like(scale0)
        scale = scale0
        best_g = tab["map3"][0].expand(S, ng).clone()       # llama.cpp's L = 0 where no candidate is accepted
        best_on = torch.ones(S, ng, dtype=torch.bool, device=xv.device)
        # the candidates do not depend on each other: k of them are projected in one pass (a few hundred ops and
        # host syncs per pass instead of per candidate, which bounds small calls such as block LDLQ's on a GPU);
        # only the acceptance below is sequential, in C's order
        steps = list(self.steps)
        k = candidates_per_pass(len(steps), S * n, xv.device)
        for c in range(0, len(steps), k):
            part = steps[c:c + k]
            K = len(part)
            iscale = torch.cat([div(f32(np.float32(5) + np.float32(st) * np.float32(0.1)), denom) for st in part])
            rep = (lambda t: t.repeat(K, *([1] * (t.dim() - 1))))
            g, on = self._project(tab, rep(xv), rep(wa), iscale, div(1.0, iscale))
            sumqx, sumq2 = self._sums(tab, g, rep(w), rep(wx))
            g, on, sumqx, sumq2 = g.view(K, S, ng), on.view(K, S, ng), sumqx.view(K, S), sumq2.view(K, S)
            best, scale, (best_g, best_on) = accept_in_order(best, scale, sumqx, sumq2, [(best_g, g), (best_on, on)])
        # XXS redoes every group at the winning scale, XS/S only the off-grid ones (if any)
        redo = scale > 0 if self.xxs else (scale > 0) & ~best_on.all(1)
        r = redo.nonzero().squeeze(1)
        if r.numel():
            todo = None if self.xxs else ~best_on[r]
            g, _ = self._project(tab, xv[r], wa[r], div(1.0, scale[r]), scale[r], todo)
            g = g if todo is None else torch.where(todo, g, best_g[r])
            sumqx, sumq2 = self._sums(tab, g, w[r], wx[r])
            best_g[r] = g
            scale[r] = torch.where(sumq2 > 0, div(sumqx, sumq2), scale[r])
        return scale, best_g

    def _quantize_blocks(self, x, qw):
        B = x.shape[0]
        n, nsub = self.sub, QK_K // self.sub
        ng = n // 8
        tab = _tables(self.ggml_type, self.nwant, x.device)
        sumx2 = seqsum(x * x, axis=1)
        sigma2 = div(sumx2 * self.sigma_mul, float(QK_K))
        if qw is None:                                      # IQ2_S only
            w = f32(0.25) * sigma2[:, None] + x * x
        else:
            w = qw * sqrt(sigma2[:, None] + x * x)
        wa = sqrt(w)

        # magnitudes and sign bits per group of 8
        neg = (x < 0).view(-1, 8)
        xv = torch.where(x < 0, -x, x).view(-1, 8)
        if self.parity:
            odd = neg.sum(1) % 2 == 1
            imin = ((w * x) * x).view(-1, 8).argmin(1)
            keep = odd[:, None] & (torch.arange(8, device=x.device) == imin[:, None])
            xv = torch.where(keep, -xv, xv)
            neg = neg ^ keep
        bitw = 1 << torch.arange(8, device=x.device)
        signs = (neg.long() * bitw).sum(1).view(-1, ng)
        mask = 127 if self.parity else 255
        signs &= mask
        xv, w, wa = xv.reshape(-1, n), w.reshape(-1, n), wa.reshape(-1, n)

        mx = xv.amax(1)
        active = ~(mx < f32(self.eps))
        if self.xxs:                                        # candidates around make_qp_quants' scale
            a = active.nonzero().squeeze(1)
            scale0 = torch.zeros_like(mx)
            if a.numel():
                scale0[a] = make_qp_quants(xv[a], 4, w[a])[0]
            denom = scale0 * 3.0                            # eff_max
            active &= ~(denom <= 0)
        else:
            scale0, denom = div(mx, 5.0), mx
        a = active.nonzero().squeeze(1)
        scales = torch.zeros_like(mx)
        gidx = torch.zeros(mx.shape[0], ng, dtype=torch.long, device=x.device)
        if a.numel():
            sc, g = self._subblocks(tab, xv[a], w[a], wa[a], scale0[a], denom[a])
            flip = sc < 0                                   # "should never happen": flip scale and signs
            signs[a] = torch.where(flip[:, None], ~signs[a] & mask, signs[a])
            scales[a], gidx[a] = torch.where(flip, -sc, sc), g
        signs = torch.where(active[:, None], signs, 0)

        # 4-bit sub-block scales on d = max/31
        scales = scales.view(B, nsub)
        max_scale = scales.amax(1)
        d = div(max_scale, 31.0)
        ls = nearest_int((div(1.0, d)[:, None] * scales - 1.0) * 0.5).clamp_(0, 15)
        zero = max_scale == 0
        ls = ls.masked_fill(zero[:, None], 0)
        if self.parity:                                     # XXS/XS zero all codes of such a block, S keeps them
            gidx = gidx.view(B, -1).masked_fill(zero[:, None], 0)
            signs = signs.view(B, -1).masked_fill(zero[:, None], 0)
        if self.d_mul != 1.0:
            d = d * f32(self.d_mul)
        dh = fp16(d).cpu().numpy().view(np.uint8).reshape(B, 2)
        return self._pack(dh, gidx.reshape(B, -1).cpu().numpy(), signs.reshape(B, -1).cpu().numpy(),
                          ls.cpu().numpy().astype(np.int64))


class IQ2_XXS(_IQ2):
    name = "IQ2_XXS"
    ggml_type = gguf.GGMLQuantizationType.IQ2_XXS
    needs_imatrix = True
    sub, nwant, parity, eps, steps, xxs = 32, 2, True, 1e-15, range(-6, 7), True

    @staticmethod
    def _pack(dh, g, s, ls):
        """Per sub-block two LE uint32: the 4 grid indices (bytes); signs 7 bits each | scale << 28."""
        B = dh.shape[0]
        g, s = g.reshape(B, 8, 4), s.reshape(B, 8, 4)
        lo = g[..., 0] | g[..., 1] << 8 | g[..., 2] << 16 | g[..., 3] << 24
        hi = s[..., 0] | s[..., 1] << 7 | s[..., 2] << 14 | s[..., 3] << 21 | ls << 28
        q2 = np.stack([lo, hi], axis=-1).astype(np.uint32).reshape(B, 16)
        return np.concatenate([dh, q2.view(np.uint8)], axis=1)


class IQ2_XS(_IQ2):
    name = "IQ2_XS"
    ggml_type = gguf.GGMLQuantizationType.IQ2_XS
    needs_imatrix = True
    sub, nwant, parity, eps, steps = 16, 2, True, 1e-15, range(-9, 10)

    @staticmethod
    def _pack(dh, g, s, ls):
        """32 LE uint16: grid index | signs << 9; then the 16 4-bit scales, two per byte (low nibble first)."""
        B = dh.shape[0]
        qs = (g | s << 9).astype(np.uint16)
        sc = (ls[:, 0::2] | ls[:, 1::2] << 4).astype(np.uint8)
        return np.concatenate([dh, qs.view(np.uint8).reshape(B, 64), sc], axis=1)


class IQ2_S(_IQ2):
    name = "IQ2_S"
    ggml_type = gguf.GGMLQuantizationType.IQ2_S
    needs_imatrix = False
    sub, nwant, parity, eps, steps, sigma_mul, d_mul = 16, 1, False, 1e-8, range(-9, 10), 2.0, 0.9875

    @staticmethod
    def _pack(dh, g, s, ls):
        """qs: 32 low bytes of the grid indices, 32 sign bytes; qh: their 2 high bits, 4 per byte; 16 4-bit
        scales, two per byte."""
        qh = ((g >> 8).reshape(-1, 8, 4) << np.array([0, 2, 4, 6])).sum(-1)
        sc = ls[:, 0::2] | ls[:, 1::2] << 4
        return np.concatenate([dh, (g & 255).astype(np.uint8), s.astype(np.uint8), qh.astype(np.uint8),
                               sc.astype(np.uint8)], axis=1)
