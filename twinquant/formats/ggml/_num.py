"""Float32 numerics of llama.cpp's quantizers in torch, vectorised over many sub-blocks at once, on the tensors'
device (CPU or CUDA) with the same bits on both.

Bit-exactness rules followed throughout (ggml-base is plain C without -ffast-math or FMA contraction):
- every value is float32 and every operation is one IEEE float32 operation in llama.cpp's order, e.g. `w*x*l` is
  `(w*x)*l`; scalar constants are computed in numpy float32 (`f32`) as C computes them, then used as Python floats
  (exact); no fused ops (addcmul, addmm, lerp …) that could contract a multiply and an add;
- square roots go through `sqrt` (correctly rounded; torch's CPU sqrt is not), divisions through `div` (CUDA
  turns `tensor / python_scalar` into a multiplication by the reciprocal, and `scalar / tensor` is
  `reciprocal(tensor) * scalar` on every device, neither of which is C's division);
- C `for` loop sums are left-to-right (`seqsum`; torch.sum and torch.cumsum reorder or widen, hence never used);
- `nearest_int` is ggml's magic-number rounding, emulated bit for bit through an int32 view (round-half-even,
  garbage beyond 2^22 just as in C);
- integer stores into uint8/int8 wrap modulo 256 like the C assignments;
- sequential searches keep C's order of updates (candidate scales tried in order, coordinate descent element by
  element); only candidates that do not depend on each other are evaluated together.

The public functions take x as [B, n] (B independent sub-blocks of n values) and return codes as int32 [B, n];
inside, tensors are element-major [n, B] so that every step of a sequential loop is one contiguous vector op, and
the candidate loops work in place in a few [n, B] buffers (on the CPU, fresh large tensors cost page faults).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from twinquant.triton_env import runs_triton

F32 = torch.float32
_MAGIC = 12582912.0                 # 1.5 * 2^23
GROUP_MAX_EPS = 1e-15               # compared with float32 values: C's `x < GROUP_MAX_EPS` is a float comparison
_CHUNK = {"cpu": 1 << 15, "cuda": 1 << 22}      # sub-blocks per batch: bounds the buffers (CUDA: a few GB)


# values (candidate scales x sub-blocks x weights) that one pass of a scale search evaluates together: candidates
# are independent (only accepting them is sequential), and a pass costs a fixed number of ops and host syncs
# whatever its size, so small calls (block LDLQ's 64-row groups in `measure` on a GPU) take all in one pass
CANDIDATE_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 24}


def candidates_per_pass(n_candidates: int, values_each: int, device: torch.device) -> int:
    budget = CANDIDATE_BUDGET.get(device.type, CANDIDATE_BUDGET["cuda"])
    return max(1, min(n_candidates, budget // max(1, values_each)))


def scan_inputs(sqx, sq2):
    """(x2, q2, s) of an acceptance scan (iq1._scan, triton_num.scan) from candidates' sumqx, sumq2: C's test
    `sumq2 > 0 && sumqx*sumqx > best*sumq2` as `x2 > best*q2` with x2 NaN where sumq2 <= 0, and the new best
    s = (sumqx/sumq2)*sumqx."""
    return torch.where(sq2 > 0, sqx * sqx, float("nan")), sq2, div(sqx, sq2) * sqx


def accept_in_order(best, scale, sumqx, sumq2, picks):
    """C's `if (sumq2 > 0 && sumqx*sumqx > best*sumq2) {scale = sumqx/sumq2; best = scale*sumqx; keep its codes}`
    over K candidates evaluated together (sumqx, sumq2 [K, S]), in order. `picks`: (kept [S, m], candidates'
    [K, S, m]) pairs that follow the accepted candidate. -> (best, scale, the kept tensors)."""
    if sumqx.shape[0] > 1 and runs_triton(sumqx):     # the sequence in one launch: which candidate was accepted last
        from twinquant.formats.ggml.triton_num import scan

        b = best.to(F32).contiguous().clone()
        last = torch.full(b.shape, -1, dtype=torch.long, device=b.device)
        scan(b, last, *scan_inputs(sumqx, sumq2), 0)
        hit = last >= 0
        at = last.clamp(min=0)[None]
        scale = torch.where(hit, div(sumqx.gather(0, at)[0], sumq2.gather(0, at)[0]), scale)
        cols = torch.arange(b.shape[0], device=b.device)
        return b, scale, [torch.where(hit[:, None], c[at[0], cols], k) for k, c in picks]
    kept = [k for k, _ in picks]
    for i in range(sumqx.shape[0]):
        upd = (sumq2[i] > 0) & (sumqx[i] * sumqx[i] > best * sumq2[i])
        new = div(sumqx[i], sumq2[i])
        scale = torch.where(upd, new, scale)
        best = torch.where(upd, new * sumqx[i], best)
        kept = [torch.where(upd[:, None], c[i], k) for k, (_, c) in zip(kept, picks)]
    return best, scale, kept


_STATIC = False       # inside static_shapes(): no host synchronisation and no data-dependent shapes


@contextmanager
def static_shapes():
    """Within this block the fits make no host synchronisation and keep every tensor's shape (`_descend` runs all
    its passes on every sub-block, fits keep their fallback codes): what a CUDA graph capture needs. The results
    are the same bits."""
    global _STATIC
    outer, _STATIC = _STATIC, True
    try:
        yield
    finally:
        _STATIC = outer


def static() -> bool:
    return _STATIC


def f32(v) -> float:
    """A C float constant expression evaluated in float32 (e.g. `0.1f*is + nmax`), as an exact Python float."""
    return float(np.float32(v))


def div(a, b) -> torch.Tensor:
    """a / b as one IEEE float32 division, a or b possibly a Python scalar."""
    if not isinstance(a, torch.Tensor):
        a = torch.full((), a, dtype=F32, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.full((), b, dtype=F32, device=a.device)
    return torch.div(a, b)


def sqrt(v: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded. torch's CPU sqrt is not (torch 2.13 with AVX2: about a fifth of float32 and of
    float64 results are one ulp off), so the float64 estimate rounded to float32 is corrected exactly: s is the
    rounded root of v > 0 iff v lies between the squares of its neighbouring midpoints, which float64 holds
    exactly (a midpoint has 25 bits, its square 50)."""
    v64 = v.double()
    s = torch.sqrt(v64).float()
    up, dn = torch.nextafter(s, torch.full_like(s, float("inf"))), torch.nextafter(s, torch.zeros_like(s))
    ok = (v > 0) & torch.isfinite(s)
    hi = (s.double() + up.double()) * 0.5
    lo = (dn.double() + s.double()) * 0.5
    s = torch.where(ok & (hi * hi <= v64), up, s)
    return torch.where(ok & (lo * lo > v64), dn, s)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: add 1.5*2^23 in float32 and read the mantissa (int32 result)."""
    return nearest_int_(v.clone())


def nearest_int_(v: torch.Tensor) -> torch.Tensor:
    """nearest_int in place: v (a float32 temporary) becomes the int32 view of its storage holding the result.
    A NaN (from inf*0 or inf-inf, e.g. on an overflowed fp16 scale) is the CPUs' default NaN in C, whose mantissa
    0x400000 reads as 0; CUDA's NaN is 0x7FFFFFFF, so there it is made to read as 0 too."""
    v.add_(_MAGIC)
    if v.device.type != "cpu":
        v.nan_to_num_(nan=_MAGIC, posinf=float("inf"), neginf=float("-inf"))
    return v.view(torch.int32).bitwise_and_(0x7FFFFF).sub_(0x400000)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf (half away from zero), exact in float32."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), 0.0)


def c_int8(v: torch.Tensor) -> torch.Tensor:
    """C's `(int8_t) v` as x86 compiles it (cvttss2si, then the low byte), as int32 in [-128, 127]: truncation
    toward zero, with NaN and values beyond the int32 range giving INT_MIN, whose low byte is 0 (torch's own
    conversion is undefined there, and the CPU and CUDA differ)."""
    i = torch.where(v.abs() < 2147483648.0, v, 0.0).to(torch.int32)
    return ((i + 128) & 0xFF) - 128


def fp16(v: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even, as float16."""
    return v.to(torch.float16)


def _lead(a: torch.Tensor, axis: int) -> torch.Tensor:
    """a with `axis` first and contiguous, so that a[i] is one contiguous slice."""
    return a if axis == 0 else a.movedim(axis, 0).contiguous()


def seqsum(a: torch.Tensor, axis: int = -1, zero_start: bool = True) -> torch.Tensor:
    """Left-to-right float32 sum along `axis`; `zero_start` adds to 0.0f first (`float s = 0; s += a[0]`),
    otherwise the sum starts as a[0] (`float s = a[0]`), which only differs for a[0] = -0.0."""
    a = _lead(a, axis)
    if a.dtype == F32 and a.shape[0] > 1 and runs_triton(a):     # one launch instead of one add per element
        from twinquant.formats.ggml.triton_num import seqsum_lead

        return seqsum_lead(a.contiguous(), zero_start)
    s = a[0] + 0.0 if zero_start else a[0].clone()
    for i in range(1, a.shape[0]):
        s += a[i]
    return s


def first_absmax(x: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): C's `float amax = 0, max = 0; if (ax > amax) {amax = ax; max = x[i];}` along `axis`."""
    x = _lead(x, axis)
    amax, mx = x.new_zeros(x.shape[1:]), x.new_zeros(x.shape[1:])
    for i in range(x.shape[0]):
        ax = x[i].abs()
        upd = ax > amax
        amax, mx = torch.where(upd, ax, amax), torch.where(upd, x[i], mx)
    return amax, mx


def first_extreme(x: torch.Tensor, largest: bool, axis: int = -1) -> torch.Tensor:
    """C's `float m = x[0]; if (x[i] > m) m = x[i];` (largest) or `if (x[i] < m) m = x[i];` along `axis`."""
    x = _lead(x, axis)
    m = x[0].clone()
    for i in range(1, x.shape[0]):
        m = torch.where(x[i] > m if largest else x[i] < m, x[i], m)
    return m


def _chunked(fn, n_out: int, x: torch.Tensor, w: torch.Tensor | None, **kw):
    """fn on element-major slices of at most _CHUNK sub-blocks; outputs [B] or [B, n] (codes transposed back)."""
    B = x.shape[0]
    step = _CHUNK.get(x.device.type, _CHUNK["cuda"])
    outs = []
    for s in range(0, B, step):
        xs = x[s:s + step].T.contiguous()
        ws = None if w is None else w[s:s + step].T.contiguous()
        outs.append([o.T if o.dim() == 2 else o for o in fn(xs, ws, **kw)])
    if len(outs) == 1:
        return tuple(o.contiguous() for o in outs[0])
    return tuple(torch.cat([o[k] for o in outs]) for k in range(n_out))


def _where_zero(zero: torch.Tensor, *ts: torch.Tensor):
    """Each tensor with the all-zero sub-blocks (zero [B]) set to 0 (codes [n, B] or values [B])."""
    return tuple(t.masked_fill(zero, 0) for t in ts)


def _descend(state: dict, step, passes: int = 5) -> dict:
    """C's `for (itry = 0; itry < passes; ++itry) { one pass; if (!n_changed) break; }` over many sub-blocks:
    `step(state)` runs one pass in place on tensors whose last axis runs over sub-blocks and returns which changed.
    A sub-block whose pass changed nothing is at a fixed point (the next pass sees the same state), so it drops
    out; the others are written back and continue."""
    if _STATIC:           # a sub-block at its fixed point stays there: more passes give the same bits
        for _ in range(passes):
            step(state)
        return state
    out = state
    idx = None
    for _ in range(passes):
        changed = step(state)
        if idx is not None:
            for k in ("L", "sumlx", "suml2"):
                out[k][..., idx] = state[k]
        if not bool(changed.any()):
            break
        keep = changed.nonzero().squeeze(1)
        idx = keep if idx is None else idx[keep]
        state = {k: v[..., keep] for k, v in state.items()}
    return out


def _sums(w: torch.Tensor, wx: torch.Tensor, lf: torch.Tensor, buf: torch.Tensor):
    """(sumlx, suml2) = C's `sumlx += w*x*l; suml2 += w*l*l` with wx = w*x, buf a scratch [n, B]."""
    sumlx = seqsum(torch.mul(wx, lf, out=buf), axis=0)
    suml2 = seqsum(torch.mul(w, lf, out=buf).mul_(lf), axis=0)
    return sumlx, suml2


# ----------------------------------------------------------------------------------------------------------------
# make_qx_quants (rmse_type 1): symmetric codes in [-nmax, nmax-1], weights qw or x^2, 18 refinement candidates
# ----------------------------------------------------------------------------------------------------------------

_QX_STEPS = [s for s in range(-9, 10) if s != 0]


def make_qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None):
    """-> (scale [B], L int32 [B, n] in [0, 2*nmax), iscale [B]: the multiplier L was rounded with, 0 if all zero)."""
    return _chunked(_make_qx_quants, 3, x, qw, nmax=nmax)


def _qx_candidate(x, iscale, nmax, buf, lf):
    """lf = float codes of x on the multiplier iscale [B], clamped to [-nmax, nmax-1] (buf: scratch)."""
    l = nearest_int_(torch.mul(x, iscale, out=buf)).clamp_(-nmax, nmax - 1)
    return lf.copy_(l)


def _make_qx_quants(x, qw, nmax):                       # x, qw: [n, B]
    amax, mx = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    w = x * x if qw is None else qw
    wx = w * x
    buf, lf = torch.empty_like(x), torch.empty_like(x)
    # candidate k's multiplier depends only on max; k = 0 is the first guess, the others are tried in C's order
    consts = [f32(-nmax)] + [f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(s))) for s in _QX_STEPS]
    iscale = div(consts[0], mx)
    best_l = _qx_candidate(x, iscale, nmax, buf, torch.empty_like(x))
    sumlx, suml2 = _sums(w, wx, best_l, buf)
    scale = torch.where(suml2 != 0, div(sumlx, suml2), 0.0)
    best = scale * sumlx
    for c in consts[1:]:
        isc = div(c, mx)
        sumlx, suml2 = _sums(w, wx, _qx_candidate(x, isc, nmax, buf, lf), buf)
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        s_new = div(sumlx, suml2)
        scale = torch.where(upd, s_new, scale)
        best = torch.where(upd, s_new * sumlx, best)
        iscale = torch.where(upd, isc, iscale)
        torch.where(upd, lf, best_l, out=best_l)
    L = best_l.to(torch.int32) + nmax
    L, scale, iscale = _where_zero(zero, L, scale, iscale)
    return scale, L, iscale


# ----------------------------------------------------------------------------------------------------------------
# make_q3_quants (do_rmse): Q3_K reference sub-block search with coordinate descent, weights x^2
# ----------------------------------------------------------------------------------------------------------------

def make_q3_quants(x: torch.Tensor, nmax: int):
    """-> (scale [B], L int32 [B, n] in [0, 2*nmax))."""
    return _chunked(_make_q3_quants, 2, x, None, nmax=nmax)


def _q3_pass(s: dict, nmax: int) -> torch.Tensor:
    x, w, wx, L = s["x"], s["w"], s["wx"], s["L"]
    changed = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        sumlx, suml2 = s["sumlx"], s["suml2"]
        Li = L[i].float()
        slx = sumlx - wx[i] * Li
        sl2 = suml2 - (w[i] * Li) * Li
        new = nearest_int_(div(x[i] * sl2, slx)).clamp_(-nmax, nmax - 1)
        nf = new.float()
        slx2 = slx + wx[i] * nf
        sl22 = sl2 + (w[i] * nf) * nf
        upd = (slx > 0) & (new != L[i]) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
        L[i] = torch.where(upd, new, L[i])
        s["sumlx"], s["suml2"] = torch.where(upd, slx2, sumlx), torch.where(upd, sl22, suml2)
        changed |= upd
    return changed


def _make_q3_quants(x, _, nmax):                        # x: [n, B]
    amax, mx = first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    iscale = div(f32(-nmax), mx)
    L = nearest_int_(iscale[None, :] * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _sums(w, wx, L.float(), torch.empty_like(x))
    state = {"x": x, "w": w, "wx": wx, "L": L, "sumlx": sumlx, "suml2": suml2}
    state = _descend(state, lambda s: _q3_pass(s, nmax))
    suml2 = state["suml2"]
    scale = torch.where(suml2 > 0, div(state["sumlx"], suml2), 0.0)
    L, scale = _where_zero(zero, state["L"] + nmax, scale)
    return scale, L


# ----------------------------------------------------------------------------------------------------------------
# make_qkx2_quants / make_qkx3_quants: asymmetric codes in [0, nmax] with a min, weighted candidate search
# ----------------------------------------------------------------------------------------------------------------

def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool, rounding: bool = False):
    """-> (scale [B], the_min [B] (>= 0, subtracted), L int32 [B, n]).  qkx2 and qkx3 are the same computation
    once the weights are given (their degenerate tests `max == min` / `max <= min` agree as min <= max).

    With `rounding`, also (iscale [B], origin [B]): the multiplier and the min of the candidate llama.cpp kept,
    from which its codes were rounded (Q4_1/Q5_1 re-round with them)."""
    out = _chunked(_make_qkx_quants, 5, x, w, nmax=nmax, rmin=rmin, rdelta=rdelta, nstep=nstep, use_mad=use_mad)
    return out if rounding else out[:3]


def _qkx_codes(x, iscale, minv, nmax, buf, lf):
    """lf = float codes clamp(nearest_int(iscale*(x - min)), 0, nmax) (buf: scratch)."""
    l = nearest_int_(torch.sub(x, minv, out=buf).mul_(iscale)).clamp_(0, nmax)
    return lf.copy_(l)


def _qkx_error(x, w, scale, minv, lf, use_mad: bool, buf):
    """C's `diff = scale*L[i] + min - x[i]; err += w * (use_mad ? fabsf(diff) : diff*diff)`."""
    diff = torch.mul(lf, scale, out=buf).add_(minv).sub_(x)
    diff = diff.abs_() if use_mad else diff.mul_(diff)
    return seqsum(diff.mul_(w), axis=0)


def _make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):     # x, w: [n, B]
    mn = first_extreme(x, False, 0)
    mx = first_extreme(x, True, 0)
    sum_w = seqsum(w, axis=0, zero_start=False)
    sum_x = seqsum(w * x, axis=0, zero_start=False)
    mn = torch.where(mn > 0, 0.0, mn)
    degenerate = mx == mn
    buf, wl, lf = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

    iscale = div(f32(nmax), mx - mn)
    scale = div(1.0, iscale)
    best_l = _qkx_codes(x, iscale, mn, nmax, buf, torch.empty_like(x))
    best = _qkx_error(x, w, scale, mn, best_l, use_mad, buf)

    # sequential over the candidates: an accepted one moves `min`, which the next ones are computed from
    minv, origin = mn, mn
    for c in range(nstep + 1):
        isc = div(f32((np.float32(rmin) + np.float32(rdelta) * np.float32(c)) + np.float32(nmax)), mx - minv)
        _qkx_codes(x, isc, minv, nmax, buf, lf)
        torch.mul(w, lf, out=wl)
        sum_l = seqsum(wl, axis=0)
        sum_l2 = seqsum(torch.mul(wl, lf, out=buf), axis=0)
        sum_xl = seqsum(torch.mul(wl, x, out=buf), axis=0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, D)
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, D)
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, div(sum_xl, sum_l2), this_scale)
        cur = _qkx_error(x, w, this_scale, this_min, lf, use_mad, buf)
        upd = (D > 0) & (cur < best)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        iscale = torch.where(upd, isc, iscale)
        origin = torch.where(upd, minv, origin)
        minv = torch.where(upd, this_min, minv)
        torch.where(upd, lf, best_l, out=best_l)
    the_min = -torch.where(degenerate, mn, minv)
    origin = torch.where(degenerate, mn, origin)
    L, scale, iscale = _where_zero(degenerate, best_l.to(torch.int32), scale, iscale)
    return scale, the_min, L, iscale, origin


# ----------------------------------------------------------------------------------------------------------------
# make_qp_quants: positive values (sub-block scales / mins) onto [0, nmax], weighted, with coordinate descent
# ----------------------------------------------------------------------------------------------------------------

_QP_STEPS = [s for s in range(-4, 5) if s != 0]


def make_qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor):
    """-> (scale [B], L int32 [B, n] as stored in C's uint8 array: wraps modulo 256)."""
    return _chunked(_make_qp_quants, 2, x, qw, nmax=nmax)


def _qp_pass(s: dict, nmax: int) -> torch.Tensor:
    x, w, wx, L = s["x"], s["w"], s["wx"], s["L"]
    changed = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for i in range(x.shape[0]):
        sumlx, suml2 = s["sumlx"], s["suml2"]
        Li = L[i].float()
        slx = sumlx - wx[i] * Li
        sl2 = suml2 - (w[i] * Li) * Li
        new = nearest_int_(div(x[i] * sl2, slx)).clamp_(max=nmax)
        nf = new.float()
        slx2 = slx + wx[i] * nf
        sl22 = sl2 + (w[i] * nf) * nf
        upd = (slx > 0) & (sl2 > 0) & (new != L[i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
        L[i] = torch.where(upd, new & 0xFF, L[i])
        s["sumlx"], s["suml2"] = torch.where(upd, slx2, sumlx), torch.where(upd, sl22, suml2)
        changed |= upd
    return changed


def _qp_mse(x, qw, sc, l):
    diff = x - sc[None, :] * l
    return seqsum((qw * diff) * diff, axis=0)


def _make_qp_quants(x, qw, nmax):                       # x, qw: [n, B]
    mx = x.amax(0).clamp_min(0.0)
    zero = mx < GROUP_MAX_EPS
    iscale = div(f32(nmax), mx)
    L0 = nearest_int(iscale[None, :] * x) & 0xFF
    best = _qp_mse(x, qw, div(1.0, iscale), L0.float())
    k = candidates_per_pass(len(_QP_STEPS), x.numel(), x.device)
    for c in range(0, len(_QP_STEPS), k):           # k candidate scales at once, accepted in C's order
        isc = torch.stack([div(f32(np.float32(0.1) * np.float32(s) + np.float32(nmax)), mx)
                           for s in _QP_STEPS[c:c + k]])                                 # [k, B]
        l = nearest_int(isc[:, None, :] * x).clamp_(max=nmax).float()                    # [k, n, B]
        diff = x - div(1.0, isc)[:, None, :] * l
        mse = seqsum((qw * diff) * diff, axis=1)
        for i in range(isc.shape[0]):
            upd = mse[i] < best
            best = torch.where(upd, mse[i], best)
            iscale = torch.where(upd, isc[i], iscale)
    l = nearest_int(iscale[None, :] * x).clamp_(max=nmax)
    wx = qw * x
    sumlx, suml2 = _sums(qw, wx, l.float(), torch.empty_like(x))
    state = {"x": x, "w": qw, "wx": wx, "L": l & 0xFF, "sumlx": sumlx, "suml2": suml2}
    if runs_triton(x):          # the whole descent in one launch (same bits)
        from twinquant.formats.ggml.triton_num import qp_descend

        state = qp_descend(state, nmax, passes=5)
    else:
        state = _descend(state, lambda s: _qp_pass(s, nmax))
    suml2 = state["suml2"]
    scale = torch.where(suml2 > 0, div(state["sumlx"], suml2), 0.0)
    L, scale = _where_zero(zero, state["L"], scale)
    return scale, L
