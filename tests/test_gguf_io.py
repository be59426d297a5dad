"""Float GGUF export and the GGUF loader: tiny Llama/Qwen2/Qwen3 models written with gguf-py load back with
identical logits, and stock llama.cpp runs the exported files."""

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import FAMILIES, save_tiny
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import forward


@pytest.fixture(params=list(FAMILIES))
def tiny(request, tmp_path):
    return load_hf_dir(save_tiny(request.param, tmp_path / "hf", tokenizer=True))


def test_f32_round_trip_is_exact(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "m.gguf", "F32")
    back = load_gguf(path)
    a, b = back.spec.to_dict(), tiny.spec.to_dict()
    assert abs(a.pop("rms_eps") - b.pop("rms_eps")) < 1e-12      # GGUF stores eps as float32
    assert {**a, "name": ""} == {**b, "name": ""}
    x = torch.randint(0, tiny.spec.vocab, (2, 50))
    assert torch.equal(forward(back, x), forward(tiny, x))
    assert back.tokenizer.encode("The lazy fox, 345.") == tiny.tokenizer.encode("The lazy fox, 345.")
    r = gguf.GGUFReader(path)
    assert r.fields["twinquant.version"].contents().count(".") == 2
    assert r.fields["general.architecture"].contents() == tiny.spec.arch


@pytest.mark.parametrize("ftype,tol", [("F16", 2e-2), ("BF16", 1e-1)])
def test_half_precision_exports(tiny, tmp_path, ftype, tol):
    back = load_gguf(write_gguf(tiny, tmp_path / "m.gguf", ftype))
    assert back.tensor_info("blk.0.ffn_up.weight").source_type == ftype
    assert back.tensor_info("blk.0.attn_norm.weight").source_type == "F32"     # 1-D tensors stay F32
    x = torch.randint(0, tiny.spec.vocab, (1, 40))
    a, b = forward(tiny, x), forward(back, x)
    assert (a - b).abs().max() <= tol * a.abs().max()


def test_stock_llama_cpp_runs_the_export(tiny, tmp_path):
    import llama_cpp

    path = write_gguf(tiny, tmp_path / "m.gguf", "F32")
    # F32 KV cache (type 0): llama.cpp's default F16 cache alone costs ~1e-3 of the logit range
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    toks = torch.randint(3, tiny.spec.vocab, (40,)).tolist()
    llm.eval(toks)
    theirs = torch.from_numpy(np.array(llm.scores[: len(toks)], dtype=np.float32))
    ours = forward(tiny, torch.tensor([toks]))[0]
    rel = (theirs - ours).abs().max() / ours.abs().max()
    assert rel < 1e-4, rel.item()


def test_failed_write_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(TwinquantError):
        write_gguf(tiny, out, "Q2_K")
    tiny.tokenizer = None
    with pytest.raises(TwinquantError, match="tokenizer"):
        write_gguf(tiny, out, "F32")
    assert list(tmp_path.glob("m.gguf*")) == []
