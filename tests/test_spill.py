"""Staged inputs spilled to a temporary file (`calibration.spill`): the same bytes back, the same quantized block."""

import os

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.calibration import spill
from twinquant.calibration.spill import StagedInputs
from twinquant.io.hf import load_hf_dir


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_windows_come_back_bit_for_bit(tmp_path, dtype):
    torch.manual_seed(0)
    ts = [torch.randn(1, 7, 33).to(dtype) for _ in range(5)]
    ts[2][0, 0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    st = StagedInputs(5, ts[0].shape, dtype, "cpu", tmp_path, spill_above=0)
    assert st.on_disk
    for t in ts:
        st.append(t)
    assert len(st) == 5
    for i in (3, 0, 4, 2, 1, 2):        # any order, more than once
        got = st[i]
        assert got.dtype == dtype and got.shape == ts[i].shape
        assert torch.equal(got.view(torch.int8), ts[i].view(torch.int8))
    with pytest.raises(IndexError):
        st[5]
    with pytest.raises(ValueError):
        st.append(torch.zeros(1, 7, 32, dtype=dtype))
    st.close()
    assert os.listdir(tmp_path) == []    # unnamed: nothing left behind


def test_small_or_accelerator_inputs_stay_in_memory(tmp_path):
    t = torch.zeros(2, 3)
    assert not StagedInputs(4, t.shape, t.dtype, "cpu", tmp_path).on_disk             # 96 bytes < 2 GiB
    assert not StagedInputs(4, t.shape, t.dtype, "cuda", tmp_path, spill_above=0).on_disk
    st = StagedInputs(4, t.shape, t.dtype, "cpu", tmp_path, spill_above=4 * 24 - 1)
    assert st.on_disk                                                                  # one byte over


def test_staged_block_gives_the_same_block_with_its_ffn_inputs_on_disk(tmp_path, monkeypatch):
    """Quantizing a block with the down projection's inputs spilled gives the same Hessians, bytes and outputs."""
    from twinquant.algorithms.backends import get_quantizer
    from twinquant.calibration.blocks import staged_block
    from twinquant.model import roles
    from twinquant.pipeline.executor import quantize_tensor

    path = save_tiny("qwen2", tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 256)
    results = {}
    for above in (spill.SPILL_ABOVE, 0):
        monkeypatch.setattr(spill, "SPILL_ABOVE", above)
        model = load_hf_dir(path).materialize()
        hs = []
        made = []
        real = StagedInputs.__init__

        def spy(self, *a, **k):
            real(self, *a, **k)
            made.append(self)

        monkeypatch.setattr(StagedInputs, "__init__", spy)

        def quantize_group(g, H):
            hs.append(H.clone())
            for n in g:
                quantize_tensor(model, n, "Q4_K", get_quantizer("gptq"), H)

        groups = roles.shared_input_groups(1, model.spec)
        out = staged_block(model, 1, x, {n for g in groups for n in g}, quantize_group, spill_dir=tmp_path)
        assert [m.on_disk for m in made] == [above == 0]
        results[above] = (out, hs, {n: model.quantized[n].data.tobytes() for g in groups for n in g})
        monkeypatch.setattr(StagedInputs, "__init__", real)
    (o1, h1, q1), (o2, h2, q2) = results.values()
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(h1, h2))
    assert q1 == q2
    assert [p for p in os.listdir(tmp_path) if p.startswith("staged-")] == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_staged_block_in_place_writes_the_same_block_over_its_input(tmp_path, dtype):
    """`in_place=True` (the executor's) keeps the residual and the outputs in x's storage: the same Hessians,
    bytes and outputs as a separate output, in float32 and in bfloat16 models."""
    from twinquant.algorithms.backends import get_quantizer
    from twinquant.calibration.blocks import staged_block
    from twinquant.model import roles
    from twinquant.pipeline.executor import quantize_tensor

    path = save_tiny("qwen2", tmp_path / "hf", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=2)
    torch.manual_seed(0)
    x0 = torch.randn(3, 16, 256)
    results = []
    for in_place in (False, True):
        model = load_hf_dir(path).materialize().to(dtype=dtype)
        hs = []

        def quantize_group(g, H):
            hs.append(H.clone())
            for n in g:
                quantize_tensor(model, n, "Q4_K", get_quantizer("gptq"), H)

        x = x0.clone()
        groups = roles.shared_input_groups(1, model.spec)
        out = staged_block(model, 1, x, {n for g in groups for n in g}, quantize_group, in_place=in_place)
        assert (out is x) == in_place and out.dtype == torch.float32
        assert in_place or torch.equal(x, x0)          # (not in place: the input untouched)
        results.append((out, hs, {n: model.quantized[n].data.tobytes() for g in groups for n in g}))
    (o1, h1, q1), (o2, h2, q2) = results
    assert torch.equal(o1, o2)
    assert all(torch.equal(a, b) for a, b in zip(h1, h2))
    assert q1 == q2


@pytest.mark.parametrize("spill_above", [0, None])
def test_staged_rows_come_back_as_put(tmp_path, spill_above):
    """A MoE block's expert activations (each expert its own row count) at row offsets, on disk or in memory."""
    from twinquant.calibration.spill import StagedRows

    torch.manual_seed(0)
    parts = [torch.randn(n, 12).to(torch.bfloat16) for n in (5, 0, 3, 9)]
    st = StagedRows(17, 12, torch.bfloat16, "cpu", tmp_path, spill_above=spill_above)
    assert st.on_disk == (spill_above == 0)
    at = 0
    offsets = []
    for p in parts:
        offsets.append(at)
        st.put(at, p)
        at += p.shape[0]
    for i in (3, 0, 2, 1, 3):
        assert torch.equal(st.get(offsets[i], parts[i].shape[0]), parts[i])
    with pytest.raises(ValueError):
        st.put(0, torch.zeros(2, 11, dtype=torch.bfloat16))
    st.close()
