"""The quantize pipeline end to end, with stock llama.cpp as the oracle.

- RTN into llama.cpp's Q2_K and Q2_0 mixes reproduces `llama_model_quantize` (llama-quantize) byte for byte;
- GPTQ files load in llama.cpp, whose logits match our forward of the same quantized weights;
- GPTQ has a lower output error than RTN on the calibration data.
"""

import ctypes

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import forward
from twinquant.allocation.mixes import assign_types, llama_cpp_mix
from twinquant.pipeline.executor import quantize_model

DIMS = dict(intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)


# hidden 256: K-quants everywhere; hidden 192: rows not divisible by 256 take llama.cpp's fallback types
@pytest.fixture(scope="module", params=[("llama", 256), ("qwen2", 192)], ids=["llama-256", "qwen2-192"])
def f32_gguf(request, tmp_path_factory):
    family, hidden = request.param
    d = tmp_path_factory.mktemp(family)
    model = load_hf_dir(save_tiny(family, d / "hf", tokenizer=True, hidden_size=hidden, **DIMS))
    return write_gguf(model, d / "f32.gguf", "F32")


def llama_quantize(src, dst, ftype: int):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


@pytest.mark.parametrize("ftype", ["Q2_K", "Q2_0"])
def test_rtn_2bit_mix_is_byte_identical_to_llama_quantize(f32_gguf, tmp_path, ftype):
    theirs = gguf.GGUFReader(llama_quantize(f32_gguf, tmp_path / "theirs.gguf", gguf.LlamaFileType[f"MOSTLY_{ftype}"]))
    model = load_gguf(f32_gguf).materialize()
    types = {n: t.name for n, t in llama_cpp_mix(model.spec, ftype, model.tensor_names()).items()
             if t.name != "F32"}
    if ftype == "Q2_K":
        assert "Q3_K" in types.values() and ("Q2_K" in types.values()) == (model.spec.hidden % 256 == 0)
    else:                   # 64-blocks: 256 and 192 wide rows both take Q2_0
        assert "Q2_0" in types.values() and "Q4_0" not in types.values()
    quantize_model(model, types, "rtn", progress=False)
    ours = gguf.GGUFReader(write_gguf(model, tmp_path / "ours.gguf", "F16"))
    th = {t.name: t for t in theirs.tensors}
    for t in ours.tensors:
        assert t.tensor_type == th[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(th[t.name].data)), t.name


@pytest.mark.parametrize("default", ["Q4_K", "Q2_0"])
def test_gptq_file_runs_in_llama_cpp_and_beats_rtn(f32_gguf, tmp_path, default):
    """Q2_0: GPTQ's fits search a signed scale (the heavier side gets the extra level), which llama.cpp's own
    quantizer never writes; its kernels must run such blocks as they are."""
    import llama_cpp

    torch.manual_seed(0)
    windows = torch.randint(3, 320, (4, 64))
    reports = {}
    toks = torch.randint(3, 320, (40,))
    original = forward(load_gguf(f32_gguf), toks[None])[0]
    for method in ("rtn", "gptq"):
        model = load_gguf(f32_gguf).materialize()
        types = {c.name: c.type.name for c in assign_types(model.spec, model.tensor_names(), mix=None,
                                                            default=default) if c.name.startswith("blk.")
                 and c.type.name != "F32"}                   # Q4_K, or its fallback Q5_0 for 192-wide rows
        reports[method] = quantize_model(model, types, method, windows, progress=False)
        if method == "gptq":
            if default == "Q2_0":
                d = np.concatenate([np.asarray(t.data).reshape(-1, 18)[:, :2].copy().view(np.float16).ravel()
                                    for t in gguf.GGUFReader(write_gguf(model, tmp_path / "g.gguf", "F32")).tensors
                                    if t.tensor_type.name == "Q2_0"])
                assert (d < 0).any() and (d > 0).any()       # both signs of d reach llama.cpp
            path = write_gguf(model, tmp_path / "gptq.gguf", "F32")
            back = load_gguf(path)
            ours = forward(back, toks[None])[0]
            assert torch.equal(ours, forward(model, toks[None])[0])    # the file holds what we quantized
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                                  type_k=0, type_v=0)
            llm.eval(toks.tolist())
            theirs = torch.from_numpy(np.array(llm.scores[:40], dtype=np.float32))
            # llama.cpp's CPU matmuls round the activations to 8 bits (Q8_K blocks), so a difference remains
            # (the same size with Q8_0 weights); it must stay well below the weight quantization's own effect
            mismatch, quant_effect = (theirs - ours).abs().mean(), (ours - original).abs().mean()
            assert mismatch < 0.25 * quant_effect, (mismatch, quant_effect)
            assert (theirs - ours).abs().max() < 0.06 * ours.abs().max()
    err = {m: sum(t.out_error for t in r.tensors) for m, r in reports.items()}
    assert err["gptq"] < 0.9 * err["rtn"], err


def test_staged_block_takes_each_hessian_after_the_groups_before_it_are_quantized(tmp_path):
    """The executor's staged pass (GPTQ's "true sequential" order): when a group is quantized, its Hessian is the
    one a whole forward gives with the groups before it quantized and the rest still float (the oracle:
    block_hessians at that moment); the outputs it returns are the block's with every weight quantized."""
    from twinquant.algorithms.backends import get_quantizer
    from twinquant.calibration.blocks import block_hessians, block_pass, staged_block, stages
    from twinquant.model import roles
    from twinquant.pipeline.executor import quantize_tensor

    model = load_hf_dir(save_tiny("qwen2", tmp_path / "hf", hidden_size=256, **DIMS)).materialize()
    layer = 1
    assert stages(model, layer)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 256)
    groups = roles.shared_input_groups(layer, model.spec)
    wanted = {n for g in groups for n in g}
    quantizer = get_quantizer("gptq")
    seen = []

    def quantize_group(g, H):
        oracle = block_hessians(model, layer, x, {g[0]}).hessian(g[0])
        assert torch.allclose(H, oracle, rtol=1e-4, atol=1e-5 * oracle.abs().max().item()), g
        seen.append(g)
        for n in g:
            quantize_tensor(model, n, "Q4_K", quantizer, H)

    out = staged_block(model, layer, x, wanted, quantize_group)
    assert seen == groups
    assert torch.allclose(out, block_pass(model, layer, x), rtol=1e-5, atol=1e-5)
    skipped = []
    staged_block(model, layer, x, set(), lambda g, H: skipped.append(H))
    assert skipped == [None] * 4         # nothing wanted: no Hessian is computed
