"""Exact Hadamard matrices for LLM dimensions, a fast transform, and the randomized Hadamard rotation.

A Hadamard matrix H of order n has ±1 entries and H·Hᵀ = n·I. We build H = S_p ⊗ B with S_p the Sylvester
matrix of order p = 2^k and B a Paley matrix of small order m (n = p·m):

- Sylvester (1867): S[i, j] = (-1)^popcount(i & j); symmetric.
- Paley I (1933, https://doi.org/10.1002/sapm1933121311): order q + 1, q ≡ 3 (mod 4) a prime power.
- Paley II (same paper): order 2(q + 1), q ≡ 1 (mod 4) a prime power.

Of the decompositions that exist we take the smallest m (fewest flops in `fwht`). Everything is exact and
deterministic, so a runtime can rebuild the same matrix from the recorded `HadamardPlan` (fields below).

Convention: every transform is a right-multiplication, `fwht(x) = x @ H` on the last axis. Paley matrices are
not symmetric, so undoing a rotation needs `x @ Hᵀ` (`fwht(..., transpose=True)` / `fwht_transpose`).

Reproducing a Paley factor elsewhere (the construction is fully specified here):
- Field GF(q), q = p^e: element index t ↔ polynomial Σ d_k x^k with t = Σ d_k p^k (base-p digits, d_0 lowest).
  Modulus: the first monic irreducible x^e + Σ c_k x^k, candidates ordered by c_0 + c_1 p + … (from 0).
- χ(0) = 0, χ(a) = +1 if a is a nonzero square, else -1. Jacobsthal Q[i, j] = χ(a_i - a_j), i, j in 0..q-1.
- Paley I: H = I + [[0, 1ᵀ], [-1, Q]] (row/column 0 is the point at infinity).
- Paley II: C = [[0, 1ᵀ], [1, Q]]; H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]].
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from twinquant.errors import TwinquantError

CONSTRUCTIONS = ("sylvester", "paley1", "paley2", "fallback")


# ----------------------------------------------------------------------------------------------- number theory

def prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)   # smallest prime factor
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _paley_q(construction: str, m: int) -> int | None:
    """The prime power q for a Paley matrix of order m with this construction, or None if there is none."""
    if construction == "paley1":
        q = m - 1
        ok = m % 4 == 0 and q % 4 == 3
    else:
        q = m // 2 - 1
        ok = m % 8 == 4 and q % 4 == 1
    return q if ok and prime_power(q) else None


# ------------------------------------------------------------------------------------------------ finite fields

def _poly_mod(a: np.ndarray, f: np.ndarray, p: int) -> np.ndarray:
    """Rows of a (coefficients, lowest first) reduced modulo the monic f (lowest first, length e + 1)."""
    a = a.copy()
    e = len(f) - 1
    for top in range(a.shape[1] - 1, e - 1, -1):      # cancel the highest term with a shifted f
        c = a[:, top].copy()
        a[:, top - e: top + 1] = (a[:, top - e: top + 1] - c[:, None] * f[None, :]) % p
    return a[:, :e]


def _digits(q: int, p: int, e: int) -> np.ndarray:
    """[q, e] base-p digits of 0..q-1 (digit k = coefficient of x^k)."""
    return (np.arange(q)[:, None] // p ** np.arange(e)[None, :]) % p


def _irreducible(p: int, e: int) -> np.ndarray:
    """The first monic irreducible polynomial of degree e over GF(p) (order in the module docstring)."""
    if e == 1:
        return np.array([0, 1])
    # divisors to try: every monic polynomial of degree 1..e//2 (a reducible f has such a factor)
    divisors = [np.concatenate([_digits(p ** d, p, d), np.ones((p ** d, 1), np.int64)], 1) for d in range(1, e // 2 + 1)]
    for low in _digits(p ** e, p, e):
        f = np.concatenate([low, [1]])
        if not any(_divides_any(f, g, p) for g in divisors):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")   # impossible (Gauss)


def _divides_any(f: np.ndarray, gs: np.ndarray, p: int) -> bool:
    """Whether any monic g (rows of gs) divides f over GF(p)."""
    for g in gs:
        if not _poly_mod(f[None, :], g, p).any():
            return True
    return False


@lru_cache(maxsize=64)
def quadratic_character(q: int) -> np.ndarray:
    """χ over GF(q) as an int8 array indexed by element (index convention in the module docstring)."""
    p, e = prime_power(q)
    d = _digits(q, p, e)
    prod = np.zeros((q, 2 * e - 1), np.int64)          # x², coefficient by coefficient
    for i in range(e):
        prod[:, i: i + e] += d[:, i: i + 1] * d
    sq = _poly_mod(prod % p, _irreducible(p, e), p) @ (p ** np.arange(e))
    chi = np.full(q, -1, np.int8)
    chi[sq] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(a_i - a_j) as int8 [q, q] (q² bytes; no wider temporaries of that size for prime q)."""
    p, e = prime_power(q)
    chi = quadratic_character(q)
    if e == 1:                                         # circulant: row i is a window of χ((i - j) mod q)
        rev = chi[(np.arange(q - 1, -q, -1)) % q]      # rev[t] = χ(q - 1 - t)
        return np.lib.stride_tricks.sliding_window_view(rev, q)[::-1].copy()
    d = _digits(q, p, e).astype(np.int32)
    diff = np.zeros((q, q), np.int32)
    for k in range(e):                                 # digit-wise subtraction is field subtraction
        diff += ((d[:, None, k] - d[None, :, k]) % p) * p ** k
    return chi[diff]


# ---------------------------------------------------------------------------------------------- base matrices

def sylvester(p: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order p = 2^k, int8: S[i, j] = (-1)^popcount(i & j)."""
    i = torch.arange(p)
    b, par = i[:, None] & i[None, :], torch.zeros(p, p, dtype=torch.long)
    while b.any():
        par ^= b & 1
        b = b >> 1
    return (1 - 2 * par).to(torch.int8)


@lru_cache(maxsize=32)
def _paley(construction: str, q: int) -> torch.Tensor:
    """The Paley matrix (int8) of the given construction over GF(q); cached because plans reuse few bases."""
    Q = _jacobsthal(q)
    C = np.zeros((q + 1, q + 1), np.int8)              # Q bordered by the point at infinity
    C[0, 1:], C[1:, 1:] = 1, Q
    if construction == "paley1":                       # I + [[0, 1ᵀ], [-1, Q]]
        C[1:, 0] = -1
        C[np.diag_indices(q + 1)] += 1
        return torch.from_numpy(C)
    C[1:, 0] = 1                                       # C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]
    H = np.empty((2 * (q + 1), 2 * (q + 1)), np.int8)
    H[0::2, 0::2], H[0::2, 1::2], H[1::2, 0::2], H[1::2, 1::2] = C, -C, -C, -C
    i = np.arange(0, 2 * (q + 1), 2)                   # diag(C) = 0, so the identity blocks set these outright
    H[i, i], H[i, i + 1], H[i + 1, i], H[i + 1, i + 1] = 1, 1, 1, -1
    return torch.from_numpy(H)


def _random_orthogonal(m: int, seed: int) -> torch.Tensor:
    """Haar-random orthogonal m×m (float64): QR of a seeded Gaussian, columns sign-fixed so R has a positive
    diagonal (Mezzadri 2007, https://arxiv.org/abs/math-ph/0609050)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


# ------------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class HadamardPlan:
    """How the order-n matrix is built: S_pow2 ⊗ B_m. Recorded in exported metadata (`to_dict`).

    construction: "sylvester" (m = 1), "paley1"/"paley2" (q: the prime power), or "fallback" (B = √m × a
    seeded random orthogonal matrix, so H·Hᵀ = n·I still holds but entries are not ±1).
    """

    n: int
    pow2: int
    m: int
    construction: str
    q: int | None = None
    seed: int | None = None

    def __post_init__(self):
        c, n, p, m = self.construction, self.n, self.pow2, self.m
        ok = (c in CONSTRUCTIONS and n >= 1 and p >= 1 and p & (p - 1) == 0 and p * m == n
              and (c != "sylvester" or (m == 1 and self.q is None and self.seed is None))
              and (c not in ("paley1", "paley2") or (self.q is not None and _paley_q(c, m) == self.q
                                                     and self.seed is None))
              and (c != "fallback" or (self.q is None and self.seed is not None and m > 1)))
        if not ok:
            raise TwinquantError(f"invalid Hadamard plan {self.to_dict()}")

    @property
    def is_hadamard(self) -> bool:
        """True when the matrix has ±1 entries (everything but the fallback)."""
        return self.construction != "fallback"

    def base(self) -> torch.Tensor:
        """The m×m factor B, float64 (a copy; B·Bᵀ = m·I)."""
        if self.construction == "sylvester":
            return torch.ones(1, 1, dtype=torch.float64)
        if self.construction == "fallback":
            return (_random_orthogonal(self.m, self.seed) * math.sqrt(self.m)).contiguous()
        return _paley(self.construction, self.q).to(torch.float64)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense unnormalized n×n matrix (H·Hᵀ = n·I). O(n²) memory: prefer `fwht` for large n."""
        return torch.kron(sylvester(self.pow2).to(dtype), self.base().to(dtype))   # ±1: exact in any dtype

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HadamardPlan":
        try:
            return cls(**{k: d.get(k) for k in ("n", "pow2", "m", "construction", "q", "seed")})
        except TypeError as e:
            raise TwinquantError(f"invalid Hadamard plan metadata {d!r}: {e}") from None


def _find_plan(n: int) -> HadamardPlan | None:
    """The exact construction with the smallest base order m, or None."""
    v = (n & -n).bit_length() - 1                      # n = 2^v · odd
    odd = n >> v
    if odd == 1:
        return HadamardPlan(n, n, 1, "sylvester")
    for j in range(2, v + 1):                          # a Hadamard order > 2 is a multiple of 4
        m = odd << j
        for c in ("paley1", "paley2"):
            q = _paley_q(c, m)
            if q is not None:
                return HadamardPlan(n, n // m, m, c, q)
    return None


@lru_cache(maxsize=4096)
def _cached_plan(n: int) -> HadamardPlan | None:
    return _find_plan(n)


def hadamard_plan(n: int, allow_fallback: bool = False, seed: int = 0) -> HadamardPlan:
    """The plan for order n. Without a construction: TwinquantError, or with allow_fallback=True an explicit
    "fallback" plan (largest Sylvester factor ⊗ seeded random orthogonal odd factor), never silently."""
    if not isinstance(n, int) or n < 1:
        raise TwinquantError(f"Hadamard order must be a positive integer, got {n!r}")
    plan = _cached_plan(n)
    if plan is not None:
        return plan
    if not allow_fallback:
        raise TwinquantError(f"no Hadamard construction (Sylvester x Paley) for n={n}; "
                             f"pass allow_fallback=True for a seeded random orthogonal factor")
    pow2 = n & -n
    return HadamardPlan(n, pow2, n // pow2, "fallback", seed=int(seed))


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n×n Hadamard matrix of `hadamard_plan(n)`: ±1 entries, H·Hᵀ = n·I. Raises if none is constructed."""
    return hadamard_plan(n).matrix(dtype)


# ------------------------------------------------------------------------------------------------- transform

_RADIX = 16   # Sylvester stages are applied as 16×16 blocks: fewer passes over memory than radix 2 (measured)


def _radices(p: int) -> list[int]:
    """Split p = 2^k into balanced powers of two ≤ _RADIX."""
    k, r = p.bit_length() - 1, _RADIX.bit_length() - 1
    parts = -(-k // r) if k else 0
    return [1 << (k // parts + (i < k % parts)) for i in range(parts)]


_factor_cache: dict = {}


def _factors(plan: HadamardPlan, dtype, device, transpose: bool, scale: float):
    """(B or Bᵀ, [S_k …]) on device; the normalization is folded into the first matrix applied."""
    key = (plan, dtype, str(device), transpose, scale)
    if key not in _factor_cache:
        if len(_factor_cache) > 64:
            _factor_cache.clear()
        B = plan.base()
        B = B.T if transpose else B
        syl = [sylvester(k).to(torch.float64) for k in _radices(plan.pow2)]
        if plan.m > 1:
            B = B * scale
        elif syl:
            syl[0] = syl[0] * scale
        _factor_cache[key] = (B.to(dtype=dtype, device=device).contiguous(),
                              [s.to(dtype=dtype, device=device) for s in syl])
    return _factor_cache[key]


def fwht(x: torch.Tensor, n: int | None = None, normalize: bool = True, *, transpose: bool = False,
         plan: HadamardPlan | None = None) -> torch.Tensor:
    """x @ H (or x @ Hᵀ with transpose=True) along the last axis, divided by √n when normalize (orthogonal).

    H = S_p ⊗ B, so viewing the last axis as [p, m]: x @ H = S_p · X · B. B is one small dense matmul; S_p is
    applied in log(p) butterfly passes of radix ≤ 16. Batched over leading axes, any device; half/bfloat16
    inputs are computed in float32 and returned in their dtype. `plan` overrides `hadamard_plan(n)`.
    """
    n = x.shape[-1] if n is None else n
    plan = plan or hadamard_plan(n)
    if x.shape[-1] != n or plan.n != n:
        raise TwinquantError(f"fwht: last dimension {x.shape[-1]} does not match Hadamard order {plan.n}")
    if not x.is_floating_point():
        raise TwinquantError(f"fwht needs a floating-point tensor, got {x.dtype}")
    if _kernel_runs(x, plan):
        return _fwht_triton(x, plan, None, transpose, normalize)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, syl = _factors(plan, work, x.device, transpose, 1 / math.sqrt(n) if normalize else 1.0)
    lead = x.shape[:-1]
    y = x.to(work).reshape(-1, plan.pow2, plan.m)
    if plan.m > 1:
        y = y @ B
    rows, rest = y.shape[0], n
    for S in syl:                                       # S_p = S_k1 ⊗ S_k2 ⊗ …, each a left-multiply on its axis
        k = S.shape[0]
        rest //= k
        y = torch.matmul(S, y.reshape(rows, k, rest))
        rows *= k
    return y.reshape(*lead, n).to(x.dtype)


def _kernel_runs(x: torch.Tensor, plan: HadamardPlan) -> bool:
    """True when the Triton transform (transforms/triton_hadamard.py) takes this call: a CUDA tensor (or Triton's
    interpreter), a ±1 plan it has a tiling for whose tiles fit in shared memory, a float32/half/bfloat16 row."""
    from twinquant.triton_env import runs_triton

    if not (runs_triton(x) and plan.is_hadamard and x.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return False
    from twinquant.transforms.triton_hadamard import fits, layout

    tiling = layout(plan.pow2, plan.m)
    return tiling is not None and fits(*tiling, x.element_size())


@lru_cache(maxsize=64)
def _kernel_factors(plan: HadamardPlan, transpose: bool, dtype: torch.dtype, device: str):
    """The kernel's tiling (A, C, D) and its matrices: L (B zero-padded to D×D, or S_D when m = 1), S_A, S_C."""
    from twinquant.transforms.triton_hadamard import layout

    A, C, D = layout(plan.pow2, plan.m)
    if plan.m > 1:
        B = plan.base()
        L = torch.zeros(D, D, dtype=torch.float64)
        L[: plan.m, : plan.m] = B.T if transpose else B
    else:
        L = sylvester(D).to(torch.float64)
    mats = (L, sylvester(A).to(torch.float64), sylvester(C).to(torch.float64))
    return (A, C, D), tuple(t.to(dtype=dtype, device=device).contiguous() for t in mats)


@dataclass(frozen=True)
class KernelConfig:
    """How `_fwht_triton` launches the kernel: rows per tile, warps per program, software-pipelining stages, and
    programs per SM (0: one program per tile)."""
    rows: int = 1
    warps: int = 4
    stages: int = 1
    per_sm: int = 0


def kernel_config(A: int, C: int, D: int) -> KernelConfig:
    """The launch for tiling (A, C, D), from a sweep on an H100 (bf16, 16384 rows; `benchmarks/hadamard_warps.py`,
    benchmarks/results/hadamard_warps_s15-h100.json): 4 warps (8 lost 5-27 points everywhere); two rows per tile
    when a row's tile has at most 8192 weights and no S_A axis (1536, 4096, 8192: +1 to +13 points); a grid of 4
    programs per SM looping over the tiles with 2 pipelining stages (8 per SM for smaller tiles with an S_A axis:
    5120 gained 0.7-0.9 points in two sweeps, hadamard_warps_s15-h100 and hadamard_chunks_s16-h100), except for
    tiles of 16384+ weights with an S_A axis (14336, 27648), which lost 12-23 points that way (one program per tile
    there)."""
    size = A * C * D
    rows = 2 if A == 1 and size <= 8192 else 1
    loop = size < 16384 or A == 1
    return KernelConfig(rows=rows, warps=4, stages=2 if loop else 1, per_sm=(4 if A == 1 else 8) if loop else 0)


@lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def launch_fwht(x2: torch.Tensor, y: torch.Tensor, plan: HadamardPlan, factors, signs: torch.Tensor | None,
                transpose: bool, scale: float, cfg: KernelConfig) -> None:
    """One launch of the Triton transform over the rows of x2 [rows, n] (unit column stride) into y."""
    from twinquant.transforms.triton_hadamard import fwht_kernel

    (A, C, D), (L, SA, SC) = factors
    rows = x2.shape[0]
    tiles = -(-rows // cfg.rows)
    grid = tiles if cfg.per_sm == 0 else min(tiles, cfg.per_sm * _sm_count(x2.device))
    fwht_kernel[(grid,)](
        x2, y, L, SA, SC, L if signs is None else signs, rows, x2.stride(0), y.stride(0), scale,
        M=plan.m if plan.m > 1 else D, A=A, C=C, D=D, ROWS=cfg.rows, SIGN_IN=signs is not None and transpose,
        SIGN_OUT=signs is not None and not transpose, PREC="tf32x3" if x2.dtype == torch.float32 else "tf32",
        STAGES=cfg.stages, num_warps=cfg.warps)


def _fwht_triton(x: torch.Tensor, plan: HadamardPlan, signs: torch.Tensor | None, transpose: bool,
                 normalize: bool) -> torch.Tensor:
    """x @ H·diag(s) (transpose: (x·s) @ Hᵀ), over √n when normalize, in one Triton pass over the rows."""
    n = plan.n
    factors = _kernel_factors(plan, transpose, x.dtype, str(x.device))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:             # signs: float32 on x's device (RandomizedHadamard._s)
        launch_fwht(x2, y, plan, factors, signs, transpose, 1 / math.sqrt(n) if normalize else 1.0,
                    kernel_config(*factors[0]))
    return y.reshape(*lead, n)


def fwht_transpose(x: torch.Tensor, n: int | None = None, normalize: bool = True, *,
                   plan: HadamardPlan | None = None) -> torch.Tensor:
    """x @ Hᵀ (/ √n): undoes the normalized `fwht`."""
    return fwht(x, n, normalize, transpose=True, plan=plan)


# ---------------------------------------------------------------------------------------- randomized Hadamard

def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random ±1 (float64) from torch.Generator(seed)."""
    g = torch.Generator().manual_seed(int(seed))
    return (1 - 2 * torch.randint(0, 2, (n,), generator=g)).to(torch.float64)


def pack_signs(s: torch.Tensor) -> np.ndarray:
    """1 bit per sign, uint8, little-endian bit order: sign i is bit (i % 8) (LSB = 0) of byte i // 8;
    bit 1 means -1, bit 0 means +1."""
    s = torch.as_tensor(s).detach().cpu()
    if not bool(((s == 1) | (s == -1)).all()):
        raise TwinquantError("pack_signs needs a vector of ±1")
    return np.packbits((s < 0).numpy().astype(np.uint8), bitorder="little")


def unpack_signs(packed, n: int) -> torch.Tensor:
    """Inverse of `pack_signs`: n signs, float64 ±1."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.size * 8 < n:
        raise TwinquantError(f"packed signs hold {packed.size * 8} bits, need {n}")
    bits = np.unpackbits(packed, count=n, bitorder="little")
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


class RandomizedHadamard:
    """The orthogonal Q = H·diag(s)/√n (H of `hadamard_plan(n)`, s = random_signs(n, seed)).

    x @ Q = fwht(x) * s and x @ Qᵀ = fwht_transpose(x * s); see QuaRot (https://arxiv.org/abs/2404.00456)
    for why random signs plus Hadamard spread outliers.
    """

    def __init__(self, n: int, seed: int = 0, *, plan: HadamardPlan | None = None, signs: torch.Tensor | None = None,
                 allow_fallback: bool = False):
        self.n, self.seed = n, int(seed)
        self.plan = plan or hadamard_plan(n, allow_fallback=allow_fallback, seed=self.seed)
        self.signs = random_signs(n, self.seed) if signs is None else torch.as_tensor(signs, dtype=torch.float64)
        self._signs_on: dict = {}      # (device, dtype) -> signs there: the online transforms run every token
        if self.plan.n != n or self.signs.shape != (n,):
            raise TwinquantError(f"randomized Hadamard of order {n}: plan/signs have another size")

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return (self.plan.matrix(torch.float64) * self.signs / math.sqrt(self.n)).to(dtype)

    def _s(self, x):
        key = (x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        if key not in self._signs_on:
            self._signs_on[key] = self.signs.to(device=key[0], dtype=key[1]).contiguous()
        return self._signs_on[key]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q."""
        if _kernel_runs(x, self.plan):         # signs applied inside the kernel's pass
            return _fwht_triton(x, self.plan, self._s(x), False, True)
        return (fwht(x.float() if x.dtype != torch.float64 else x, plan=self.plan) * self._s(x)).to(x.dtype)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Qᵀ (undoes `apply`)."""
        if _kernel_runs(x, self.plan):
            return _fwht_triton(x, self.plan, self._s(x), True, True)
        xs = (x.float() if x.dtype != torch.float64 else x) * self._s(x)
        return fwht_transpose(xs, plan=self.plan).to(x.dtype)

    def to_dict(self) -> dict:
        """Metadata; signs as base64 of `pack_signs` (authoritative: a runtime need not replay torch's RNG)."""
        return {"n": self.n, "seed": self.seed, "plan": self.plan.to_dict(), "sign_bits": "little",
                "signs": base64.b64encode(pack_signs(self.signs).tobytes()).decode("ascii")}

    @classmethod
    def from_dict(cls, d: dict) -> "RandomizedHadamard":
        try:
            n, seed = int(d["n"]), int(d["seed"])
            signs = unpack_signs(np.frombuffer(base64.b64decode(d["signs"]), dtype=np.uint8), n)
            plan = HadamardPlan.from_dict(d["plan"])
        except (KeyError, ValueError, TypeError) as e:
            raise TwinquantError(f"invalid randomized Hadamard metadata: {e}") from None
        return cls(n, seed, plan=plan, signs=signs)
