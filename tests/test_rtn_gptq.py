"""RTN with clip search, GPTQ into integer grids and GGML codecs, and the quantizer registry."""

import warnings

import pytest
import torch

from twinquant.errors import TwinquantError
from twinquant.algorithms.backends import GPTQConfig, QUANTIZERS, RTNConfig, get_quantizer
from twinquant.algorithms.gptq import accumulate_hessian, gptq
from twinquant.formats.intgrid import IntGrid
from twinquant.algorithms.rtn import rtn


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _correlated(cols, tokens=2048, seed=0):
    """X = Z·A: random inputs through a random mixing, so the features are strongly correlated."""
    g = _gen(seed)
    return torch.randn(tokens, cols, generator=g) @ torch.randn(cols, cols, generator=g) / cols ** 0.5


def _hessian(x, chunks=4):
    H, n = None, 0
    for part in x.chunk(chunks):
        H, n = accumulate_hessian(H, n, part)
    return H


def _out_err(x, w, w_hat):
    return (x @ (w - w_hat).T).norm().item()


# -- RTN and the clip search ------------------------------------------------------------------------------------------

def _group_mse(w, w_hat, g, imp=None):
    e = (w - w_hat).square() * (1 if imp is None else imp)
    return e.view(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("bits,group,sym", [(2, 32, True), (3, 32, False), (4, 128, True), (4, 64, False),
                                            (8, 32, False), (3, -1, False)])
def test_clip_search_never_hurts_and_helps_on_heavy_tails(bits, group, sym):
    c = IntGrid(bits, group, sym)
    g = c.for_cols(256).block
    torch.manual_seed(1)
    heavy = torch.distributions.StudentT(3.0).sample((64, 256))
    for w in (torch.randn(64, 256, generator=_gen(1)), heavy):
        _, _, plain = rtn(w, c, clip_search=False)
        _, _, clipped = rtn(w, c, clip_search=True)
        assert (_group_mse(w, clipped, g) <= _group_mse(w, plain, g)).all()
    # at 8 bits the grid is already fine: clipping an outlier costs more than it gains
    if bits < 8:
        assert _group_mse(heavy, clipped, g).sum() < 0.97 * _group_mse(heavy, plain, g).sum()


def test_clip_search_weighs_by_importance():
    c = IntGrid(3, 32, False)
    torch.manual_seed(2)
    w = torch.distributions.StudentT(3.0).sample((32, 128))
    imp = torch.rand(128, generator=_gen(2)) ** 4
    _, _, plain = rtn(w, c, clip_search=False)
    _, _, weighted = rtn(w, c, importance=imp, clip_search=True)
    _, _, unweighted = rtn(w, c, clip_search=True)
    assert (_group_mse(w, weighted, 32, imp) <= _group_mse(w, plain, 32, imp)).all()
    assert _group_mse(w, weighted, 32, imp).sum() <= _group_mse(w, unweighted, 32, imp).sum()


def test_rtn_without_search_is_the_codecs_quantize():
    c = IntGrid(4, 32, False)
    w = torch.randn(16, 128)
    codes, params, w_hat = rtn(w, c, clip_search=False)
    ref, _ = c.quantize(w)
    assert torch.equal(codes, ref) and w_hat.dtype == torch.float32 and len(params) == 4
    with pytest.raises(TwinquantError):
        rtn(torch.randn(4, 40), c)


def test_accumulate_hessian_is_a_running_mean():
    x = torch.randn(300, 24)
    H, n = accumulate_hessian(None, 0, x[:100].view(10, 10, 24))
    H, n = accumulate_hessian(H, n, x[100:])
    assert n == 300 and torch.allclose(H, 2 * x.T @ x / 300, atol=1e-5)
    with pytest.raises(TwinquantError):
        accumulate_hessian(H, n, torch.randn(5, 23))


@pytest.mark.parametrize("min_rows", (1, 250, 2048))
@pytest.mark.parametrize("cols", (24, 1100, 1536))
def test_hessian_sum_of_upper_blocks_is_the_whole_symmetric_mean(cols, min_rows):
    """HessianSum computes only the blocks on and above the diagonal, of batches gathered to `min_rows`: read
    back, H is the whole running mean (float64 oracle) and exactly symmetric."""
    from twinquant.algorithms.gptq import HessianSum, _triangle_edges

    torch.manual_seed(0)
    x = torch.randn(700, cols) * torch.linspace(0.1, 3, cols)
    acc = HessianSum(min_rows=min_rows)      # batches go in one by one, in twos, or all at the end
    for k, part in enumerate((x[:300].view(3, 100, cols), x[300:301], x[301:])):
        acc.add(part)
        assert acc.n == (300, 301, 700)[k]
    H = acc.H
    ref = 2 * x.double().T @ x.double() / 700
    assert acc.n == 700 and torch.equal(H, H.T)
    assert torch.allclose(H.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    if cols > 1000:
        assert len(_triangle_edges(cols)) > 2        # more than one block: the mirroring is exercised


# -- GPTQ ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("group", (32, 128))
@pytest.mark.parametrize("sym", (True, False))
def test_gptq_beats_rtn_on_correlated_inputs(bits, group, sym):
    c = IntGrid(bits, group, sym)
    w = torch.randn(64, 256, generator=_gen(3))
    x = _correlated(256, tokens=1024)
    H = _hessian(x)
    rtn_err = {}
    for search in (False, True):
        rtn_err[search] = _out_err(x, w, rtn(w, c, clip_search=search)[2])
        r = gptq(w, H, c, clip_search=search)
        assert _out_err(x, w, r.dequantized) < rtn_err[search]
    # act-order with static groups too, and the best GPTQ beats the best RTN by a margin
    r = gptq(w, H, c, act_order=True, static_groups=True, clip_search=True)
    assert _out_err(x, w, r.dequantized) < 0.9 * min(rtn_err.values())


@pytest.mark.parametrize("c", [IntGrid(4, 32, False), IntGrid(2, 16, True), IntGrid(3, -1, False)], ids=str)
@pytest.mark.parametrize("search", (False, True))
def test_gptq_with_a_diagonal_hessian_is_rtn(c, search):
    w = torch.randn(32, 128, generator=_gen(4))
    H = torch.diag(torch.rand(128, generator=_gen(5)) + 0.5)      # distinct: act-order really permutes
    codes, params, w_hat = rtn(w, c, clip_search=search)
    for kw in (dict(), dict(act_order=True, static_groups=True), dict(static_groups=True), dict(block_size=48)):
        r = gptq(w, H, c, clip_search=search, **kw)
        assert torch.equal(r.codes, codes), kw
        assert torch.equal(r.dequantized, w_hat)
        assert all(torch.equal(p.scale, q.scale) and torch.equal(p.offset, q.offset) for p, q in zip(r.params, params))


def test_gptq_loss_is_the_damped_quadratic_error_and_codes_pack():
    c = IntGrid(3, 32, False)
    w = torch.randn(48, 128, generator=_gen(6))
    H = _hessian(_correlated(128, seed=7))
    r = gptq(w, H, c, damp=0.01)
    Hd = H.double() + 0.01 * torch.diagonal(H).double().mean() * torch.eye(128, dtype=torch.float64)
    dw = (w - r.dequantized).double()
    assert r.loss == pytest.approx(0.5 * ((dw @ Hd) * dw).sum().item(), rel=1e-4)
    codes, params = c.unpack(c.pack(r.codes, r.params), 128)
    assert torch.equal(codes, r.codes)


def test_gptq_lazy_batches_do_not_change_the_result():
    # block_size not aligned with the group: the fit of a group that straddles batches still sees every update
    c = IntGrid(3, 32, True)
    w = torch.randn(64, 256, generator=_gen(8))
    H = _hessian(_correlated(256, seed=9))
    ref = gptq(w, H, c, block_size=256)
    for bs in (48, 100):
        r = gptq(w, H, c, block_size=bs)
        assert (r.codes == ref.codes).float().mean() > 0.999
        assert r.loss == pytest.approx(ref.loss, rel=1e-3)


def test_gptq_dead_columns_non_pd_and_bad_options():
    c = IntGrid(4, 32, False)
    w = torch.randn(16, 64, generator=_gen(10))
    x = _correlated(64, tokens=256)
    x[:, 5] = 0.0                                                 # an input that never fires
    r = gptq(w, _hessian(x), c)
    assert (r.dequantized[:, 5] == 0).all()
    low_rank = _hessian(torch.randn(8, 64, generator=_gen(11)))  # rank 8 < 64: singular without damping
    with pytest.warns(UserWarning, match="not positive definite"):
        r = gptq(w, low_rank, c, damp=0.0)
    assert torch.isfinite(r.dequantized).all()
    with pytest.raises(TwinquantError, match="static_groups"):
        gptq(w, _hessian(x), c, act_order=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # per channel: act-order alone is fine
        gptq(w, _hessian(x), IntGrid(4, -1, False), act_order=True)
    with pytest.raises(TwinquantError):
        gptq(w, torch.eye(63), c)
    with pytest.raises(TwinquantError):
        gptq(w, -torch.eye(64), c)


# -- GGML codecs (twinquant.formats.ggml) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ("Q4_K", "Q2_K"))
def test_gptq_into_ggml_k_quants(name):
    from twinquant.formats.ggml import get_codec

    c = get_codec(name)
    w = torch.randn(32, 512, generator=_gen(12))
    x = _correlated(512, tokens=1024, seed=13)
    H = _hessian(x)
    codes, params, w_rtn = rtn(w, c)                              # no clip hook: llama.cpp's own RTN
    ref, _ = c.quantize(w)
    assert torch.equal(codes, ref)
    r = gptq(w, H, c)
    assert _out_err(x, w, r.dequantized) < 0.9 * _out_err(x, w, w_rtn)
    assert c.pack(r.codes, r.params).shape[0] == 32
    d = gptq(w, torch.diag(torch.rand(512, generator=_gen(14)) + 0.5), c)
    assert torch.equal(d.codes, ref)
    assert torch.allclose(d.dequantized, w_rtn)


# -- the registry -------------------------------------------------------------------------------------------------------

def test_registry_and_configs():
    assert set(QUANTIZERS) == {"rtn", "gptq", "hqq"}
    c = IntGrid(4, 32, False)
    w = torch.randn(16, 64)
    H = _hessian(_correlated(64, tokens=256))
    q = get_quantizer("rtn")
    assert q.config == RTNConfig() and not q.needs_hessian
    codes, params, w_hat = q.quantize_weight(w, c)
    assert codes.shape == w.shape and len(params) == 2
    g = get_quantizer("gptq", {"act_order": True, "static_groups": True, "block_size": 32})
    assert g.needs_hessian and g.config.act_order
    codes, params, w_hat = g.quantize_weight(w, c, H=H)
    assert torch.equal(w_hat, gptq(w, H, c, block_size=32, act_order=True, static_groups=True,
                                   clip_search=True).dequantized)
    d = GPTQConfig(damp=0.1).to_dict()
    assert d["version"] == 1 and GPTQConfig.from_dict(d) == GPTQConfig(damp=0.1)
    assert get_quantizer("gptq", GPTQConfig(damp=0.1)).config.damp == 0.1
    with pytest.raises(TwinquantError):
        get_quantizer("awq")
    with pytest.raises(TwinquantError):
        get_quantizer("gptq", {"dampening": 0.1})
    with pytest.raises(TwinquantError):
        GPTQConfig.from_dict({"version": 2})
    with pytest.raises(TwinquantError):
        get_quantizer("gptq", RTNConfig())
    with pytest.raises(TwinquantError, match="Hessian"):
        g.quantize_weight(w, c)


def test_all_finite_finds_nan_inf_and_is_not_fooled_by_an_overflowing_sum():
    from twinquant.errors import all_finite

    t = torch.randn(300, 70)
    assert all_finite(t) and all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[123, 45] = bad
        assert not all_finite(u), bad
    big = torch.full((1000,), 3e38)          # finite, but the sum overflows: the element-wise test decides
    assert not torch.isfinite(big.sum()) and all_finite(big)
    mixed = torch.tensor([float("inf"), -float("inf")])
    assert not all_finite(mixed)
