"""Activation fake-quantization: granularity, static vs dynamic, stochastic rounding, clipping, settings."""

import json

import pytest
import torch

from twinquant.errors import TwinquantError
from twinquant.algorithms.actquant import ActQuant


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 64, generator=g) * torch.logspace(-2, 1, 16)[:, None]   # tokens of very different size


@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("bits", (4, 8))
def test_per_token_grid_and_error_bound(sym, bits):
    x = _x()
    aq = ActQuant(bits, "per_token", sym)
    y = aq(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    if sym:
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    else:
        step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / (2 ** bits - 1)
    assert ((x - y).abs() <= step / 2 * 1.0001).all()
    assert ((y / step - (y / step).round()).abs() < 1e-3).all()      # on the grid (asym: integer zero point)
    assert len(torch.unique(aq(x[:1]))) <= 2 ** bits
    # per tensor: one grid for all tokens, far worse on the small ones
    t = ActQuant(bits, "per_tensor", sym)(x)
    assert (x[0] - t[0]).norm() > 3 * (x[0] - y[0]).norm()
    assert torch.equal(ActQuant(bits, "per_token", sym)(x[3:4]), y[3:4])         # tokens are independent


def test_static_vs_dynamic():
    x = _x()
    for sym in (True, False):
        static = ActQuant(4, "per_tensor", sym).calibrate([x[:8], x[8:]])
        assert static.static and static.scale > 0 and (sym or static.zero_point == round(static.zero_point))
        assert torch.allclose(static(x), ActQuant(4, "per_tensor", sym)(x), atol=1e-6)
        # a static grid does not follow the input: a larger input saturates, a dynamic one does not
        big = 3 * x
        assert static(big).abs().max() < 0.5 * big.abs().max()
        assert ActQuant(4, "per_tensor", sym)(big).abs().max() > 0.8 * big.abs().max()
    assert ActQuant(4, "per_token").calibrate([x]).granularity == "per_tensor"
    given = ActQuant(8, "per_tensor", True, static=True, scale=0.5)
    assert torch.equal(given(torch.tensor([0.2, 0.3, 1.0, 1000.0])), torch.tensor([0.0, 0.5, 1.0, 63.5]))
    with pytest.raises(TwinquantError):
        ActQuant(8, "per_tensor", True, static=True)(x)                  # no scale yet
    with pytest.raises(TwinquantError):
        ActQuant(8, "per_token", static=True, scale=1.0)
    with pytest.raises(TwinquantError):
        ActQuant(8).calibrate([])


@pytest.mark.parametrize("sym", (True, False))
def test_stochastic_rounding_reproducible_and_unbiased(sym):
    x = _x()[12]
    aq = ActQuant(3, "per_token", sym, rounding="stochastic", seed=7)
    assert torch.equal(aq(x), aq(x))                                     # same seed, same draw
    assert not torch.equal(aq(x), ActQuant(3, "per_token", sym, rounding="stochastic", seed=8)(x))
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(aq(x, generator=g), aq(x, generator=g))      # a caller's generator advances
    # many tokens holding the same values: independent draws with one grid; their mean is x
    draws = aq(x.expand(20000, -1))
    assert len(torch.unique(draws[:, 0])) == 2                           # the two neighbouring grid points
    step = x.abs().max() / 3 if sym else (x.max() - x.min()) / 7
    inner = (x - x.min()).abs() > step                                   # (asymmetric: the rounded zero can
    inner &= (x.max() - x).abs() > step                                  #  push the extremes just outside)
    assert ((draws.mean(0) - x).abs()[inner] < 0.03 * step).all()
    nearest = ActQuant(3, "per_token", sym)(x)
    assert (draws.mean(0) - x).abs().mean() < 0.2 * (nearest - x).abs().mean()


def test_clip_ratio():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 512, generator=g)
    x[:, 0] = 40.0                                                       # one outlier per token
    full = ActQuant(4, "per_token", True)(x)
    clipped = ActQuant(4, "per_token", True, clip_ratio=0.1)(x)
    assert clipped.abs().max() <= 4.0 * 1.0001                           # the outlier saturates at 0.1·max
    bulk = slice(1, None)
    assert (x[:, bulk] - clipped[:, bulk]).norm() < 0.5 * (x[:, bulk] - full[:, bulk]).norm()
    with pytest.raises(TwinquantError):
        ActQuant(4, clip_ratio=1.5)


def test_settings_round_trip_and_dtypes():
    aq = ActQuant(6, "per_tensor", False).calibrate([_x()])
    d = json.loads(json.dumps(aq.to_dict()))
    assert ActQuant.from_dict(d) == aq and d["version"] == 1
    with pytest.raises(TwinquantError):
        ActQuant.from_dict({**d, "version": 9})
    with pytest.raises(TwinquantError):
        ActQuant.from_dict({**d, "bogus": 1})
    for bad in (dict(bits=1), dict(granularity="per_channel"), dict(rounding="floor")):
        with pytest.raises(TwinquantError):
            ActQuant(**bad)
    x = _x().to(torch.bfloat16)
    assert ActQuant(8)(x).dtype == torch.bfloat16
    assert ActQuant(8)(torch.zeros(2, 3)).eq(0).all()
    assert ActQuant(8)(torch.zeros(0, 3)).shape == (0, 3)
