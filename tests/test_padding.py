"""Exact block-alignment padding: the padded model computes the same function (float64, our forward), stock
llama.cpp runs the padded F32 export with the unpadded model's logits, rotations on the padded width stay exact,
and a padded model gets real K-quant types from llama.cpp's Q2_K mix."""

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.export.padding import pad_model, padded_heads, padding_records
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.io.metadata import SCHEMA_VERSION
from twinquant.io.metadata import read_metadata
from twinquant.model.forward import forward
from twinquant.model.model import Model
from twinquant.model.spec import ModelSpec
from twinquant.allocation.mixes import assign_types
from twinquant.rotation import rotate as R

# (family, model dims, pad options, padded (hidden, intermediate, n_heads))
CASES = {
    "llama-192": ("llama", dict(hidden_size=192), {}, (256, 96, 4)),        # head_dim 48 != 256 / 4
    "qwen2-96-ffn": ("qwen2", dict(hidden_size=96, intermediate_size=160, num_attention_heads=3,
                                   num_key_value_heads=1), dict(ffn=True), (256, 256, 8)),   # qwen2: heads = h'/hd
    "qwen3-96-ffn-heads": ("qwen3", dict(hidden_size=96, intermediate_size=160), dict(ffn=True, heads=True),
                           (256, 256, 32)),                                 # q/k norms with eps' (q, k scaled)
    "llama-tied-heads": ("llama-tied", dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2),
                         dict(heads=True), (256, 96, 8)),                   # a zero head appended to each group
}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(params=list(CASES))
def case(request, tmp_path):
    family, dims, opts, want = CASES[request.param]
    model = load_hf_dir(save_tiny(family, tmp_path / "hf", tokenizer=True, **dims)).to(dtype=torch.float64)
    return model, opts, want


def test_padding_is_exact(case):
    model, opts, want = case
    x = torch.randint(0, model.spec.vocab, (2, 40))
    ref = forward(model, x)
    padded = pad_model(model, 256, **opts)
    s = padded.spec
    assert (s.hidden, s.intermediate, s.n_heads) == want
    assert (s.head_dim, s.n_kv_heads, s.tied_embeddings) == (model.spec.head_dim, model.spec.n_kv_heads,
                                                            model.spec.tied_embeddings)
    assert s.rms_eps == pytest.approx(model.spec.rms_eps * model.spec.hidden / s.hidden, rel=1e-15)
    assert padding_records(padded) == [padded.history[-1]] and padded.history[-1].to == 256
    assert model.spec.hidden < 256 and not model.history          # the original is untouched
    assert _rel(forward(padded, x), ref) < 1e-9
    emb = padded.get("token_embd.weight")
    assert emb.shape[1] == 256 and torch.all(emb[:, model.spec.hidden:] == 0)


def test_stock_llama_cpp_runs_the_padded_export(case, tmp_path):
    import llama_cpp

    model, opts, _ = case
    toks = torch.randint(3, model.spec.vocab, (40,))
    ref = forward(model, toks[None])[0]
    path = write_gguf(pad_model(model, 256, **opts), tmp_path / "p.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:40], dtype=np.float32))
    assert _rel(theirs, ref) < 1e-4
    meta = read_metadata(gguf.GGUFReader(path))
    assert meta["version"] == SCHEMA_VERSION and meta["padding"][0]["hidden"] == model.spec.hidden
    back = load_gguf(path)                                           # our loader: same function, record kept
    assert back.spec.hidden == 256 and padding_records(back)[0].to == 256
    assert _rel(forward(back, toks[None])[0], ref) < 1e-5


def test_rotation_after_padding_is_exact(case):
    model, opts, _ = case
    x = torch.randint(0, model.spec.vocab, (1, 30))
    ref = forward(model, x)
    padded = R.rotate(pad_model(model, 256, **opts), "rh", seed=3, online=("r3", "r4"))
    r1 = next(r for r in padded.history if getattr(r, "kind", None) == "R1")
    assert r1.n == 256                                            # R1 acts on the padded width
    assert _rel(forward(padded, x), ref) < 1e-9


def test_padding_after_rotation_is_exact(case):
    model, opts, _ = case
    x = torch.randint(0, model.spec.vocab, (1, 30))
    ref = forward(model, x)
    rotated = R.rotate(model, "rh", seed=3, online=("r3",))
    assert _rel(forward(pad_model(rotated, 256, **opts), x), ref) < 1e-9


def test_fuse_pad_then_rotate_keeps_tied_head(tmp_path):
    """Fused (uniform) gains stay uniform over the padded width, so R1 after padding is exact, and a tied head
    whose final-norm gain is 1 stays tied."""
    model = load_hf_dir(save_tiny("llama-tied", tmp_path / "hf", tokenizer=True, hidden_size=96))
    model.to(dtype=torch.float64)
    model.set("output_norm.weight", torch.ones(96, dtype=torch.float64))     # a tied model with unit final gain
    x = torch.randint(0, model.spec.vocab, (1, 30))
    ref = forward(model, x)
    R.fuse_norms(model)
    assert model.spec.tied_embeddings
    padded = pad_model(model, 256)
    assert padded.spec.tied_embeddings
    g = padded.get("blk.0.attn_norm.weight")
    assert torch.allclose(g, torch.full_like(g, (96 / 256) ** 0.5))      # uniform, padded channels included
    from twinquant.transforms.hadamard import RandomizedHadamard

    R.rotate_residual(padded, RandomizedHadamard(256, 1).matrix(torch.float64), {"type": "rh", "n": 256, "seed": 1})
    assert padded.spec.tied_embeddings
    assert _rel(forward(padded, x), ref) < 1e-9


def test_padded_model_gets_real_k_quants(tmp_path):
    import llama_cpp

    from twinquant.pipeline.executor import quantize_model

    model = load_hf_dir(save_tiny("llama", tmp_path / "hf", tokenizer=True, hidden_size=96, intermediate_size=160,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64))   # q_dim 256
    k_quants = {gguf.GGMLQuantizationType[t] for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}

    def choices(m):
        return [c for c in assign_types(m.spec, m.tensor_names(), mix="llama.cpp:Q2_K") if c.type.name != "F32"]

    assert any(c.fell_back for c in choices(model))                  # unpadded: 96 / 160-wide rows fall back
    padded = pad_model(model, 256, ffn=True)
    chosen = choices(padded)
    assert not any(c.fell_back for c in chosen), [c for c in chosen if c.fell_back]
    assert {c.type for c in chosen} <= k_quants and {c.type.name for c in chosen} >= {"Q2_K", "Q3_K"}

    quantize_model(padded, {c.name: c.type.name for c in chosen}, "rtn", progress=False)
    path = write_gguf(padded, tmp_path / "q2k.gguf", "F32")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert all(types[c.name] == c.type for c in chosen)
    toks = torch.randint(3, model.spec.vocab, (40,))
    ours = forward(padded, toks[None])[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:40], dtype=np.float32))
    # llama.cpp rounds activations to 8 bits for K-quant matmuls (see test_quantize): close, not identical
    assert _rel(theirs, ours) < 0.06


def _spec(**over):
    base = dict(arch="llama", n_layers=1, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, head_dim=64,
                vocab=100, rope_theta=1e4, rms_eps=1e-5, tied_embeddings=True, qkv_bias=False, qk_norm=False)
    return ModelSpec(**{**base, **over})


def test_head_padding_for_real_shapes():
    # SmolLM2-135M: 9 heads x 64 (3 kv) -> 12; Qwen2.5-0.5B: hidden 896 -> 1024 needs 16 heads of 64 in llama.cpp
    assert padded_heads(_spec(), 256) == 12
    smol = pad_model(Model(spec=_spec()), 256, ffn=True, heads=True).spec
    assert (smol.hidden, smol.intermediate, smol.n_heads, smol.q_dim) == (768, 1536, 12, 768)
    qwen = _spec(arch="qwen2", hidden=896, intermediate=4864, n_heads=14, n_kv_heads=2, qkv_bias=True)
    padded = pad_model(Model(spec=qwen), 256).spec
    assert (padded.hidden, padded.n_heads, padded.q_dim, padded.intermediate) == (1024, 16, 1024, 4864)


def test_padding_errors_and_no_op(tmp_path):
    aligned = Model(spec=_spec(hidden=512, n_heads=8, n_kv_heads=2))
    assert pad_model(aligned, 256) is aligned                        # nothing to pad
    qwen_aligned = Model(spec=_spec(arch="qwen2", hidden=512, n_heads=8, n_kv_heads=2, head_dim=64))
    assert pad_model(qwen_aligned, 256, heads=True) is qwen_aligned  # qwen2: q heads follow the hidden width
    with pytest.raises(TwinquantError, match="query heads"):         # qwen2 with head_dim 24: 256 / 24 heads
        pad_model(Model(spec=_spec(arch="qwen2", hidden=96, n_heads=4, n_kv_heads=2, head_dim=24)), 256)
    model = load_hf_dir(save_tiny("llama", tmp_path / "hf", tokenizer=True, hidden_size=96))
    from twinquant.pipeline.executor import quantize_model

    quantize_model(model, {"blk.0.ffn_up.weight": "Q8_0"}, "rtn", progress=False)
    with pytest.raises(TwinquantError, match="before quantizing"):
        pad_model(model, 256)


def test_online_transform_on_a_widened_input_is_refused(tmp_path):
    model = load_hf_dir(save_tiny("llama", tmp_path / "hf", tokenizer=True, hidden_size=96, intermediate_size=160))
    R.add_online_ffn_down(model.materialize(), seed=1)
    assert pad_model(model, 256).spec.hidden == 256                   # R4 reads the FFN width: unchanged
    with pytest.raises(TwinquantError, match="online input transform"):
        pad_model(model, 256, ffn=True)
