"""Layer duplication: topology, per-copy parameters, exactness of the identity cases, GGUF round trip, runtime."""

import json

import gguf
import numpy as np
import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.duplication.expand import expand_duplicates
from twinquant.model.copies import CopyParams, ParamStore
from twinquant.model.topology import Budget, parse_topology, topology_of
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.hf import load_hf_dir
from twinquant.model.forward import KVCache, forward
from twinquant.model.layout import Layout
from twinquant.model.model import Model
from twinquant.pipeline.duplicate import DuplicateOptions, duplicate


@pytest.fixture
def tiny(tmp_path):
    d = save_tiny("llama", tmp_path / "hf", tokenizer=True, num_hidden_layers=3)
    return load_hf_dir(d).materialize()


def tokens(model, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.spec.vocab, (1, n), generator=g)


def with_topology(model, topo, params=None):
    model.layout, model.dup_params = parse_topology(topo, model.spec.n_layers, params)
    return model


def test_alpha_zero_copy_and_identical_parallel_copies_reproduce_the_base(tiny):
    tiny.to(dtype=torch.float64)
    toks = tokens(tiny)
    base = forward(tiny, toks)
    with_topology(tiny, {"layer_1": {"type": "serial", "copies": 2, "alpha": [0.0]}})
    assert len(tiny.layout.executions()) == 4
    assert torch.equal(forward(tiny, toks), base)                        # α = 0: exactly the identity
    with_topology(tiny, {"layer_1": {"type": "parallel", "copies": 3}})   # weights 1/3 each, nearest rounding
    assert torch.allclose(forward(tiny, toks), base, rtol=0, atol=1e-12)
    # with activation quantization (nearest) in every copy, identical parallel copies equal the quantized base
    params = ParamStore(base={"act_bits": 4})
    tiny.layout, tiny.dup_params = Layout.sequential(3), params
    aq_base = forward(tiny, toks)
    assert not torch.allclose(aq_base, base, atol=1e-3)                  # 4-bit activations do change the output
    with_topology(tiny, {"layer_0": {"type": "parallel", "copies": 2, "weights": [0.25, 0.75]}}, params)
    assert torch.allclose(forward(tiny, toks), aq_base, rtol=0, atol=1e-12)
    # a serial α = 1 copy is a real second pass: it changes the function
    with_topology(tiny, {"layer_1": {"type": "serial", "copies": 2}})
    assert not torch.allclose(forward(tiny, toks), base, atol=1e-3)


def test_parameter_resolution_and_sparse_storage():
    p = ParamStore(base={"act_bits": 8, "clip_ratio": 0.9}, layers={3: {"act_bits": 4}},
                   copies={(3, 1): {"rounding": "stochastic", "seed": 7, "alpha": 0.5}})
    assert p.resolve(0, 0) == CopyParams(act_bits=8, clip_ratio=0.9)
    assert p.resolve(3, 0) == CopyParams(act_bits=4, clip_ratio=0.9)
    assert p.resolve(3, 1) == CopyParams(act_bits=4, clip_ratio=0.9, rounding="stochastic", seed=7, alpha=0.5)
    p.set("copy", {"act_bits": 8, "clip_ratio": 0.9, "alpha": 0.25}, block=5, copy=1)    # only α differs
    assert p.copies[(5, 1)] == {"alpha": 0.25}
    p.set("layer", {"act_bits": 8}, block=6)                                             # = base: not stored
    assert p.to_dict() == {"base": {"act_bits": 8, "clip_ratio": 0.9}, "layers": {"3": {"act_bits": 4}},
                           "copies": {"3.1": {"rounding": "stochastic", "seed": 7, "alpha": 0.5},
                                      "5.1": {"alpha": 0.25}}}
    assert ParamStore.from_dict(p.to_dict()).to_dict() == p.to_dict()
    with pytest.raises(TwinquantError, match="unknown parameter"):
        ParamStore(base={"bits": 2})
    with pytest.raises(TwinquantError, match="clip_ratio"):
        CopyParams(clip_ratio=1.5)


def test_topology_validation():
    with pytest.raises(TwinquantError, match="model has 4 layers"):
        parse_topology({"layer_9": {"type": "serial"}}, 4)
    with pytest.raises(TwinquantError, match="share weights"):
        parse_topology({"layer_1": {"type": "serial", "shared_weight": False}}, 4)
    with pytest.raises(TwinquantError, match="hybrid"):
        parse_topology({"layer_1": {"type": "hybrid"}}, 4)
    with pytest.raises(TwinquantError, match="weights needs 3"):
        parse_topology({"layer_1": {"type": "parallel", "copies": 3, "weights": [1.0]}}, 4)
    topo = {"layer_1": {"type": "serial", "copies": 3, "shared_weight": True},
            "layer_2": {"type": "parallel", "copies": 2, "shared_weight": True, "merge": "weighted_sum",
                        "weights": [0.5, 0.5]}}
    layout, _ = parse_topology(topo, 4)
    assert [(s.block, s.copy) for s in layout.slots if not s.parallel] == [(0, 0), (1, 0), (1, 1), (1, 2), (3, 0)]
    assert topology_of(layout) == topo and layout.extra_executions() == 3


def test_budget_counts_flops_and_memory(tiny):
    b = Budget(max_extra_flops_pct=10.0)
    pct, kv = b.per_execution(tiny)
    assert b.max_layers(tiny) == int(10.0 / pct)
    layout, _ = parse_topology({"layer_0": {"copies": 1 + b.max_layers(tiny)}}, 3)
    assert b.allows(tiny, layout) and b.cost(tiny, layout)["extra_weight_bytes"] == 0
    assert Budget(max_extra_layers=2, max_extra_memory=kv).max_layers(tiny) == 1


def _storage_bytes(model):
    seen, n = set(), 0
    for t in model.tensors.values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            n += t.untyped_storage().nbytes()
    return n


def test_gguf_round_trip_runtime_and_stock_llama_cpp(tiny, tmp_path):
    import llama_cpp

    toks = tokens(tiny, 30)
    plain = forward(tiny, toks)
    plain_bytes = _storage_bytes(tiny)
    params = ParamStore(copies={(1, 1): {"alpha": 0.5}, (2, 1): {"act_bits": 6, "rounding": "stochastic", "seed": 3}})
    with_topology(tiny, {"layer_1": {"type": "serial", "copies": 2},
                         "layer_2": {"type": "parallel", "copies": 2, "weights": [0.6, 0.4]}}, params)
    assert _storage_bytes(tiny) == plain_bytes                      # duplicates hold no weight of their own
    ours = forward(tiny, toks)
    plain_path, dup_path = tmp_path / "plain.gguf", tmp_path / "dup.gguf"
    layout, store = tiny.layout, tiny.dup_params
    tiny.layout, tiny.dup_params = Layout.sequential(3), None
    write_gguf(tiny, plain_path, "F32")
    tiny.layout, tiny.dup_params = layout, store
    with pytest.warns(UserWarning, match="base path"):
        write_gguf(tiny, dup_path, "F32")
    tensor_bytes = lambda p: sum(int(t.n_bytes) for t in gguf.GGUFReader(p).tensors)   # noqa: E731
    assert tensor_bytes(dup_path) == tensor_bytes(plain_path)         # the file holds each weight once
    back = load_gguf(dup_path).materialize()
    assert back.layout == tiny.layout and back.dup_params.to_dict() == store.to_dict()
    assert gguf.GGUFReader(dup_path).fields["twinquant.stock_compatible"].contents() is False
    assert torch.allclose(forward(back, toks), ours, atol=1e-5)      # the runtime runs the full topology
    # cached generation over the duplicated layout equals the uncached forward. Exactly so without activation
    # quantization; with it (nearest rounding: stochastic noise is drawn per call) the two computation orders
    # differ in the last bits, which may flip a rounding on the 6-bit grid at a few positions, never at most.
    back.dup_params = ParamStore(copies={(1, 1): {"alpha": 0.5}})
    cache = KVCache.empty(back, 1, 40)
    stepped = torch.cat([forward(back, toks[:, :20], cache), forward(back, toks[:, 20:], cache)], 1)
    assert torch.allclose(stepped, forward(back, toks), atol=1e-5)
    back.dup_params = ParamStore(copies={(1, 1): {"alpha": 0.5}, (2, 1): {"act_bits": 6}})
    cache = KVCache.empty(back, 1, 40)
    stepped = torch.cat([forward(back, toks[:, :20], cache), forward(back, toks[:, 20:], cache)], 1)
    off = ((stepped - forward(back, toks)).abs().amax(-1) > 1e-5).sum().item()
    assert off <= 3, f"{off} of 30 positions differ between cached and uncached forwards"
    # stock llama.cpp loads the file and runs the base path
    llm = llama_cpp.Llama(model_path=str(dup_path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:30], dtype=np.float32))
    assert (theirs - plain[0]).abs().max() < 1e-4 * plain.abs().max()


def test_expand_duplicates_runs_serial_copies_in_stock_llama_cpp(tiny, tmp_path):
    import llama_cpp

    toks = tokens(tiny, 30)
    params = ParamStore(copies={(2, 1): {"alpha": 0.5}})
    with_topology(tiny, {"layer_0": {"type": "serial", "copies": 3}, "layer_2": {"type": "serial", "copies": 2}},
                  params)
    with pytest.warns(UserWarning, match="layer_2 copy 1"):
        flat = expand_duplicates(tiny)
    assert flat.spec.n_layers == 5 and flat.expanded_from == [0, 0, 0, 1, 2]
    tiny.dup_params = ParamStore(copies={(2, 1): {"alpha": 0.0}})   # what stock can run: the α = 1 copies
    want = forward(tiny, toks)[0]
    path = write_gguf(flat, tmp_path / "flat.gguf", "F32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(toks[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:30], dtype=np.float32))
    assert (theirs - want).abs().max() < 1e-4 * want.abs().max()


def test_duplicate_library_checks_options_before_loading_then_writes(tmp_path, monkeypatch):
    missing = tmp_path / "missing.gguf"            # option errors come before the model is opened
    with pytest.raises(TwinquantError, match="--auto needs a budget"):
        duplicate(missing, tmp_path / "o.gguf", DuplicateOptions(auto=True))
    with pytest.raises(TwinquantError, match="the output of duplicate is a .gguf"):
        duplicate(missing, tmp_path / "o.bin", DuplicateOptions(auto=True, budget_layers=1))
    d = save_tiny("llama", tmp_path / "hf", tokenizer=True, num_hidden_layers=3)
    q = tmp_path / "m.gguf"
    write_gguf(load_hf_dir(d), q, "F16")
    topo = tmp_path / "t.json"
    topo.write_text(json.dumps({"layer_7": {"type": "serial"}}))
    with monkeypatch.context() as m:               # the topology file and the reference: before any tensor
        m.setattr(Model, "materialize", lambda self: pytest.fail("tensors loaded before the options were checked"))
        with pytest.raises(TwinquantError, match="layer_7"):
            duplicate(q, tmp_path / "o.gguf", DuplicateOptions(topology=str(topo), ref=str(d)))
        topo.write_text(json.dumps({"layer_1": {"type": "serial", "copies": 2}}))
        with pytest.raises(TwinquantError, match="--ref"):
            duplicate(q, tmp_path / "o.gguf", DuplicateOptions(topology=str(topo)))
    assert not (tmp_path / "o.gguf").exists()
    lines = []
    res = duplicate(q, tmp_path / "o.gguf", DuplicateOptions(topology=str(topo), ref=str(d), calib_tokens=128,
                                                            calib_ctx=32), log=lines.append)
    # the F16 file is the reference up to rounding: an untuned copy can only add KLD; the user's copy is kept
    assert lines[0] == "reference log-probs on 128 calibration tokens" and len(lines) == 2
    assert "do not lower the calibration KLD" in lines[1] and "kept as given" in lines[1]
    assert res.topology == {"layer_1": {"type": "serial", "copies": 2}} and res.cost["extra_layers"] == 1
    assert res.calibration_kld > 0 and res.search is None and res.to_dict()["search"] is None
    written = load_gguf(res.path)
    assert len(written.layout.executions()) == 4 and res.params == written.dup_params.to_dict()


def test_idle_layers_are_the_entries_that_compute_the_block_alone():
    from twinquant.duplication.tune import idle_layers

    store = ParamStore()
    store.set("copy", {"alpha": 0.0}, block=1, copy=1)
    store.set("copy", {"alpha": 0.0}, block=2, copy=1)
    store.set("copy", {"alpha": 0.5}, block=2, copy=2)
    topo = {"layer_0": {"type": "parallel", "copies": 2, "weights": [1.0, 0.0]},
            "layer_1": {"type": "serial", "copies": 2},
            "layer_2": {"type": "serial", "copies": 3},                       # one copy of two still scales
            "layer_3": {"type": "parallel", "copies": 2, "weights": [0.75, 0.25]},
            "layer_4": {"type": "serial", "copies": 2, "alpha": 0.0},          # α in the entry itself
            "layer_5": {"type": "serial", "copies": 2},                        # α 1 (the default)
            "layer_6": {"type": "parallel", "copies": 2}}                      # weights 1/2 each
    assert idle_layers(topo, store, 8) == ["layer_0", "layer_1", "layer_4"]


def test_idle_and_useless_duplicates_are_dropped_from_what_is_written(tmp_path):
    """The search switching a copy off (α 0) means the block alone: the entry is dropped, and the file has no
    duplicates. With --auto, copies that do not lower the calibration KLD are all dropped; the outputs of the file
    are those of the model without copies."""
    from twinquant.duplication.sensitivity import Sensitivity

    d = save_tiny("llama", tmp_path / "hf", tokenizer=True, num_hidden_layers=3)
    q = tmp_path / "m.gguf"
    write_gguf(load_hf_dir(d), q, "F16")           # the reference up to rounding: no copy can help
    calib = dict(calib_tokens=128, calib_ctx=32)
    topo = tmp_path / "t.json"
    topo.write_text(json.dumps({"layer_1": {"type": "serial", "copies": 2}}))
    lines = []
    res = duplicate(q, tmp_path / "s.gguf", DuplicateOptions(topology=str(topo), ref=str(d), search="grid",
                                                            trials=3, **calib), log=lines.append)
    assert res.search is not None and res.search.kept_off
    assert res.topology == {} and res.cost["extra_layers"] == 0
    assert any(line.startswith("dropped layer_1") for line in lines)
    written = load_gguf(res.path)
    assert written.layout.is_sequential

    sens = Sensitivity(0.0, 1.0, [0.1, 0.9, 0.2], [0.5, 0.1, 0.4])   # layer 1 ranks first
    (tmp_path / "sens.json").write_text(json.dumps(sens.to_dict()))
    lines = []
    res = duplicate(q, tmp_path / "a.gguf", DuplicateOptions(auto=True, sensitivity=str(tmp_path / "sens.json"),
                                                            kind="serial", budget_layers=1, ref=str(d), **calib),
                    log=lines.append)
    assert res.topology == {} and res.cost["extra_layers"] == 0
    assert any("none are kept" in line for line in lines)
    plain = load_gguf(q).materialize()
    ids = tokens(plain)
    assert torch.equal(forward(load_gguf(res.path).materialize(), ids), forward(plain, ids))
