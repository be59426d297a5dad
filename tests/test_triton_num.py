"""The Triton kernels of the codecs' sequential loops (formats/ggml/triton_num.py) give the torch loops' bits.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1 from conftest, TWINQUANT_TRITON_CPU=1 here);
on CUDA they run as compiled kernels (no FMA contraction, correctly rounded division) against the torch loops run
on the CPU, and the codecs that use them against libggml's bytes (tests/test_ggml_codecs.py, test_iquants_*)."""

import numpy as np
import pytest
import torch

from twinquant.formats.ggml import _num

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TWINQUANT_TRITON_CPU", "1")


def _torch_loops(monkeypatch, fn, *args, **kw):
    """fn on CPU copies of args with Triton off: the torch port's loops."""
    with monkeypatch.context() as m:
        m.setenv("TWINQUANT_NO_TRITON", "1")
        return fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **kw)


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.cpu().contiguous()
    return t.view(torch.int32).numpy() if t.dtype == torch.float32 else t.numpy()


def _awkward(shape, seed: int) -> torch.Tensor:
    """float32 values over many magnitudes, with signed zeros and a few infinities (sums whose order matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    pick = torch.randperm(flat.numel(), generator=g)
    flat[pick[:7]] = -0.0
    flat[pick[7:10]] = 0.0
    flat[pick[10:12]] = float("inf")
    flat[pick[12:13]] = float("-inf")
    return x


@pytest.mark.parametrize("n", [2, 8, 32, 256])
@pytest.mark.parametrize("zero_start", [True, False])
def test_seqsum_gives_the_left_to_right_float32_sum(monkeypatch, n, zero_start):
    from twinquant.triton_env import runs_triton

    x = _awkward((5, n, 37), seed=n).to(DEVICE)
    assert runs_triton(x)
    for axis in (1, -1, 0):
        got = _num.seqsum(x, axis=axis, zero_start=zero_start)
        want = _torch_loops(monkeypatch, _num.seqsum, x, axis=axis, zero_start=zero_start)
        assert got.shape == want.shape and got.device.type == DEVICE
        assert np.array_equal(_bits(got), _bits(want)), (axis, n)
    neg = torch.full((n, 3), -0.0, device=DEVICE)                 # C: 0.0f + -0.0f = +0.0f; a[0] alone: -0.0f
    assert _bits(_num.seqsum(neg, axis=0, zero_start=zero_start)).tolist() == \
        ([0] * 3 if zero_start else [np.int32(-2**31)] * 3)
    # and a sum that float64 rounds otherwise: the kernel is not a wider accumulation
    big = torch.tensor([[1.0, 2.0**24]] + [[2.0**-30, 1.0]] * (n - 1), device=DEVICE)
    assert np.array_equal(_bits(_num.seqsum(big, axis=0)), _bits(_torch_loops(monkeypatch, _num.seqsum, big, axis=0)))


@pytest.mark.parametrize("nmax", [4, 15, 63])
def test_make_qp_quants_descent_in_one_launch_gives_the_torch_bits(monkeypatch, nmax):
    g = torch.Generator().manual_seed(nmax)
    n, B = 16 if nmax != 4 else 32, 300
    x = torch.rand(B, n, generator=g) * torch.exp2(torch.randint(-8, 8, (B, 1), generator=g).float())
    w = torch.rand(B, n, generator=g) ** 3
    x[3] = 0.0                                                      # an all-zero sub-block
    w[5] = 0.0                                                      # no weight at all: sums of 0, divisions by 0
    x[7, :4] = -x[7, :4]                                            # negative values (IQ2_XXS passes some)
    x, w = x.to(DEVICE), w.to(DEVICE)
    calls = []
    import twinquant.formats.ggml.triton_num as tn

    real = tn.qp_descend
    monkeypatch.setattr(tn, "qp_descend", lambda *a, **k: calls.append(1) or real(*a, **k))
    scale, L = _num.make_qp_quants(x, nmax, w)
    assert calls                                                    # the kernel ran
    want_scale, want_L = _torch_loops(monkeypatch, _num.make_qp_quants, x, nmax, w)
    assert np.array_equal(_bits(scale), _bits(want_scale))
    assert np.array_equal(_bits(L.to(torch.int32)), _bits(want_L.to(torch.int32)))
    # the descent changed codes somewhere (else this compares the starting point only)
    start = _num.nearest_int(x * (nmax / x.amax(1, keepdim=True).clamp_min(1e-30))).clamp(max=nmax)
    assert (L.cpu() != start.cpu()).any()


def test_iq1_scan_in_one_launch_accepts_the_rows_the_row_loop_accepts(monkeypatch):
    from twinquant.formats.ggml import iq1

    g = torch.Generator().manual_seed(3)
    n, S = 40, 333
    sqx = torch.randn(n, S, generator=g)
    sq2 = torch.rand(n, S, generator=g) - 0.1                      # some sumq2 <= 0: never accepted
    sq2[5] = 0.0
    x2, q2, s = iq1._record_prep(sqx, sq2)
    best0 = torch.rand(S, generator=g) * 0.01
    bi0 = torch.full((S,), -1, dtype=torch.long)
    best, bi = best0.clone().to(DEVICE), bi0.clone().to(DEVICE)
    iq1._scan(best, bi, x2.to(DEVICE), q2.to(DEVICE), s.to(DEVICE), 7)
    want_best, want_bi = best0.clone(), bi0.clone()
    iq1._scan_rows(want_best, want_bi, x2, q2, s, 7)
    assert (want_bi >= 7 + 1).sum() > S // 2                        # most sub-blocks accept more than once
    assert np.array_equal(_bits(best), _bits(want_best)) and torch.equal(bi.cpu(), want_bi)


def test_candidates_accepted_in_order_in_one_launch(monkeypatch):
    g = torch.Generator().manual_seed(5)
    K, S = 9, 211
    sumqx, sumq2 = torch.randn(K, S, generator=g), torch.rand(K, S, generator=g) - 0.2
    best, scale = torch.rand(S, generator=g) * 0.3, torch.zeros(S)
    picks = [(torch.zeros(S, 4, dtype=torch.long), torch.randint(0, 99, (K, S, 4), generator=g)),
             (torch.zeros(S, 2), torch.randn(K, S, 2, generator=g))]
    got = _num.accept_in_order(best.to(DEVICE), scale.to(DEVICE), sumqx.to(DEVICE), sumq2.to(DEVICE),
                               [(k.to(DEVICE), c.to(DEVICE)) for k, c in picks])
    want = _torch_loops(monkeypatch, lambda *a: _num.accept_in_order(*a[:4], picks), best, scale, sumqx, sumq2)
    assert np.array_equal(_bits(got[0]), _bits(want[0])) and np.array_equal(_bits(got[1]), _bits(want[1]))
    for a, b in zip(got[2], want[2]):
        assert a.shape == b.shape and np.array_equal(_bits(a), _bits(b))
    assert (want[1] != 0).sum() > S // 2                            # most sub-blocks accepted some candidate


@pytest.mark.parametrize("ty", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ1_S", "IQ1_M", "Q2_K",
                                "Q4_K"])
def test_codecs_with_the_kernels_write_the_same_bytes(monkeypatch, ty):
    from twinquant.formats import codec_for

    codec = codec_for(ty, 256)
    g = torch.Generator().manual_seed(len(ty))
    x = torch.randn(6, 512, generator=g)
    x[1] *= torch.exp2(torch.randint(-20, 20, (512,), generator=g).float())   # magnitudes far apart
    x[2, :64] = -0.0                                                            # signed zeros in a sub-block
    x[3, 256:] = 0.0                                                            # an all-zero super-block
    imp = torch.rand(512, generator=g) + 0.05
    imp[::7] = 0.0                                                              # inputs without importance
    if getattr(codec, "blockwise", False):
        got = codec.quantize_bytes(x.to(DEVICE), imp.to(DEVICE))
        want = _torch_loops(monkeypatch, codec.quantize_bytes, x, imp)
    else:
        from twinquant.algorithms.backends import get_quantizer, quantize_to_format

        rtn = get_quantizer("rtn")
        monkeypatch.setattr("twinquant.formats.ggml.libggml.usable", lambda W: False)   # the torch codec
        got = quantize_to_format(rtn, x.to(DEVICE), codec, importance=imp.to(DEVICE))[0]
        want = _torch_loops(monkeypatch, lambda a, b: quantize_to_format(rtn, a, codec, importance=b)[0], x, imp)
    assert np.array_equal(np.asarray(got), np.asarray(want))
