"""A mixture-of-experts block quantized a batch of experts at a time (`calibration.moe_blocks`): experts read one
by one from the source, never a whole stack; each expert's Hessians from the inputs it really sees (down's after
its gate/up are quantized); the block's outputs those of the quantized block; the same file whatever the batch."""

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_fused_experts, save_tiny
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model import roles
from twinquant.model.model import Model


def _quantize(src, out, method="gptq", fmt="Q4_0", **opts):
    import dataclasses

    from twinquant.pipeline import Options, quantize
    from twinquant.pipeline.recipe import load_recipe

    recipe = dataclasses.replace(load_recipe("default"), method=method, mix=None, format=fmt, rotation="none",
                                 calib_tokens=512, calib_ctx=64)
    return quantize(str(src), out, recipe, Options(quiet=True, stream=True, **opts))


@pytest.mark.parametrize("kind", ["hf", "hf-fused", "gguf-f16", "gguf-q4_0"])
def test_one_expert_is_read_alone_as_the_stack_holds_it(kind, tmp_path):
    src = save_tiny("qwen2moe", tmp_path / "hf", tokenizer=True)
    if kind == "hf-fused":
        src = save_fused_experts(src, tmp_path / "fused")
    if kind == "gguf-f16":
        src = write_gguf(load_hf_dir(src), tmp_path / "m.gguf", "F16")
    if kind == "gguf-q4_0":
        src = _quantize(src, tmp_path / "q.gguf", method="rtn").path
    m = load_gguf(src) if kind.startswith("gguf") else load_hf_dir(src)
    for n in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight"):
        whole = m.source.load(n)
        for e in (0, 3, 7):
            assert torch.equal(m.source.load_expert(n, e), whole[e]), (n, e)
            assert torch.equal(m.expert(n, e), whole[e])
        assert n not in m.tensors                           # reading an expert does not materialise the stack


def test_quantize_reads_each_expert_once_and_never_a_stack(tmp_path, monkeypatch):
    """A streamed quantization of a MoE model (DeepSeek-V3: MLA, shared experts, a dense first block) asks the
    source for each expert of each stack once and never for a whole stack; batches of 3 experts write the bytes of
    one batch of all 8 (gptq_many's codes are one-by-one GPTQ's)."""
    from twinquant.calibration import moe_blocks

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True)
    whole = _quantize(src, tmp_path / "whole.gguf")
    reads: dict = {}
    real_expert, real_get = Model.expert, Model.get

    def expert(self, name, e):
        reads[(name, e)] = reads.get((name, e), 0) + 1
        return real_expert(self, name, e)

    def get(self, name):
        assert not roles.is_expert_stack(name), f"{name} materialised"
        return real_get(self, name)

    monkeypatch.setattr(Model, "expert", expert)
    monkeypatch.setattr(Model, "get", get)
    monkeypatch.setattr(moe_blocks, "experts_per_batch", lambda rows, cols, device: 3)
    batched = _quantize(src, tmp_path / "batched.gguf")
    stacks = [f"blk.{i}.ffn_{p}_exps.weight" for i in (1, 2) for p in ("gate", "up", "down")]
    assert reads == {(n, e): 1 for n in stacks for e in range(8)}
    assert batched.path.read_bytes() == whole.path.read_bytes()
    rep = {t.name: t for t in batched.report.tensors}
    assert sum(rep["blk.1.ffn_gate_exps.weight"].expert_tokens) == 512 * 2
    assert rep["blk.1.ffn_down_exps.weight"].out_error < 0.05


@pytest.mark.parametrize("family,over", [("qwen2moe", dict(shared_expert_intermediate_size=64)),
                                         ("deepseek_v3", dict(qk_nope_head_dim=32, q_lora_rank=64))])
def test_each_stack_is_quantized_with_the_hessians_of_the_inputs_it_sees(family, over, tmp_path):
    """The oracle is the block with every weight quantized: its per-expert Hessians (completed with the pool as
    `HessianHook.expert_hessians` completes them) are the ones each stack was quantized with, since the attention
    is quantized before the experts see its outputs, and gate/up before down sees their activations; the
    returned outputs are that block's."""
    from twinquant.algorithms.backends import get_quantizer
    from twinquant.calibration.blocks import block_hessians, block_pass
    from twinquant.calibration.moe_blocks import staged_moe_block
    from twinquant.pipeline.executor import StackQuantizer, quantize_tensor

    model = load_hf_dir(save_tiny(family, tmp_path / "hf", **over)).materialize()
    s = model.spec
    layer = s.n_layers - 1
    torch.manual_seed(0)
    x0 = torch.randn(3, 16, s.hidden)
    groups = roles.shared_input_groups(layer, s)
    wanted = {n for g in groups for n in g}
    gptq = get_quantizer("gptq")
    used: dict = {}

    class Recording(StackQuantizer):
        def batch(self, first, W, hessians):
            for j, H in enumerate(hessians):
                used[(self.name, first + j)] = H.clone()
            return super().batch(first, W, hessians)

    def group(g, H):
        for n in g:
            quantize_tensor(model, n, "Q4_0", gptq, H)

    def stack(n, Hs):
        quantize_tensor(model, n, "Q8_0", gptq, None, None, Hs)

    out = staged_moe_block(model, layer, x0.clone(), wanted, group, stack,
                           lambda n: Recording(model, n, "Q4_0", gptq), batch=3)
    stacks = [roles.name(t, layer) for t in roles.EXPERTS]
    assert all(n in model.quantized for n in stacks) and not any(n in model.tensors for n in stacks)
    assert torch.allclose(out, block_pass(model, layer, x0), rtol=1e-4, atol=1e-4)
    hooks = block_hessians(model, layer, x0, set(stacks))
    for n, cols in ((stacks[0], s.hidden), (stacks[1], s.hidden), (stacks[2], s.expert_ffn)):
        key = stacks[2] if n == stacks[2] else stacks[0]
        want, tokens = hooks.expert_hessians(key, s.n_experts, cols)
        assert min(tokens) < cols, tokens           # the completion with the pool is exercised
        for e in range(s.n_experts):
            scale = want[e].abs().max().item()
            assert torch.allclose(used[(n, e)], want[e], rtol=1e-3, atol=1e-4 * scale), (n, e)


def test_rtn_without_calibration_streams_experts_too(tmp_path, monkeypatch):
    """No calibration (RTN): a stack goes a batch of experts at a time as well, into llama.cpp's bytes."""
    src = save_tiny("qwen3moe", tmp_path / "hf", tokenizer=True)
    whole = _quantize(src, tmp_path / "a.gguf", method="rtn")
    from twinquant.pipeline import executor

    real_get = Model.get
    monkeypatch.setattr(Model, "get", lambda self, n: (_ for _ in ()).throw(AssertionError(n))
                        if roles.is_expert_stack(n) else real_get(self, n))
    monkeypatch.setattr(executor, "experts_per_batch", lambda rows, cols, device: 3)
    b = _quantize(src, tmp_path / "b.gguf", method="rtn")
    assert b.path.read_bytes() == whole.path.read_bytes()
    r = gguf.GGUFReader(b.path)
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and np.asarray(t.data).shape[0] == 8


@pytest.mark.parametrize("family", ["qwen2moe", "deepseek_v3"])
def test_a_rotated_expert_is_its_slice_of_the_rotated_stack(family, tmp_path):
    """The lazy R1 view rotates one expert alone (router, gate/up read the residual; down writes it)."""
    from twinquant.pipeline.prepare import Preparation, apply

    m = load_hf_dir(save_tiny(family, tmp_path / "hf"))
    r = apply(m, Preparation(rotation="rh", seed=3))
    layer = m.spec.n_layers - 1
    for t in roles.EXPERTS:
        n = roles.name(t, layer)
        whole = r.source.load(n)
        assert not torch.equal(whole, m.source.load(n))
        for e in (0, 5):
            assert torch.allclose(r.expert(n, e), whole[e], rtol=0, atol=1e-6), (n, e)


def test_an_expert_no_calibration_token_reaches_takes_the_pool_and_spilled_activations_change_nothing(
        tmp_path, monkeypatch):
    """DeepSeek-V3 with expert 5's selection bias at -100: no token reaches it. It is quantized with the pooled
    Hessians (the report says 0 tokens; its error is that of a quantized expert, not a dropped one), and the run
    whose expert activations go to a temporary file (as past 2 GiB on a CPU) writes the same bytes."""
    from safetensors.torch import load_file, save_file

    from twinquant.calibration import spill

    src = save_tiny("deepseek_v3", tmp_path / "hf", tokenizer=True)
    sd = load_file(str(src / "model.safetensors"))
    for i in (1, 2):
        sd[f"model.layers.{i}.mlp.gate.e_score_correction_bias"][5] = -100.0
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    held = _quantize(src, tmp_path / "held.gguf")
    monkeypatch.setattr(spill, "SPILL_ABOVE", 0)
    spilled = _quantize(src, tmp_path / "spilled.gguf")
    assert spilled.path.read_bytes() == held.path.read_bytes()
    rep = {t.name: t for t in held.report.tensors}
    for n in ("blk.1.ffn_gate_exps.weight", "blk.2.ffn_down_exps.weight"):
        assert rep[n].expert_tokens[5] == 0 and sum(rep[n].expert_tokens) == 512 * 2
        assert 0 < rep[n].rel_error < 0.3
    q = load_gguf(held.path)
    f = load_hf_dir(src)
    for n in ("blk.1.ffn_up_exps.weight", "blk.2.ffn_down_exps.weight"):
        err = (q.expert(n, 5) - f.expert(n, 5)).norm() / f.expert(n, 5).norm()
        assert 0 < err < 0.3, (n, err)


def test_a_block_left_float_runs_as_the_forward_does_in_bfloat16(tmp_path):
    """Nothing wanted (stacks stay float), a bfloat16 model: the staged block's outputs are the forward's."""
    from twinquant.calibration.blocks import block_pass
    from twinquant.calibration.moe_blocks import staged_moe_block

    model = load_hf_dir(save_tiny("qwen2moe", tmp_path / "hf")).materialize().to(dtype=torch.bfloat16)
    x0 = torch.randn(2, 16, model.spec.hidden, generator=torch.Generator().manual_seed(0))
    calls = []
    out = staged_moe_block(model, 1, x0.clone(), set(), lambda g, H: calls.append(H), None, lambda n: None)
    assert calls and all(H is None for H in calls)
    want = block_pass(model, 1, x0)
    assert (out - want).abs().max() <= 2e-2 * want.abs().max()
