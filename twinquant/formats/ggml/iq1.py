"""IQ1_S (1.5625 bpw) and IQ1_M (1.75 bpw): super-blocks of 256 weights coded as groups of 8 ternary values
(-1, 0, 1) taken from a 2048-point codebook (gguf-py's IQ1_S grid, 11-bit indices), each group shifted by +-DELTA
(DELTA = 0.125) and scaled by a 3-bit sub-block scale times one fp16 super-block scale:

  IQ1_S  50 bytes: d fp16 | qs[32] low index bytes | qh[8] uint16 per 32-weight sub-block:
         bits 0-11 the high index bits of its 4 groups, 12-14 the scale l, 15 the sign of DELTA;
         weight = d*(2l+1) * (grid + delta)
  IQ1_M  56 bytes: qs[32] | qh[16] one byte per 16-weight sub-block (per group: 3 high index bits + the sign of
         DELTA) | scales[4] uint16 holding 3-bit scales (4 per uint16) and, in their top nibbles, the fp16 d

llama.cpp (quantize_row_iq1_s_impl / quantize_row_iq1_m_impl), per sub-block, with weights
qw*sqrt(sigma2 + x^2) (sigma2 = 2*mean(x^2) over the super-block; IQ1_M without an imatrix: x^2):
  1. sorts the values (qsort on the value alone, so the order of ties is the libc's: glibc's qsort is a merge sort
     for such small arrays, stable, reproduced by a stable sort; checked with glibc 2.36) and takes the prefix sums
     of w*x and w in sorted order (tied values with different weights change them, and where the split falls);
  2. tries every split (i1 <= i2) of the sorted values into codes 0 / 1 / 2 with both shifts (IQ1_M: the 4 shift
     combinations of its two groups), keeping C's sequential rule `sumqx^2 > best*sumq2` (best = scale*sumqx) -
     a running record that float rounding keeps from being a plain argmax, so it is scanned candidate by candidate
     (vectorised over sub-blocks);
  3. a negative best scale flips the codes (L -> 2 - L) and the shift(s);
  4. groups whose pattern is not a grid point go to the nearest of the pattern's neighbours (the grid points at the
     3 smallest distances, precomputed by iq2xs_init_impl) by weighted error at the found scale, first minimum;
     the scale is then refitted on the whole sub-block;
  5. d = max_scale/15, l = nearest_int(0.5*(scale/d - 1)) clamped to [0, 7]; IQ1_S stores d*1.125; IQ1_M refits d
     by least squares over the whole super-block with the 3-bit scales (zeroed sub-blocks included, as grid
     point 0) and stores d*1.1125.
IQ1_S needs an imatrix (ggml_quantize_requires_imatrix, and its impl asserts quant_weights); IQ1_M does not.
Blocks are independent (sigma2 is per super-block). llama.cpp aborts (GGML_ASSERT(scale >= 0) on a NaN scale) on
blocks with values from about 1e19 up; we return bytes there that cannot be compared. Where every neighbour's
error overflows (d2 >= FLT_MAX; not reached in our tests), llama.cpp's fallback loop reads past the group (a C bug)
and then asserts; we keep the first neighbour.
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import torch

from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.ggml._num import F32, div, f32, fp16, nearest_int, scan_inputs, seqsum, sqrt
from twinquant.triton_env import runs_triton

QK_K = 256
FLT_MAX = float(np.finfo(np.float32).max)
_XP = (-0.875, 0.125, 1.125)                # -1 + DELTA, DELTA, 1 + DELTA  (all exact in float32)
_XM = (-1.125, -0.125, 0.875)
_CHUNK = {"cpu": 1 << 15, "cuda": 1 << 18}  # sub-blocks per search batch
_NB_CHUNK = 1 << 14                         # off-grid groups per neighbour-search batch
_SCAN_IN_PASSES = {"cpu": False}            # `_scan` in passes (GPUs) or row by row (CPUs)


# ---- codebook tables (iq2xs_init_impl for IQ1_S / IQ1_M), built once from gguf-py's grid ---------------------------

@functools.cache
def _tables_np():
    q = gguf.quants.IQ1_S
    q.init_grid()
    grid = (q.grid.reshape(2048, 8) + 1).astype(np.int64)              # codes l in {0, 1, 2}
    key = (grid << (2 * np.arange(8))).sum(1)                           # the 16-bit pattern u = sum l_j << 2j
    kmap = np.full(1 << 16, -1, np.int64)
    kmap[key] = np.arange(2048)
    # every ternary pattern off the grid: its neighbours sorted by (distance, grid index), all those at the 3
    # smallest distances (llama.cpp's nwant = 3); stored flat with a start and a length per 16-bit pattern
    t = np.stack(np.meshgrid(*[np.arange(3)] * 8, indexing="ij"), -1).reshape(-1, 8)
    u = (t << (2 * np.arange(8))).sum(1)
    t, u = t[kmap[u] < 0], u[kmap[u] < 0]
    d2 = ((t[:, None, :].astype(np.int8) - grid[None].astype(np.int8)) ** 2).sum(-1, dtype=np.int8)
    third = d2.min(1)
    for _ in range(2):                                                  # the third smallest distinct distance
        third = np.where(d2 > third[:, None], d2, 127).min(1)
    rows, cols = np.nonzero(d2 <= third[:, None])
    flat = cols[np.argsort(rows * 64 + d2[rows, cols], kind="stable")]  # by pattern, distance, grid index
    length = np.zeros(1 << 16, np.int64)
    length[u] = np.bincount(rows, minlength=len(u))
    start = np.zeros(1 << 16, np.int64)
    start[u] = np.cumsum(length[u]) - length[u]
    return grid, kmap, start, length, flat


@functools.cache
def _tables(device: str):
    grid, kmap, start, length, flat = (torch.from_numpy(a).to(device) for a in _tables_np())
    xx = torch.tensor(_XP + _XM, dtype=F32, device=device)              # q = xx[3*sel + l], sel 0: +DELTA, 1: -DELTA
    # per neighbour entry and position j: 3*j + l_j, its column in a group's table of 8 x 3 errors
    col = (grid[flat] + 3 * torch.arange(8, device=device)).T.int().contiguous()
    return {"grid": grid, "kmap": kmap, "start": start.int(), "len": length, "flat": flat, "col": col, "xx": xx,
            "pow": (4 ** torch.arange(8, device=device))}


# ---- the shared steps ----------------------------------------------------------------------------------------------

def _weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's weights per value: qw*sqrt(sigma2 + x^2) with sigma2 = 2*sumx2/QK_K per super-block, or x^2."""
    if qw is None:
        return x * x
    sigma2 = div(seqsum(x * x, axis=1) * 2.0, float(QK_K))
    return qw * sqrt(sigma2[:, None] + x * x)


def _sorted_prefix(x: torch.Tensor, w: torch.Tensor):
    """Stable ascending sort of each sub-block (x [S, n]; -0.0 ties with 0.0 as in C's `<`) -> (perm [S, n],
    prefix sums of w*x and w in sorted order as element-major [n+1, S] lists, C's sumx[j+1] = sumx[j] + w*x)."""
    perm = torch.sort(torch.where(x == 0, 0.0, x), dim=1, stable=True).indices
    wx = torch.gather(w * x, 1, perm).T.contiguous()
    ws = torch.gather(w, 1, perm).T.contiguous()
    return perm, wx, ws


def _codes_from_split(perm, i1, i2):
    """Codes L [S, n]: sorted positions < i1 -> 0, < i2 -> 1, else 2, put back in the original order."""
    j = torch.arange(perm.shape[1], device=perm.device)[None]
    ls = (j >= i1[:, None]).long() + (j >= i2[:, None]).long()
    return torch.empty_like(ls).scatter_(1, perm, ls)


def _scan(best, bi, x2, q2, s, base: int) -> None:
    """C's `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {best = scale*sumqx; ...}` over candidate rows in order
    (x2 = sumqx^2, NaN where sumq2 <= 0; s = (sumqx/sumq2)*sumqx; all [n, S]); updates best [S] and bi [S] (the
    accepted row ids + base) in place.

    Not row by row: with best fixed, every later row's test is evaluated at once and each sub-block jumps to its
    first accepted row, the next acceptance of the sequential scan (no row between passes the test with the best it
    saw); repeated until no sub-block accepts again. As many passes as the most acceptances of one sub-block, a
    handful of ops each, where the row loop made three per row (the searches' small calls were bound by them).
    A CPU keeps the row loop: there the passes' arithmetic costs more than the ops they save (64-row block LDLQ
    into IQ1_S / IQ1_M 1.5-2.6x slower, `benchmarks/results/iquant_ldlq_speed_cpu-torch-search-iq1.json`); the
    passes are for GPUs without Triton; with it (triton_num.scan) the row loop runs in one launch."""
    if runs_triton(x2) and best.is_contiguous() and bi.is_contiguous():     # the row loop in one launch
        from twinquant.formats.ggml.triton_num import scan

        return scan(best, bi, x2, q2, s, base)
    if not _SCAN_IN_PASSES.get(x2.device.type, True):
        return _scan_rows(best, bi, x2, q2, s, base)
    n = x2.shape[0]
    rows = torch.arange(n, device=x2.device)[:, None]
    done = torch.full_like(bi, -1)                  # the last accepted row of this call, per sub-block
    b = best.clone()
    for _ in range(n):                              # each pass moves every accepting sub-block past a row
        acc = (x2 > b * q2) & (rows > done)
        hit = acc.any(0)
        if not bool(hit.any()):
            break
        first = acc.to(torch.uint8).argmax(0)       # the first accepted row (argmax returns the first maximum)
        b = torch.where(hit, s.gather(0, first[None])[0], b)
        done = torch.where(hit, first, done)
        bi.copy_(torch.where(hit, base + first, bi))
    best.copy_(b)


def _scan_rows(best, bi, x2, q2, s, base: int) -> None:
    """_scan row by row, as C runs it."""
    b = best.clone()
    for r in range(x2.shape[0]):
        acc = x2[r] > b * q2[r]
        b = torch.where(acc, s[r], b)
        bi.masked_fill_(acc, base + r)
    best.copy_(b)


_record_prep = scan_inputs       # (x2, q2, s) of _scan from the candidates' sumqx, sumq2 [n, S]


def _snap(tab, L, x, w, scale, sel):
    """Grid indices [S, G] of the groups of 8 codes of sub-blocks L, x, w [S, n] (scale [S], sel [S, G]: the shift
    of each group) and which sub-blocks had a group off the grid [S]. A pattern on the grid is its own point; one
    off it takes iq1_find_best_neighbour2's choice: the neighbour with the least sum w*(scale*xx[l] - x)^2 (first
    minimum, counting only d2 < FLT_MAX)."""
    S, G = sel.shape
    dev = L.device
    L8 = L.reshape(-1, 8)
    u = (L8 * tab["pow"]).sum(1)
    idx = tab["kmap"][u]
    off = idx < 0
    og = off.nonzero().squeeze(1)
    for s in range(0, og.numel(), _NB_CHUNK):
        g = og[s:s + _NB_CHUNK]
        # each term w*(scale*q - x)^2 takes one of 3 values per position: a table [g, 8*3] of them, C's float ops
        q = tab["xx"].reshape(2, 3)[sel.reshape(-1)[g]]                              # [g, 3]
        diff = scale[g // G][:, None, None] * q[:, None, :] - x.reshape(-1, 8)[g][:, :, None]
        err = ((w.reshape(-1, 8)[g][:, :, None] * diff) * diff).reshape(-1)
        # the neighbour lists, flat: entry t is grid point flat[pos[t]], of group seg[t] (err rows at base[t])
        n = g.numel()
        lens = tab["len"][u[g]]
        T = int(lens.sum())
        first = torch.cumsum(lens, 0) - lens
        i32 = torch.int32                                                           # int32 indices: half the traffic
        pos = torch.arange(T, dtype=i32, device=dev) + \
            torch.repeat_interleave(tab["start"][u[g]] - first.to(i32), lens, output_size=T)
        base = torch.repeat_interleave(torch.arange(0, 24 * n, 24, dtype=i32, device=dev), lens, output_size=T)
        d2, v, at = torch.zeros(T, device=dev), torch.empty(T, device=dev), torch.empty(T, dtype=i32, device=dev)
        for j in range(8):                                                          # d2 += w*diff*diff in order
            torch.index_select(tab["col"][j], 0, pos, out=at)
            d2 += torch.index_select(err, 0, at.add_(base), out=v)
        # first minimum per group: the least (d2, t) as one int64 key, d2's bits made monotone (negative d2 from
        # negative weights reversed); NaN and d2 >= FLT_MAX never win (C: `d2 < best_score`, best = FLT_MAX first)
        bits = torch.where(d2 < FLT_MAX, d2, float("inf")).view(i32)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = (bits.long() << 32) + torch.arange(T, device=dev)
        key = torch.full((n,), (1 << 63) - 1, device=dev).scatter_reduce(0, (base // 24).long(), key, "amin")
        at = torch.where(key >> 32 < 0x7F800000, key & 0xFFFFFFFF, first)           # none below FLT_MAX: the first
        idx[g] = tab["flat"][pos[at].long()]
    return idx.reshape(S, G), off.reshape(S, G).any(1)


def _refit(tab, index, x, w, sel, scale, off):
    """The scale refitted on the snapped sub-blocks (off [S]): sumqx/sumq2 with q = xx[grid l], where both > 0."""
    q = tab["xx"][tab["grid"][index].reshape(x.shape[0], -1, 8) + 3 * sel[..., None]].reshape(x.shape)
    wq = w * q
    sqx, sq2 = seqsum(wq * x, axis=1), seqsum(wq * q, axis=1)
    return torch.where(off & (sqx > 0) & (sq2 > 0), div(sqx, sq2), scale)


def _at(p, i):
    """p[i[s], s] of an element-major list p [n, S] for each sub-block s."""
    return p.gather(0, i[None])[0]


def _step(device) -> int:
    return _CHUNK.get(device.type, _CHUNK["cuda"])


# ---- IQ1_S ---------------------------------------------------------------------------------------------------------

def _iq1s_terms(s1, s2, sn, t1, t2, tn, v):
    """C's sumqx, sumq2 of a split (i1, i2) from the prefix sums at i1, i2, n (s: of w*x, t: of w) and the shift
    values v = x_p or x_m (floats or per-sub-block tensors)."""
    sqx = (s1 * v[0] + (s2 - s1) * v[1]) + (sn - s2) * v[2]
    sq2 = ((t1 * v[0]) * v[0] + ((t2 - t1) * v[1]) * v[1]) + ((tn - t2) * v[2]) * v[2]
    return sqx, sq2


def _prefix(*cols):
    """Sequential prefix sums [n+1, S] of element-major lists [n, S], starting at 0."""
    if cols and runs_triton(cols[0]):
        from twinquant.formats.ggml.triton_num import prefix

        return [prefix(c) for c in cols]
    out = []
    for c in cols:
        p = c.new_zeros((c.shape[0] + 1, c.shape[1]))
        for j in range(c.shape[0]):
            torch.add(p[j], c[j], out=p[j + 1])
        out.append(p)
    return out


def _iq1s_sub(tab, x, w):
    """Sub-blocks x, w [S, 32] -> (grid index [S, 4], scale [S], sel [S]: 1 where the shift is -DELTA), the
    skipped sub-blocks (max < GROUP_MAX_EPS_IQ1_S, or no split accepted) with index 0, scale 0 and sel 0."""
    S, n = x.shape
    perm, wx, ws = _sorted_prefix(x, w)
    sx, sw = _prefix(wx, ws)
    best = torch.full((S,), -FLT_MAX, device=x.device)
    bi = torch.full((S,), -1, dtype=torch.long, device=x.device)
    cands = [(i1, i2, m) for i1 in range(n + 1) for i2 in range(i1, n + 1) for m in (0, 1)]   # C's order
    if runs_triton(x):                          # the whole loop in one launch (triton_num.iq1s_search)
        from twinquant.formats.ggml.triton_num import iq1s_search

        iq1s_search(sx, sw, best, bi)
    else:
        base = 0
        for i1 in range(n + 1):                 # one i1's candidates: (i2, x_p), (i2, x_m), i2 = i1..n
            sqx, sq2 = (torch.stack(t, 1).reshape(-1, S) for t in
                        zip(*[_iq1s_terms(sx[i1], sx[i1:], sx[n], sw[i1], sw[i1:], sw[n], v) for v in (_XP, _XM)]))
            _scan(best, bi, *_record_prep(sqx, sq2), base)
            base += sqx.shape[0]
    found = (bi >= 0) & (x.abs().amax(1) >= f32(1e-12))
    i1, i2, sel = torch.tensor(cands, device=x.device)[bi.clamp(min=0)].T
    # the winner's scale, recomputed with the same float operations
    v = tab["xx"].reshape(2, 3)[sel].T
    sqx, sq2 = _iq1s_terms(_at(sx, i1), _at(sx, i2), sx[n], _at(sw, i1), _at(sw, i2), sw[n], v)
    scale = div(sqx, sq2)
    L = _codes_from_split(perm, i1, i2)
    neg = scale < 0                             # mirrored codes and shift
    L = torch.where(neg[:, None], 2 - L, L)
    scale, sel = torch.where(neg, -scale, scale), torch.where(neg, 1 - sel, sel)
    gsel = sel[:, None].expand(S, n // 8)
    index, off = _snap(tab, L, x, w, scale, gsel)
    scale = _refit(tab, index, x, w, gsel, scale, off)
    return (torch.where(found[:, None], index, 0), torch.where(found, scale, 0.0),
            torch.where(found, sel, 0))


# ---- IQ1_M ---------------------------------------------------------------------------------------------------------

# the 4 shift combinations k of a sub-block's two groups: group 0 takes x_m for k >= 2, group 1 for odd k
_K_SEL = ((0, 0), (0, 1), (1, 0), (1, 1))
# C's constants: v[2] of x_p / x_m and c1 = v0^2 - v1^2, c2 = v1^2 - v2^2 (its 3-group sums collapse to
# sumqx = T*v2 - px[i1] - px[i2], sumq2 = W*v2^2 + pw[i1]*c1 + pw[i2]*c2, per half)
_V2 = (_XP[2], _XM[2])
_C1 = tuple(f32(np.float32(v[0]) * np.float32(v[0]) - np.float32(v[1]) * np.float32(v[1])) for v in (_XP, _XM))
_C2 = tuple(f32(np.float32(v[1]) * np.float32(v[1]) - np.float32(v[2]) * np.float32(v[2])) for v in (_XP, _XM))


def _half_terms(px, pw, tx, tw, m):
    """One half's (qx, q2) with shift m (0: x_p, 1: x_m; an int or a tensor) at splits (i1, i2), from the pairs
    px, pw of its prefix sums at i1 and at i2 and its totals tx, tw."""
    v2, c1, c2 = (torch.tensor(t, device=tx.device)[m] if isinstance(m, torch.Tensor) else t[m]
                  for t in (_V2, _C1, _C2))
    qx = tx * v2 - (px[0] + px[1])
    q2 = ((tw * v2) * v2 + pw[0] * c1) + pw[1] * c2
    return qx, q2


def _iq1m_sub(tab, x, w):
    """Sub-blocks x, w [S, 16] -> (grid index [S, 2], scale [S], k [S]: the shift combination), the skipped
    sub-blocks (max < GROUP_MAX_EPS_IQ1_M, or no split accepted) with index 0, scale 0 and k 0."""
    S, n = x.shape
    perm, wx, ws = _sorted_prefix(x, w)
    # prefix sums per half of the sub-block, in sorted order: the other half's sum is carried over (not + 0)
    upper = (perm >= n // 2).T
    best = torch.full((S,), -FLT_MAX, device=x.device)
    bi = torch.full((S,), -1, dtype=torch.long, device=x.device)
    cands = [(i1, i2, k) for i1 in range(n + 1) for i2 in range(i1, n + 1) for k in range(4)]   # C's order
    triton = runs_triton(x)                     # prefix sums and the whole loop in a few launches (same bits)
    if triton:
        # a half's sum starts at +0.0 and so never is -0.0: adding the other half's +0.0 leaves it as it is
        px0, pw0, px1, pw1 = _prefix(*[torch.where(u, c, 0.0) for u in (~upper, upper) for c in (wx, ws)])
        px, pw = [px0, px1], [pw0, pw1]
    else:
        px, pw = [x.new_zeros(n + 1, S) for _ in range(2)], [x.new_zeros(n + 1, S) for _ in range(2)]
        for j in range(n):
            for h in range(2):
                mine = upper[j] if h else ~upper[j]
                px[h][j + 1] = torch.where(mine, px[h][j] + wx[j], px[h][j])
                pw[h][j + 1] = torch.where(mine, pw[h][j] + ws[j], pw[h][j])
    tx, tw = [p[n] for p in px], [p[n] for p in pw]
    if triton:
        from twinquant.formats.ggml.triton_num import iq1m_search

        iq1m_search(px, pw, best, bi, _V2, _C1, _C2)
    else:
        base = 0
        for i1 in range(n + 1):                 # candidates of one i1: (i2, k) for i2 = i1..n, k = 0..3
            t = [[_half_terms((px[h][i1], px[h][i1:]), (pw[h][i1], pw[h][i1:]), tx[h], tw[h], m)
                  for m in (0, 1)] for h in range(2)]
            sqx = torch.stack([t[0][a][0] + t[1][b][0] for a, b in _K_SEL], 1).reshape(-1, S)
            sq2 = torch.stack([t[0][a][1] + t[1][b][1] for a, b in _K_SEL], 1).reshape(-1, S)
            _scan(best, bi, *_record_prep(sqx, sq2), base)
            base += sqx.shape[0]
    found = (bi >= 0) & (x.abs().amax(1) >= f32(1e-7))
    i1, i2, k = torch.tensor(cands, device=x.device)[bi.clamp(min=0)].T
    ksel = torch.tensor(_K_SEL, device=x.device)
    t = [_half_terms((_at(px[h], i1), _at(px[h], i2)), (_at(pw[h], i1), _at(pw[h], i2)), tx[h], tw[h], ksel[k, h])
         for h in range(2)]
    scale = div(t[0][0] + t[1][0], t[0][1] + t[1][1])
    L = _codes_from_split(perm, i1, i2)
    neg = scale < 0                             # mirrored codes: k -> 3 - k swaps x_p and x_m in both halves
    L = torch.where(neg[:, None], 2 - L, L)
    scale, k = torch.where(neg, -scale, scale), torch.where(neg, 3 - k, k)
    gsel = ksel[k]
    index, off = _snap(tab, L, x, w, scale, gsel)
    scale = _refit(tab, index, x, w, gsel, scale, off)
    return (torch.where(found[:, None], index, 0), torch.where(found, scale, 0.0),
            torch.where(found, k, 0))


def _sub_scales(scale, max_scale):
    """d = max_scale/15 and the 3-bit scales l = clamp(nearest_int(0.5*(scale/d - 1)), 0, 7) ([N, k], [N])."""
    d = div(max_scale, 15.0)
    iscale = div(1.0, d)
    l = nearest_int((iscale[:, None] * scale - 1.0) * 0.5).clamp_(0, 7)
    return d, l


class IQ1_S(BlockwiseCodec):
    name, ggml_type = "IQ1_S", gguf.GGMLQuantizationType.IQ1_S
    needs_imatrix = True

    def _quantize_blocks(self, x, qw):
        B = x.shape[0]
        tab = _tables(str(x.device))
        w = _weights(x, qw)
        xs, ws = x.reshape(-1, 32), w.reshape(-1, 32)
        step = _step(x.device)
        parts = [_iq1s_sub(tab, xs[s:s + step], ws[s:s + step]) for s in range(0, xs.shape[0], step)]
        index, scale, sel = (torch.cat(p).reshape(B, 8, *p[0].shape[1:]) for p in zip(*parts))
        max_scale = scale.amax(1)
        d, l = _sub_scales(scale, max_scale)
        have = max_scale > 0                     # C: `if (!max_scale) continue;` leaves d = 0 and no scale bits
        qh = (index >> 8) << torch.tensor([0, 3, 6, 9], device=x.device)
        qh = qh.sum(2) + torch.where(have[:, None], (l | (sel << 3)) << 12, 0)
        dh = fp16(torch.where(have, d * f32(1.125), 0.0))
        out = np.empty((B, self.type_size), np.uint8)
        out[:, :2] = dh.cpu().numpy().view(np.uint8).reshape(B, 2)
        out[:, 2:34] = (index & 255).reshape(B, 32).cpu().numpy()
        out[:, 34:] = qh.to(torch.int32).cpu().numpy().astype("<u2").view(np.uint8).reshape(B, 16)
        return out


class IQ1_M(BlockwiseCodec):
    name, ggml_type = "IQ1_M", gguf.GGMLQuantizationType.IQ1_M
    needs_imatrix = False

    def _quantize_blocks(self, x, qw):
        B = x.shape[0]
        dev = x.device
        tab = _tables(str(dev))
        w = _weights(x, qw)
        xs, ws = x.reshape(-1, 16), w.reshape(-1, 16)
        step = _step(dev)
        parts = [_iq1m_sub(tab, xs[s:s + step], ws[s:s + step]) for s in range(0, xs.shape[0], step)]
        index, scale, k = (torch.cat(p).reshape(B, 16, *p[0].shape[1:]) for p in zip(*parts))
        max_scale = scale.amax(1)
        d, l = _sub_scales(scale, max_scale)
        have = max_scale > 0                     # C: `if (!max_scale) continue;` leaves the scales and masks 0
        # d refitted over the whole super-block with the 3-bit scales, skipped sub-blocks as grid point 0 with x_p
        gsel = torch.tensor(_K_SEL, device=dev)[k]                                  # [B, 16, 2]
        q = tab["xx"][tab["grid"][index] + 3 * gsel[..., None]]                     # [B, 16, 2, 8]
        q = (q * (2 * l + 1).to(F32)[..., None, None]).reshape(B, QK_K)
        wq = w * q
        sqx, sq2 = seqsum(wq * x, axis=1), seqsum(wq * q, axis=1)
        d = torch.where(sq2 > 0, div(sqx, sq2), d)
        d = d * f32(1.1125)
        # a NaN d (inf/inf from huge values: llama.cpp stores it) is x86's default NaN, fp16 0xFE00; CUDA's NaN differs
        dbits = torch.where(d.isnan(), 0xFE00, fp16(d).view(torch.int16).int() & 0xFFFF)
        masks = torch.tensor([0x00, 0x80, 0x08, 0x88], device=dev)[k]
        qh = (index[..., 0] >> 8) | ((index[..., 1] >> 8) << 4) | torch.where(have[:, None], masks, 0)
        sc = (l.reshape(B, 4, 4) << torch.tensor([0, 3, 6, 9], device=dev)).sum(2)
        sc = sc | ((dbits[:, None] >> torch.tensor([0, 4, 8, 12], device=dev)) & 0xF) << 12
        sc = torch.where(have[:, None], sc, 0)
        out = np.empty((B, self.type_size), np.uint8)
        out[:, :32] = (index & 255).reshape(B, 32).cpu().numpy()
        out[:, 32:48] = qh.cpu().numpy()
        out[:, 48:] = sc.to(torch.int32).cpu().numpy().astype("<u2").view(np.uint8).reshape(B, 8)
        return out
