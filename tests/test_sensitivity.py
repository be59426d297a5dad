"""Sensitivity ranks a planted fragile layer first; duplication choices run end to end on a tiny model."""

import copy

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.duplication import tune as T
from twinquant.duplication.objective import KLDObjective
from twinquant.model.copies import ParamStore
from twinquant.duplication.sensitivity import Sensitivity, layer_sensitivity
from twinquant.model.topology import Budget
from twinquant.errors import TwinquantError
from twinquant.io.hf import load_hf_dir
from twinquant.model import roles
from twinquant.model.forward import forward
from twinquant.model.history import Rotation


@pytest.fixture
def pair(tmp_path):
    d = save_tiny("llama", tmp_path / "hf", tokenizer=True, num_hidden_layers=4)
    f = load_hf_dir(d).materialize()
    q = load_hf_dir(d).materialize()
    g = torch.Generator().manual_seed(1)
    for layer in range(4):       # "quantization" noise, 10x larger in layer 2: the planted fragile layer
        scale = 0.3 if layer == 2 else 0.03
        for n in roles.block_tensor_names(q.spec, layer):
            w = q.get(n)
            if w.dim() == 2:
                q.set(n, w + scale * w.std() * torch.randn(w.shape, generator=g))
    windows = torch.randint(3, f.spec.vocab, (2, 32), generator=g)
    return f, q, windows


def _kld(ref, model, windows) -> float:
    """The oracle: mean KL(ref ‖ model) over every position, whole float32 forwards."""
    lp, lq = (torch.log_softmax(forward(m, windows), -1) for m in (ref, model))
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _mixed(f, q, quantized_blocks: set[int], quantized_globals: bool):
    """A model with q's tensors in `quantized_blocks` (and q's embedding, norm and head if `quantized_globals`),
    f's elsewhere."""
    m = copy.copy(f)
    m.tensors, m._fused = {}, {}
    for n in f.tensor_names():
        layer = int(n.split(".")[1]) if n.startswith("blk.") else None
        use_q = layer in quantized_blocks if layer is not None else quantized_globals
        m.tensors[n] = (q if use_q else f).get(n)
    return m


def test_planted_fragile_layer_ranks_first(pair, tmp_path):
    f, q, windows = pair
    before = {n: t.clone() for n, t in q.tensors.items()}
    sens = layer_sensitivity(f, q, windows, progress=False)
    assert sens.ranking() [0] == 2 and sens.ranking("alone")[0] == 2 and sens.ranking("gain")[0] == 2
    assert sens.kld_float == 0.0
    assert sens.kld_quantized > max(sens.alone)               # every layer quantized costs more than any one
    assert all(torch.equal(q.get(n), t) for n, t in before.items())   # the quantized model is left as it was
    # the streamed experiments equal whole forwards of the models they stand for
    assert sens.kld_quantized == pytest.approx(_kld(f, q, windows), rel=1e-4)
    for i in range(4):
        assert sens.alone[i] == pytest.approx(_kld(f, _mixed(f, q, {i}, False), windows), rel=1e-4)
        rest = _mixed(f, q, set(range(4)) - {i}, True)
        assert sens.restored[i] == pytest.approx(_kld(f, rest, windows), rel=1e-4)
    js, png = sens.write(tmp_path / "s")
    assert png.stat().st_size > 0
    import json

    back = Sensitivity.from_dict(json.loads(js.read_text()))
    assert back.ranking() == sens.ranking()
    f.history = [Rotation("R1", "rh", f.spec.hidden, 1)]
    with pytest.raises(TwinquantError, match="different bases"):
        layer_sensitivity(f, q, windows, progress=False)


def test_streamed_one_block_of_each_model_at_a_time(tmp_path):
    """Lazy models stay lazy: every block tensor of the float model is loaded once, never two blocks at a time,
    and none is left loaded at the end."""
    d = save_tiny("llama", tmp_path / "hf", num_hidden_layers=3)
    f = load_hf_dir(d, load_tokenizer=False)
    q = load_hf_dir(d).materialize()
    for n in roles.block_tensor_names(q.spec, 1):
        w = q.get(n)
        q.set(n, w + 0.1 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    loads, held = [], []
    load = f.source.load

    def counting(name):
        loads.append(name)
        held.append({int(n.split(".")[1]) for n in f.tensors if n.startswith("blk.")})
        return load(name)

    f.source.load = counting
    windows = torch.randint(3, f.spec.vocab, (2, 16), generator=torch.Generator().manual_seed(2))
    sens = layer_sensitivity(f, q, windows, progress=False)
    assert sens.ranking("alone")[0] == 1 and sens.alone[0] == sens.alone[2] == 0.0   # q = f outside block 1
    blocks = [n for n in loads if n.startswith("blk.")]
    assert sorted(blocks) == sorted(set(blocks)) and len(set(blocks)) == 3 * len(roles.block_tensor_names(f.spec, 0))
    assert all(len(h) <= 1 for h in held)
    assert not any(n.startswith("blk.") for n in f.tensors)


def test_selection_adaptive_hybrid_and_tuning(pair):
    f, q, windows = pair
    objective = KLDObjective(f, windows)
    budget = Budget(max_extra_layers=2)
    sens = layer_sensitivity(f, q, windows, progress=False)
    topo = T.select_by_sensitivity(sens.ranking(), budget, q)
    assert "layer_2" in topo and len(topo) == 2
    hyb = T.resolve_hybrid(q, {"layer_2": {"type": "hybrid", "copies": 2}}, objective)
    assert hyb["layer_2"]["type"] in ("serial", "parallel") and hyb["layer_2"]["chosen_from"] == "hybrid"
    chosen, base, trials = T.adaptive_topology(q, objective, budget, kinds=("serial", "parallel"))
    assert len(trials) == 4 and len(chosen) <= 2
    for key in chosen:           # only duplicates that lowered the calibration KLD on their own are kept
        t = next(t for t in trials if f"layer_{t.layer}" == key)
        assert min(t.serial, t.parallel) < base
    # tuning: the best configuration found is no worse than α = 0 (the undup'ed model), which the grid contains
    res = T.tune(q, {"layer_2": {"type": "serial", "copies": 2}}, objective, "grid", 5, progress=False)
    assert res.best_value <= base + 1e-9 and "alpha.2.1" in res.best_params
    assert res.off_value == pytest.approx(base)                       # copies off = the model without them
    assert objective(q) == pytest.approx(res.best_value)             # the model is left at the best point
    # with activation quantization the space also has clip ratio and rounding per copy
    space = T.search_space({"layer_1": {"type": "parallel", "copies": 2}}, act_quant=True)
    assert set(space) == {"weight.1.1", "clip.1.1", "rounding.1.1"}
    topo, store = T.configure({"layer_1": {"type": "parallel", "copies": 2}}, ParamStore(base={"act_bits": 8}),
                              {"weight.1.1": 0.25, "clip.1.1": 0.8, "rounding.1.1": "stochastic"})
    assert topo["layer_1"]["weights"] == [0.75, 0.25]
    assert store.resolve(1, 1).clip_ratio == 0.8 and store.resolve(1, 1).rounding == "stochastic"
    assert store.resolve(1, 0).clip_ratio == 1.0 and store.resolve(1, 0).act_bits == 8
