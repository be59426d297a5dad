"""Hadamard constructions (exact), the fast transform against dense products, randomized Hadamard, fallback."""

import math

import numpy as np
import pytest
import torch

from twinquant.errors import TwinquantError
from twinquant.transforms import hadamard as hm
from twinquant.transforms.hadamard import (HadamardPlan, RandomizedHadamard, fwht, fwht_transpose, hadamard,
                                         hadamard_plan, pack_signs, random_signs, unpack_signs)

LIMIT = 32768
# hidden / intermediate / head dims of Qwen2.5 0.5B-72B, Qwen3, Llama 2/3, DeepSeek-V3
MODEL_DIMS = [64, 128, 192, 576, 896, 1024, 1536, 2048, 2560, 3072, 3584, 4096, 4864, 5120, 6144, 7168, 8192,
              8960, 9728, 11008, 12288, 13824, 14336, 17408, 18432, 18944, 25600, 27648, 28672, 29568]
DENSE_BASE_MAX = 1024          # bases up to this order are checked exactly with a dense B·Bᵀ here


def _prime_powers(limit):
    """Independent reference: prime powers ≤ limit from a sieve."""
    sieve = np.ones(limit + 1, bool)
    sieve[:2] = False
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i::i] = False
    out = set()
    for p in np.flatnonzero(sieve).tolist():
        x = p
        while x <= limit:
            out.add(x)
            x *= p
    return out


def _reference_m(n, pp):
    """Smallest base order m (n / m a power of two) with a Paley matrix, 1 for powers of two, else None."""
    odd = n
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1
    for m in sorted(odd << j for j in range(2, 20) if n % (odd << j) == 0):
        if (m - 1) in pp and (m - 1) % 4 == 3 or (m // 2 - 1) in pp and (m // 2 - 1) % 4 == 1 and m % 8 == 4:
            return m
    return None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops: with other jobs on the machine, OpenMP threads spin-wait and cost 10-30x."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def plans():
    """Every multiple of 4 up to LIMIT -> its plan (None when there is no construction)."""
    out = {}
    for n in range(4, LIMIT + 1, 4):
        try:
            out[n] = hadamard_plan(n)
        except TwinquantError as e:
            assert str(n) in str(e)
            out[n] = None
    return out


def _exact_hhT(H):
    n = H.shape[0]
    return torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def _pm1(H):
    return bool(((H == 1) | (H == -1)).all())


def _int_rows(n, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (rows, n), generator=g).to(torch.float64)


# ------------------------------------------------------------------------------------------------ constructions

def test_prime_power_and_character():
    pp = _prime_powers(3000)
    assert {q for q in range(3000) if hm.prime_power(q)} == pp
    for q in (3, 7, 11, 13, 101, 1009):                # Euler's criterion for primes
        chi = hm.quadratic_character(q)
        want = [0] + [1 if pow(a, (q - 1) // 2, q) == 1 else -1 for a in range(1, q)]
        assert chi.tolist() == want
    for q in (9, 25, 27, 49, 81, 121, 125, 243, 343, 625, 729, 2187):   # GF(p^e): half the units are squares
        chi = hm.quadratic_character(q)
        assert chi[0] == 0 and (chi == 1).sum() == (q - 1) // 2 and (chi == -1).sum() == (q - 1) // 2


def test_plan_choice_matches_reference_for_all_multiples_of_4(plans):
    pp = _prime_powers(LIMIT)
    for n, plan in plans.items():
        m = _reference_m(n, pp)
        if m is None:
            assert plan is None, n
            continue
        assert plan is not None and plan.m == m and plan.pow2 * plan.m == n and plan.is_hadamard, n
        assert plan.construction == {1: "sylvester"}.get(m, plan.construction)
        if plan.construction == "paley1":
            assert plan.q == m - 1 and plan.q % 4 == 3 and plan.q in pp
        elif plan.construction == "paley2":
            assert plan.q == m // 2 - 1 and plan.q % 4 == 1 and plan.q in pp
    assert all(plans[n] is not None for n in MODEL_DIMS)


def test_every_small_base_is_exactly_hadamard(plans):
    bases = {(p.construction, p.q) for p in plans.values() if p is not None and 1 < p.m <= DENSE_BASE_MAX}
    bases |= {("paley1", q) for q in (3, 7, 27, 243, 343)} | {("paley2", q) for q in (5, 9, 25, 49, 125, 169)}
    for c, q in bases:
        B = hm._paley(c, q).to(torch.float64)
        assert _pm1(B) and _exact_hhT(B), (c, q)


def test_larger_bases_freivalds(plans):
    """Bases of order 1024 < m <= 2048: B·(Bᵀ·V) = m·V exactly for 16 random ±1 columns (false pass < 2^-16)."""
    bases = {(p.construction, p.q, p.m) for p in plans.values() if p is not None and DENSE_BASE_MAX < p.m <= 2048}
    g = torch.Generator().manual_seed(0)
    for c, q, m in sorted(bases):
        B = hm._paley(c, q).to(torch.float64)
        V = (2 * torch.randint(0, 2, (m, 16), generator=g) - 1).to(torch.float64)
        assert _pm1(B) and torch.equal(B @ (B.T @ V), m * V), (c, q)


def test_dense_matrices_small_n(plans):
    for n in [1, 2] + [n for n in range(4, 257, 4) if plans[n] is not None]:
        H = hadamard(n)
        assert H.shape == (n, n) and _pm1(H) and _exact_hhT(H), n
    for n in (576, 896, 1536):
        assert _exact_hhT(hadamard(n)), n


def test_all_supported_n_roundtrip_exactly(plans):
    """H·Hᵀ = n·I on random integer vectors (exact in float64) for every supported n whose base was checked."""
    for n, plan in plans.items():
        if plan is None or plan.m > DENSE_BASE_MAX:
            continue
        x = _int_rows(n, rows=2, seed=n)
        y = fwht(x, normalize=False)
        assert torch.equal(fwht_transpose(y, normalize=False), n * x), n
        assert torch.equal((y * y).sum(-1), n * (x * x).sum(-1)), n   # ‖xH‖² = n‖x‖² exactly


def _sylvester_radix2(y):
    """Reference S_p·Y along axis -2 with plain radix-2 butterflies ([[1, 1], [1, -1]] per stage)."""
    rows, p, m = y.shape
    h = 1
    while h < p:
        y = y.reshape(rows, p // (2 * h), 2, h * m)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(rows, p, m)


@pytest.mark.parametrize("n", MODEL_DIMS)
def test_model_dims(n):
    """Kronecker definition via an independent dense Sylvester (no n×n matrix), norm preservation."""
    plan = hadamard_plan(n)
    B = plan.base()
    if plan.m > 1:
        assert _pm1(B) and _exact_hhT(B)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    want = _sylvester_radix2(x.view(3, plan.pow2, plan.m) @ B).reshape(3, n)
    got = fwht(x, normalize=False)
    assert torch.allclose(got, want, rtol=0, atol=1e-9 * n)
    y = fwht(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(fwht_transpose(y), x, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------------- fwht

@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 76, 108, 192, 344, 576, 896, 1536, 2048])
@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_fwht_equals_dense(n, shape):
    H = hadamard(n)
    x = torch.randn(*shape, n, dtype=torch.float64)
    assert torch.allclose(fwht(x, normalize=False), x @ H, atol=1e-10 * n)
    assert torch.allclose(fwht(x), x @ H / math.sqrt(n), atol=1e-12 * math.sqrt(n))
    assert torch.allclose(fwht(x, transpose=True, normalize=False), x @ H.T, atol=1e-10 * n)
    assert torch.allclose(fwht_transpose(fwht(x)), x, atol=1e-12)
    assert torch.allclose(fwht(fwht_transpose(x)), x, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("n", [896, 1536])
def test_fwht_low_precision(dtype, tol, n):
    x64 = torch.randn(4, n, dtype=torch.float64)
    x = x64.to(dtype)
    y = fwht(x)
    assert y.dtype == dtype and y.shape == x.shape
    want = x.to(torch.float64) @ hadamard(n) / math.sqrt(n)
    assert (y.to(torch.float64) - want).abs().max() <= tol * want.abs().max()
    back = fwht_transpose(y).to(torch.float64)
    assert (back - x64).abs().max() <= 2 * tol * x64.abs().max()


def test_fwht_bad_input():
    with pytest.raises(TwinquantError, match="92"):
        fwht(torch.zeros(2, 92))
    with pytest.raises(TwinquantError):
        fwht(torch.zeros(2, 64), n=128)
    with pytest.raises(TwinquantError):
        fwht(torch.zeros(2, 64, dtype=torch.int32))


# ----------------------------------------------------------------------------------------- randomized Hadamard

def test_pack_unpack_signs():
    for n in (1, 7, 8, 9, 896, 4864):
        s = random_signs(n, seed=n)
        assert s.dtype == torch.float64 and set(s.unique().tolist()) <= {-1.0, 1.0}
        packed = pack_signs(s)
        assert packed.dtype == np.uint8 and packed.size == (n + 7) // 8
        assert torch.equal(unpack_signs(packed, n), s)
    # documented bit order: sign i is bit i % 8 (LSB first) of byte i // 8, 1 = negative
    assert pack_signs(torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1, 1, -1])).tolist() == [1, 2]
    assert torch.equal(random_signs(100, 3), random_signs(100, 3))
    assert not torch.equal(random_signs(100, 3), random_signs(100, 4))


@pytest.mark.parametrize("n", [64, 576, 896])
def test_randomized_hadamard(n):
    rh = RandomizedHadamard(n, seed=7)
    Q = rh.matrix()
    assert (Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.allclose(Q, hadamard(n) * random_signs(n, 7) / math.sqrt(n), atol=0, rtol=0)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(rh.apply(x), x @ Q, atol=1e-12)
    assert torch.allclose(rh.apply_transpose(x), x @ Q.T, atol=1e-12)
    assert torch.allclose(rh.apply_transpose(rh.apply(x)), x, atol=1e-12)
    x32 = x.float()
    assert rh.apply(x32).dtype == torch.float32 and torch.allclose(rh.apply(x32).double(), x @ Q, atol=1e-5)
    d = rh.to_dict()
    rh2 = RandomizedHadamard.from_dict(d)
    assert rh2.plan == rh.plan and torch.equal(rh2.signs, rh.signs) and torch.equal(rh2.matrix(), Q)


def test_plan_dict_roundtrip_and_validation():
    for n in (1, 896, 4864, 27648):
        p = hadamard_plan(n)
        assert HadamardPlan.from_dict(p.to_dict()) == p
    with pytest.raises(TwinquantError):
        HadamardPlan.from_dict({"n": 896, "pow2": 32, "m": 28, "construction": "paley1", "q": 29})
    with pytest.raises(TwinquantError):
        HadamardPlan.from_dict({"n": 896, "pow2": 32, "m": 28, "construction": "magic"})
    with pytest.raises(TwinquantError):
        RandomizedHadamard.from_dict({"n": 8})


# -------------------------------------------------------------------------------------------------- fallback

@pytest.mark.parametrize("n", [92, 184, 6, 7, 944])
def test_no_construction_raises_and_fallback_is_explicit(n):
    with pytest.raises(TwinquantError, match=str(n)):
        hadamard_plan(n)
    with pytest.raises(TwinquantError):
        hadamard(n)
    plan = hadamard_plan(n, allow_fallback=True, seed=5)
    assert plan.construction == "fallback" and plan.seed == 5 and not plan.is_hadamard
    assert plan.pow2 == n & -n and plan.m == n // plan.pow2
    H = plan.matrix()
    assert (H @ H.T - n * torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12 * n
    assert torch.equal(H, hadamard_plan(n, allow_fallback=True, seed=5).matrix())       # reproducible
    assert not torch.equal(H, hadamard_plan(n, allow_fallback=True, seed=6).matrix())
    assert HadamardPlan.from_dict(plan.to_dict()) == plan
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(fwht(x, plan=plan), x @ H / math.sqrt(n), atol=1e-12)
    assert torch.allclose(fwht_transpose(fwht(x, plan=plan), plan=plan), x, atol=1e-12)
    rh = RandomizedHadamard(n, 1, allow_fallback=True)
    Q = rh.matrix()
    assert (Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.allclose(RandomizedHadamard.from_dict(rh.to_dict()).apply(x), x @ Q, atol=1e-12)


def test_fallback_not_used_when_a_construction_exists():
    assert hadamard_plan(896, allow_fallback=True).construction == "paley1"
