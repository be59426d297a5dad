"""R1 through mixture-of-experts and latent-attention models (issue 18): the residual rotation is exact through the
router, the routed experts' stacks, the shared expert and its gate, and DeepSeek's q_a / kv_a_mqa; R2 applies where
attention is ordinary and is recorded as skipped for latent attention; the streamed (lazy) rotation gives the bits
of the eager one; a rotated, quantized file runs in stock llama.cpp."""

import gguf
import pytest
import torch

from tests.test_moe import _close_but_routing, _moe_quantize, _stock_logits
from tests.tiny_models import DEEPSEEK_FAMILIES, MOE_FAMILIES, save_tiny
from twinquant.io.gguf_read import load_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model import history, roles
from twinquant.model.forward import forward
from twinquant.pipeline.prepare import Preparation, apply

FAMILIES = [*MOE_FAMILIES, *DEEPSEEK_FAMILIES]


@pytest.mark.parametrize("family", FAMILIES)
def test_rh_rotation_keeps_the_function(family, tmp_path):
    """Float64: the rotated model's logits equal the original's (routing included) and every residual reader /
    writer changed; MLA records R2 as skipped, with a reason."""
    from twinquant.rotation.rotate import rotate

    model = load_hf_dir(save_tiny(family, tmp_path / "hf")).materialize().to(dtype=torch.float64)
    x = torch.randint(3, model.spec.vocab, (2, 33), generator=torch.Generator().manual_seed(1))
    want = forward(model, x)
    before = {n: model.get(n).clone() for n in model.tensor_names()}
    rotate(model, "rh", seed=3)
    got = forward(model, x)
    assert torch.allclose(got, want, atol=1e-9, rtol=1e-9), (got - want).abs().max()
    for i in range(model.spec.n_layers):
        for n in [*(m for fed in roles.norm_feeds(model.spec, i).values() for m in fed),
                  *roles.residual_writers(model.spec, i)]:
            assert not torch.allclose(model.get(n), before[n]), n
    kinds = [(type(r).__name__, getattr(r, "kind", getattr(r, "what", None))) for r in model.history]
    if model.spec.mla:
        assert ("Skipped", "R2") in kinds and ("Rotation", "R2") not in kinds
        assert "latent attention" in next(r for r in model.history if isinstance(r, history.Skipped)).why
    else:
        assert ("Rotation", "R2") in kinds
    assert ("Rotation", "R1") in kinds


@pytest.mark.parametrize("family", ["qwen2moe", "deepseek_v3"])
def test_streamed_rotation_gives_the_eager_bits(family, tmp_path):
    src = save_tiny(family, tmp_path / "hf")
    prep = Preparation(rotation="rh", seed=5)
    eager = apply(load_hf_dir(src), prep, stream=False)
    lazy = apply(load_hf_dir(src), prep, stream=True)
    assert lazy.source is not None and not lazy.tensors
    assert lazy.tensor_names() == eager.tensor_names()
    for n in eager.tensor_names():
        assert torch.equal(lazy.get(n), eager.get(n)), n
    assert history.to_list(lazy.history) == history.to_list(eager.history)


@pytest.mark.parametrize("family", ["qwen2moe", "deepseek_v3"])
def test_rotated_gptq_file_runs_in_stock_llama_cpp(family, tmp_path):
    """The rotated float model exported as F32 runs in stock llama.cpp as in our forward (1e-4: the structure is
    exact). GPTQ with per-expert Hessians on the rotated model; the file records the rotation (and the skipped R2
    of latent attention), keeps the router F32 and runs in stock llama.cpp close to our forward of its weights
    (DeepSeek's sigmoid routing over groups flips on more near-ties under llama.cpp's 8-bit activation rounding
    in this tiny random model: 0.8 of the positions, not 0.9)."""
    from tests.test_moe import _close
    from twinquant.io.gguf_write import write_gguf

    src = save_tiny(family, tmp_path / "hf", tokenizer=True)
    rotated = apply(load_hf_dir(src), Preparation(rotation="rh", seed=0), stream=False)
    f32 = write_gguf(rotated, tmp_path / "rotated.gguf", "F32")
    toks = torch.randint(3, rotated.spec.vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    _close(_stock_logits(f32, toks), forward(rotated, torch.tensor([toks]))[0])
    res = _moe_quantize(src, tmp_path / "q.gguf", rotation="rh")
    r = gguf.GGUFReader(res.path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    layer = 1
    assert types[f"blk.{layer}.ffn_gate_inp.weight"] == "F32" and types[f"blk.{layer}.ffn_up_exps.weight"] == "Q4_0"
    q = load_gguf(res.path)
    kinds = [r.to_dict().get("kind") for r in q.history]
    assert "fuse_norms" in kinds and "R1" in kinds
    assert ("skipped" in kinds) == q.spec.mla and ("R2" in kinds) != q.spec.mla
    _close_but_routing(_stock_logits(res.path, toks), forward(q, torch.tensor([toks]))[0],
                       0.8 if q.spec.mla else 0.9)
    assert q.quant_record["rotation"] == "rh"
