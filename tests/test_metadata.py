"""twinquant.* metadata: rotations and online transforms survive a GGUF round trip; version rules; stock
llama.cpp runs a rotated (stock-compatible) export."""

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.io.metadata import read_metadata
from twinquant.model import history
from twinquant.model.forward import forward
from twinquant.rotation.rotate import rotate


@pytest.fixture()
def tiny(tmp_path):
    return load_hf_dir(save_tiny("qwen2", tmp_path / "hf", tokenizer=True)).materialize()


def _rotated(model, online):
    model.to(dtype=torch.float64)
    rotate(model, "rh", seed=5, online=online)
    return model.to(dtype=torch.float32)


def test_online_transforms_round_trip(tiny, tmp_path):
    x = torch.randint(0, tiny.spec.vocab, (1, 30))
    want = forward(tiny, x)
    m = _rotated(tiny, ("r4", "r3"))
    with pytest.warns(UserWarning, match="online transforms"):
        path = write_gguf(m, tmp_path / "r.gguf", "F32")
    meta = read_metadata(gguf.GGUFReader(path))
    assert meta["stock_compatible"] is False and meta["online"]["qk"]["n"] == tiny.spec.head_dim
    assert meta["online"]["qk"]["randomized"]["signs"]          # bit-packed signs stored, not only the seed
    back = load_gguf(path)
    kinds = [r.to_dict()["kind"] for r in back.history]
    assert back.needs_online and kinds == ["fuse_norms", "R1", "R2", "R4", "R3"]
    assert back.history == m.history and all(type(r) is not history.Other for r in back.history)
    assert (forward(back, x) - want).abs().max() < 1e-4 * want.abs().max()


def test_stock_llama_cpp_runs_rotated_export(tiny, tmp_path):
    import llama_cpp

    toks = torch.randint(3, tiny.spec.vocab, (30,))
    want = forward(tiny, toks[None])[0]
    path = write_gguf(_rotated(tiny, ()), tmp_path / "r.gguf", "F32")
    assert read_metadata(gguf.GGUFReader(path))["stock_compatible"] is True
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:30], dtype=np.float32))
    assert (theirs - want).abs().max() < 1e-4 * want.abs().max()


def _with_version(src, dst, version, extra=None):
    """Copy a GGUF, replacing twinquant.version (and adding keys)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        v = version if k == "twinquant.version" else f.contents()
        vt = f.types[0]
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, v, vt, sub_type=f.types[-1])
        else:
            w.add_key_value(k, v, vt)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=np.array(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_version_rules(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "m.gguf", "F32")
    newer_minor = _with_version(path, tmp_path / "minor.gguf", "0.9.0", {"twinquant.future_key": "x"})
    with pytest.warns(UserWarning, match="future_key"):
        m = load_gguf(newer_minor)
    x = torch.randint(0, tiny.spec.vocab, (1, 10))
    assert torch.equal(forward(m, x), forward(tiny, x))
    newer_major = _with_version(path, tmp_path / "major.gguf", "1.0.0")
    with pytest.raises(TwinquantError, match="upgrade twinquant"):
        load_gguf(newer_major)


def test_history_records_round_trip_and_refuse_malformed_ones():
    recs = [history.FuseNorms(), history.Rotation("R1", "ro", 256, 3, 10, 3, 1.5, 1.25),
            history.Rotation("R2", "rh", 64, 4), history.Padding(256, 192, 256, 320, 512, 3, 4, 1e-5, 7.5e-6, 1.0)]
    dicts = history.to_list(recs)
    assert dicts[0] == {"kind": "fuse_norms"} and dicts[2] == {"kind": "R2", "type": "rh", "n": 64, "seed": 4}
    assert dicts[3]["kind"] == "pad" and dicts[3]["to"] == 256
    assert history.from_list(dicts) == recs
    assert history.paddings(recs) == recs[3:] and history.without_padding(recs) == recs[:3]
    other = {"kind": "R9", "n": 8}                  # a kind from a newer writer: kept, written back unchanged
    assert history.to_list(history.from_list([other])) == [other]
    for bad in ([{"n": 8}], [{"kind": "R1", "type": "rh"}], [{"kind": "pad", "hidden": 1}], {"kind": "R1"}):
        with pytest.raises(TwinquantError, match="twinquant.rotation"):
            history.from_list(bad)
