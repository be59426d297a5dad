"""Rotations are exact: in float64 a rotated tiny model computes the original function (within 1e-6)."""

import pytest
import torch

from tests.tiny_models import FAMILIES, save_tiny
from twinquant.errors import TwinquantError
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import KVCache, forward
from twinquant.transforms.hadamard import RandomizedHadamard
from twinquant.rotation.optimize import int_rtn_rows, objective, optimize_rotation
from twinquant.rotation.rotate import fuse_norms, rotate, rotate_residual


def load64(path):
    return load_hf_dir(path).to(dtype=torch.float64).materialize()


@pytest.fixture(params=list(FAMILIES))
def tiny_dir(request, tmp_path):
    return save_tiny(request.param, tmp_path / "m")


RECIPES = {
    "fuse": dict(r2=False, online=(), only_fuse=True),
    "R1-RH": dict(r2=False, online=()),
    "R1+R2": dict(r2=True, online=()),
    "R1+R2+R4": dict(r2=True, online=("r4",)),
    "R1+R2+R4+R3": dict(r2=True, online=("r4", "r3")),
    "RO+R2": dict(r2=True, online=(), rotation="ro"),
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_rotated_model_computes_the_same_function(tiny_dir, recipe):
    ref = load64(tiny_dir)
    x = torch.randint(0, ref.spec.vocab, (2, 37))
    want = forward(ref, x)
    m = load64(tiny_dir)
    kw = dict(RECIPES[recipe])
    if kw.pop("only_fuse", False):
        fuse_norms(m)
    else:
        calib = torch.randint(0, m.spec.vocab, (2, 32)) if kw.get("rotation") == "ro" else None
        rotate(m, seed=7, calib_windows=calib, ro_iters=3, **kw)
    got = forward(m, x)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() < 1e-6 * max(1.0, want.abs().max().item())
    assert (m.get("blk.0.attn_norm.weight") == 1).all()
    if recipe != "fuse":
        assert not torch.allclose(m.get("blk.0.attn_q.weight"), ref.get("blk.0.attn_q.weight"))  # really rotated
    assert m.needs_online == ("r4" in kw.get("online", ()) or "r3" in kw.get("online", ()))


def test_rotated_generation_with_cache(tmp_path):
    d = save_tiny("qwen3", tmp_path / "m")
    m = rotate(load64(d), seed=1, online=("r4", "r3"))
    x = torch.randint(0, m.spec.vocab, (1, 20))
    full = forward(m, x)
    cache = KVCache.empty(m, 1, 20)
    steps = torch.cat([forward(m, x[:, :5], cache=cache)] + [forward(m, x[:, i:i + 1], cache=cache)
                                                              for i in range(5, 20)], 1)
    assert (steps - full).abs().max() < 1e-9


def test_tied_head_is_untied_only_when_needed(tmp_path):
    d = save_tiny("llama-tied", tmp_path / "m")
    m = fuse_norms(load64(d))
    assert not m.spec.tied_embeddings                        # output_norm gain != 1 -> own head
    assert "output.weight" in m.tensor_names()


def test_r1_requires_fused_norms(tmp_path):
    m = load64(save_tiny("llama", tmp_path / "m"))
    with pytest.raises(TwinquantError, match="fused norms"):
        rotate_residual(m, torch.eye(m.spec.hidden, dtype=torch.float64), {})


def test_ro_lowers_quantization_objective_with_planted_outliers():
    g = torch.Generator().manual_seed(0)
    n, rows = 64, 2000
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    x[:, 5] *= 30                                            # an outlier channel
    x[:20, 11] += 400                                        # massive tokens
    w = torch.ones(rows, dtype=torch.float64)
    w[:20] = 10
    q = int_rtn_rows(4)
    r0 = RandomizedHadamard(n, 3).matrix(torch.float64)
    res = optimize_rotation(x, r0, q, w, iters=15)
    assert torch.allclose(res.rotation @ res.rotation.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert objective(x, res.rotation, q, w) < 0.97 * objective(x, r0, q, w)
    assert objective(x, r0, q, w) < objective(x, torch.eye(n, dtype=torch.float64), q, w)  # RH beats none
