"""Sensitivity ranks a planted fragile layer first; duplication choices run end to end on a tiny model."""

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


def test_planted_fragile_layer_ranks_first(pair, tmp_path):
    f, q, windows = pair
    before = {n: t for n, t in q.tensors.items()}
    sens = layer_sensitivity(f, q, windows, progress=False)
    assert sens.ranking() [0] == 2 and sens.ranking("alone")[0] == 2 and sens.ranking("gain")[0] == 2
    assert sens.kld_float == pytest.approx(0.0, abs=1e-4)     # the reference log-probs are kept in float16
    assert sens.kld_quantized > max(sens.alone)               # every layer quantized costs more than any one
    assert all(q.tensors[n] is t for n, t in before.items())          # the quantized model is left as it was
    js, png = sens.write(tmp_path / "s")
    assert png.stat().st_size > 0
    import json

    back = Sensitivity.from_dict(json.loads(js.read_text()))
    assert back.ranking() == sens.ranking()
    f.history = [Rotation("R1", "rh", f.spec.hidden, 1)]
    with pytest.raises(TwinquantError, match="different bases"):
        layer_sensitivity(f, q, windows, progress=False)


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
