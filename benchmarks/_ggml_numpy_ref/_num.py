"""Float32 numerics of llama.cpp's quantizers, vectorised over many sub-blocks at once (numpy).

Bit-exactness rules followed throughout (ggml-base is plain C without -ffast-math or FMA contraction):
- every value is float32 and every operation is one IEEE float32 operation in llama.cpp's order, e.g. `w*x*l` is
  `(w*x)*l`; constants are float32 (numpy 2 keeps float32 arrays float32 with Python scalars, and scalars here are
  `np.float32`);
- C `for` loop sums are left-to-right (`seqsum`; np.sum is pairwise, hence never used);
- `nearest_int` is ggml's magic-number rounding, emulated bit for bit (round-half-even, garbage beyond 2^22 just as
  in C);
- integer stores into uint8/int8 wrap modulo 256 like the C assignments;
- sequential searches keep C's order of updates (candidate scales tried in order, coordinate descent element by
  element); only candidates that do not depend on each other are evaluated together.

The public functions take x as [B, n] (B independent sub-blocks of n values) and return codes as [B, n]; inside,
arrays are element-major [n, B] so that every step of a sequential loop is one contiguous vector operation.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
_MAGIC = F32(12582912.0)
GROUP_MAX_EPS = F32(1e-15)
CHUNK = 16384                       # sub-blocks per vectorised batch (bounds the candidate arrays' memory)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (int32 result)."""
    t = np.asarray(np.asarray(v, dtype=F32) + _MAGIC, dtype=F32)
    return (t.view(np.int32) & 0x7FFFFF) - 0x400000


def roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32."""
    t = np.trunc(v)
    return t + np.where(np.abs(v - t) >= F32(0.5), np.sign(v), F32(0)).astype(F32)


def fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (numpy's conversion), as float16."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def seqsum(a: np.ndarray, axis: int = -1, zero_start: bool = True) -> np.ndarray:
    """Left-to-right float32 sum along `axis`; `zero_start` adds to 0.0f first (`float s = 0; s += a[0]`),
    otherwise the sum starts as a[0] (`float s = a[0]`), which only differs for a[0] = -0.0."""
    a = np.moveaxis(np.asarray(a, dtype=F32), axis, 0)
    s = a[0] + F32(0) if zero_start else a[0].copy()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def first_absmax(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """(amax, max): the first element of largest |x|, as C's `if (ax > amax) {amax = ax; max = x[i];}`."""
    ax = np.abs(x)
    i = np.expand_dims(np.argmax(ax, axis=axis), axis)
    return (np.take_along_axis(ax, i, axis).squeeze(axis), np.take_along_axis(x, i, axis).squeeze(axis))


def _T(a):
    return None if a is None else np.ascontiguousarray(np.asarray(a, dtype=F32).T)


def _chunked(fn, n_out: int, x, w, **kw):
    """fn on element-major slices of at most CHUNK sub-blocks; outputs [B] or [B, n] (codes transposed back)."""
    B = x.shape[0]
    outs = [fn(_T(x[s:s + CHUNK]), _T(None if w is None else w[s:s + CHUNK]), **kw) for s in range(0, B, CHUNK)]
    res = []
    for k in range(n_out):
        parts = [o[k] for o in outs]
        res.append(np.concatenate([p.T if p.ndim == 2 else p for p in parts]) if parts else np.zeros(0))
    return tuple(res)


# ----------------------------------------------------------------------------------------------------------------
# make_qx_quants (rmse_type 1): symmetric codes in [-nmax, nmax-1], weights qw or x^2, 18 refinement candidates
# ----------------------------------------------------------------------------------------------------------------

_QX_STEPS = [s for s in range(-9, 10) if s != 0]


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None):
    """-> (scale [B], L int32 [B, n] in [0, 2*nmax), iscale [B]: the multiplier L was rounded with, 0 if all zero)."""
    return _chunked(_make_qx_quants, 3, x, qw, nmax=nmax)


def _make_qx_quants(x, qw, nmax):                       # x, qw: [n, B]
    with np.errstate(all="ignore"):
        amax, mx = first_absmax(x, 0)
        zero = amax < GROUP_MAX_EPS
        w = x * x if qw is None else qw
        wx = w * x
        nm = F32(nmax)
        # the 19 candidate multipliers depend only on max: evaluate them together, select in C's order
        consts = np.array([F32(-nmax)] + [-(nm + F32(0.1) * F32(s)) for s in _QX_STEPS], dtype=F32)
        iscales = consts[:, None] / mx[None, :]                                     # [19, B]
        l = np.clip(nearest_int(iscales[:, None, :] * x[None]), -nmax, nmax - 1)    # [19, n, B]
        lf = l.astype(F32)
        sumlx = seqsum(wx[None] * lf, axis=1)
        suml2 = seqsum((w[None] * lf) * lf, axis=1)
        scale = np.where(suml2[0] != 0, sumlx[0] / suml2[0], F32(0)).astype(F32)
        best = scale * sumlx[0]
        pick = np.zeros(x.shape[1], dtype=np.int64)
        for k in range(1, len(consts)):
            upd = (suml2[k] > 0) & (sumlx[k] * sumlx[k] > best * suml2[k])
            s_new = sumlx[k] / suml2[k]
            scale = np.where(upd, s_new, scale)
            best = np.where(upd, s_new * sumlx[k], best)
            pick = np.where(upd, k, pick)
        L = np.take_along_axis(l, pick[None, None, :], 0)[0] + nmax
        iscale = np.take_along_axis(iscales, pick[None, :], 0)[0]
        L[:, zero] = 0
        scale = np.where(zero, F32(0), scale).astype(F32)
        iscale = np.where(zero, F32(0), iscale).astype(F32)
    return scale, L.astype(np.int32), iscale


# ----------------------------------------------------------------------------------------------------------------
# make_q3_quants (do_rmse): Q3_K reference sub-block search with coordinate descent, weights x^2
# ----------------------------------------------------------------------------------------------------------------

def make_q3_quants(x: np.ndarray, nmax: int):
    """-> (scale [B], L int32 [B, n] in [0, 2*nmax))."""
    return _chunked(_make_q3_quants, 2, x, None, nmax=nmax)


def _make_q3_quants(x, _, nmax):                        # x: [n, B]
    with np.errstate(all="ignore"):
        amax, mx = first_absmax(x, 0)
        zero = amax < GROUP_MAX_EPS
        iscale = F32(-nmax) / mx
        L = np.clip(nearest_int(iscale[None, :] * x), -nmax, nmax - 1)
        w = x * x
        wx = w * x
        Lf = L.astype(F32)
        sumlx = seqsum(wx * Lf, axis=0)
        suml2 = seqsum((w * Lf) * Lf, axis=0)
        # C breaks out when a pass changes nothing; a further pass would change nothing either (same state)
        for _ in range(5):
            for i in range(x.shape[0]):
                Li = L[i].astype(F32)
                wi, wxi = w[i], wx[i]
                slx = sumlx - wxi * Li
                sl2 = suml2 - (wi * Li) * Li
                new = np.clip(nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx2 = slx + wxi * nf
                sl22 = sl2 + (wi * nf) * nf
                upd = (slx > 0) & (new != L[i]) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                L[i] = np.where(upd, new, L[i])
                sumlx = np.where(upd, slx2, sumlx)
                suml2 = np.where(upd, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
        L = L + nmax
        L[:, zero] = 0
        scale[zero] = 0
    return scale, L.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: asymmetric codes in [0, nmax] with a min, weighted candidate search
# ----------------------------------------------------------------------------------------------------------------

def make_qkx_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, rounding: bool = False):
    """-> (scale [B], the_min [B] (>= 0, subtracted), L int32 [B, n]).  qkx2 and qkx3 are the same computation
    once the weights are given (their degenerate tests `max == min` / `max <= min` agree as min <= max).

    With `rounding`, also (iscale [B], origin [B]): the multiplier and the min of the candidate llama.cpp kept,
    from which its codes were rounded (Q4_1/Q5_1 re-round with them)."""
    out = _chunked(_make_qkx_quants, 5, x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad)
    return out if rounding else out[:3]


def _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):     # x, w: [n, B]
    with np.errstate(all="ignore"):
        mn = np.take_along_axis(x, np.argmin(x, 0)[None, :], 0)[0]    # first minimum, like C's `if (x < min)`
        mx = np.take_along_axis(x, np.argmax(x, 0)[None, :], 0)[0]
        sum_w = seqsum(w, axis=0, zero_start=False)
        sum_x = seqsum(w * x, axis=0, zero_start=False)
        mn = np.where(mn > 0, F32(0), mn).astype(F32)
        degenerate = mx == mn

        def err(scale, minv, lf):
            diff = (scale[None, :] * lf + minv[None, :]) - x
            diff = np.abs(diff) if use_mad else diff * diff
            return seqsum(w * diff, axis=0)

        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[None, :] * (x - mn[None, :])), 0, nmax)
        best = err(scale, mn, L.astype(F32))

        # sequential over the candidates: an accepted one moves `min`, which the next ones are computed from
        minv, origin = mn, mn
        for c in range(nstep + 1):
            isc = ((F32(rmin) + F32(rdelta) * F32(c)) + F32(nmax)) / (mx - minv)
            la = np.clip(nearest_int(isc[None, :] * (x - minv[None, :])), 0, nmax)
            lf = la.astype(F32)
            wl = w * lf
            sum_l = seqsum(wl, axis=0)
            sum_l2 = seqsum(wl * lf, axis=0)
            sum_xl = seqsum(wl * x, axis=0)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min = np.where(pos, F32(0), this_min).astype(F32)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale).astype(F32)
            cur = err(this_scale, this_min, lf)
            upd = (D > 0) & (cur < best)
            best = np.where(upd, cur, best)
            scale = np.where(upd, this_scale, scale)
            iscale = np.where(upd, isc, iscale)
            origin = np.where(upd, minv, origin)
            minv = np.where(upd, this_min, minv)
            L = np.where(upd[None, :], la, L)
        L[:, degenerate] = 0
        scale = np.where(degenerate, F32(0), scale).astype(F32)
        the_min = (-np.where(degenerate, mn, minv)).astype(F32)
        iscale = np.where(degenerate, F32(0), iscale).astype(F32)
        origin = np.where(degenerate, mn, origin).astype(F32)
    return scale, the_min, L.astype(np.int32), iscale, origin


# ----------------------------------------------------------------------------------------------------------------
# make_qp_quants: positive values (sub-block scales / mins) onto [0, nmax], weighted, with coordinate descent
# ----------------------------------------------------------------------------------------------------------------

_QP_STEPS = [s for s in range(-4, 5) if s != 0]


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray):
    """-> (scale [B], L int32 [B, n] as stored in C's uint8 array: wraps modulo 256)."""
    return _chunked(_make_qp_quants, 2, x, qw, nmax=nmax)


def _make_qp_quants(x, qw, nmax):                       # x, qw: [n, B]
    with np.errstate(all="ignore"):
        mx = np.maximum(x.max(0), F32(0))
        zero = mx < GROUP_MAX_EPS
        iscale = F32(nmax) / mx
        L0 = nearest_int(iscale[None, :] * x) & 0xFF
        scale = F32(1) / iscale
        diff = x - scale[None, :] * L0.astype(F32)
        best = seqsum((qw * diff) * diff, axis=0)
        for s in _QP_STEPS:
            isc = (F32(0.1) * F32(s) + F32(nmax)) / mx
            sc = F32(1) / isc
            l = np.minimum(nearest_int(isc[None, :] * x), nmax).astype(F32)
            diff = x - sc[None, :] * l
            mse = seqsum((qw * diff) * diff, axis=0)
            upd = mse < best
            best = np.where(upd, mse, best)
            iscale = np.where(upd, isc, iscale).astype(F32)
        l = np.minimum(nearest_int(iscale[None, :] * x), nmax)
        wx = qw * x
        lf = l.astype(F32)
        sumlx = seqsum(wx * lf, axis=0)
        suml2 = seqsum((qw * lf) * lf, axis=0)
        L = l & 0xFF
        for _ in range(5):
            for i in range(x.shape[0]):
                Li = L[i].astype(F32)
                wi, wxi = qw[i], wx[i]
                slx = sumlx - wxi * Li
                sl2 = suml2 - (wi * Li) * Li
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(nearest_int((x[i] * sl2) / slx), nmax)
                nf = new.astype(F32)
                slx2 = slx + wxi * nf
                sl22 = sl2 + (wi * nf) * nf
                upd = ok & (new != L[i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                L[i] = np.where(upd, new & 0xFF, L[i])
                sumlx = np.where(upd, slx2, sumlx)
                suml2 = np.where(upd, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
        L[:, zero] = 0
        scale[zero] = 0
    return scale, L.astype(np.int32)
