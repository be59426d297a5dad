"""Integer-grid codecs: parameters, rounding bound, lossless packing."""

import numpy as np
import pytest
import torch

from twinquant.errors import TwinquantError
from twinquant.formats.codec import dequantize_codes
from twinquant.formats.intgrid import IntGrid
from twinquant.algorithms.rtn import dequantize

GROUPS = (16, 32, 48, 128, -1)


def _w(rows=24, cols=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[0] = 0.0                                   # an all-zero row
    w[1] = w[1].abs() + 0.1                      # an all-positive row (the range is widened to include 0)
    w[2, :] = -3e-6                              # tiny weights (fp16 subnormal scales)
    return w


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", (True, False))
def test_pack_unpack_lossless_and_error_bound(bits, group, sym):
    c = IntGrid(bits, group, sym)
    w = _w()
    codes, params = c.quantize(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= c.qmax
    assert len(params) == (1 if group == -1 else w.shape[1] // group)
    data = c.pack(codes, params)
    assert data.dtype == np.uint8 and data.shape == (w.shape[0], c.row_bytes(w.shape[1]))
    codes2, params2 = c.unpack(data, w.shape[1])
    assert torch.equal(codes2, codes)
    for p, q in zip(params, params2):
        assert torch.equal(p.scale, q.scale) and torch.equal(p.offset, q.offset)
        assert torch.equal(p.scale.half().float(), p.scale)          # fp16 scales
        z = -p.offset / p.scale
        assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= c.qmax).all()
        if sym:
            assert (z == 2 ** (bits - 1)).all()
    assert np.array_equal(c.pack(codes2, params2), data)
    # every weight is within half a step of its dequantized value (scales are rounded up, never down)
    deq = dequantize(codes, params, c)
    step = torch.cat([p.scale.expand(-1, c.for_cols(w.shape[1]).block) for p in params], 1)
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-6)).all()
    assert torch.equal(deq[0], torch.zeros_like(deq[0]))             # zero is exactly representable


def test_fit_and_codes_match_quantize_blockwise():
    c = IntGrid(4, 32, False)
    w = _w()
    codes, params = c.quantize(w)
    for j, p in enumerate(params):
        blk = w[:, 32 * j:32 * (j + 1)]
        q = c.fit(blk)
        assert torch.equal(q.scale, p.scale) and torch.equal(q.offset, p.offset)
        assert torch.equal(c.codes(blk, q), codes[:, 32 * j:32 * (j + 1)])
        assert torch.allclose(dequantize_codes(codes[:, 32 * j:32 * (j + 1)], p, c.sub), blk, atol=p.scale.max().item())


def test_clip_hook_shrinks_the_range():
    c = IntGrid(4, 32, True)
    w = _w()[:, :32]
    full, half = c.fit(w), c.fit(w, clip=0.5)
    assert (half.scale <= full.scale * 0.5 * 1.01 + 1e-7).all()
    per_row = c.fit(w, clip=torch.linspace(0.3, 1.0, w.shape[0])[:, None])
    assert torch.equal(per_row.scale[-1], full.scale[-1])


def test_pack_accepts_params_without_packed_fields():
    c = IntGrid(3, 16, False)
    w = _w(cols=64)
    codes, params = c.quantize(w)
    bare = [type(p)(p.scale, p.offset) for p in params]
    assert np.array_equal(c.pack(codes, bare), c.pack(codes, params))
    bad = [type(p)(p.scale * 1.0001, p.offset) for p in params]
    with pytest.raises(TwinquantError):
        c.pack(codes, bad)


def test_names_and_bad_input():
    assert IntGrid(4, 128, False).name == "int4_g128_asym"
    assert IntGrid(8, -1, True).name == "int8_pc_sym"
    for n in ("int4_g128_asym", "int2_g32_sym", "int8_pc_sym"):
        assert IntGrid.from_name(n).name == n
    c = IntGrid(4, -1, True)
    assert c.block == -1 and c.for_cols(96).block == 96 and c.for_cols(96).sub == 96
    assert IntGrid(4, 32).ggml_type is None and IntGrid(3, 32).qmax == 7
    for bad in (dict(bits=5), dict(bits=4, group_size=8), dict(bits=4, group_size=256), dict(bits=4, group_size=0)):
        with pytest.raises(TwinquantError):
            IntGrid(**bad)
    with pytest.raises(TwinquantError):
        IntGrid.from_name("q4_k")
    with pytest.raises(TwinquantError):
        IntGrid(4, 32).quantize(torch.randn(4, 40))                 # not whole groups
    c = IntGrid(4, 32)
    codes, params = c.quantize(torch.randn(4, 64))
    with pytest.raises(TwinquantError):
        c.unpack(c.pack(codes, params)[:, :-1], 64)
    with pytest.raises(TwinquantError):
        c.pack(codes.to(torch.int64) + 16, params)
