"""Choosing and tuning duplicated layers: selection by sensitivity, the adaptive / hybrid decisions, and search.

- `select_by_sensitivity`: the most sensitive blocks, as many as the budget allows (one extra execution each).
- `adaptive_topology`: measure, per block, what one duplicate does to the calibration KLD (serial with α = 1,
  parallel with equal weights: the two hybrid choices), then keep the best blocks that *improve* the KLD, within
  the budget — possibly none: duplication is kept only where the calibration data says it helps.
- `resolve_hybrid`: a topology's `hybrid` entries become serial or parallel, whichever has the lower KLD.
- `tune`: search the copies' parameters (α or merge weight; with activation quantization also clip ratio and
  rounding) with grid / Bayesian / evolutionary search (`duplication.search`) on the calibration KLD; the
  configuration with the copies switched off is measured too and kept when no trial beats it.
"""

from __future__ import annotations

import copy as _copy
import sys
from dataclasses import dataclass

from twinquant.model.copies import ParamStore
from twinquant.model.topology import Budget, layer_of, parse_topology
from twinquant.errors import TwinquantError


def apply(model, topology: dict, params: ParamStore | None) -> None:
    """Give the model a topology and a parameter store (α from the topology added to a copy of `params`)."""
    store = ParamStore.from_dict(params.to_dict()) if params is not None else ParamStore()
    model.layout, model.dup_params = parse_topology(topology, model.spec.n_layers, store)


def select_by_sensitivity(ranking: list[int], budget: Budget, model, kind: str = "serial") -> dict:
    n = budget.max_layers(model)
    return {f"layer_{b}": {"type": kind, "copies": 2, "shared_weight": True} for b in sorted(ranking[:n])}


@dataclass
class LayerTrial:
    layer: int
    serial: float
    parallel: float | None


def _single(model, objective, params, layer: int, kind: str) -> float:
    apply(model, {f"layer_{layer}": {"type": kind, "copies": 2}}, params)
    return objective(model)


def resolve_hybrid(model, topology: dict, objective, params: ParamStore | None = None, log=None) -> dict:
    """Replace each hybrid entry by serial or parallel, whichever gives the lower calibration KLD alone."""
    out = _copy.deepcopy(topology)
    for key, e in topology.items():
        if e.get("type") != "hybrid":
            continue
        layer = int(key.split("_")[-1])
        trial = {k: v for k, v in e.items() if k != "type"}
        scores = {}
        for kind in ("serial", "parallel"):
            apply(model, {key: {**trial, "type": kind}}, params)
            scores[kind] = objective(model)
        best = min(scores, key=scores.get)
        out[key] = {**trial, "type": best, "chosen_from": "hybrid"}
        if log:
            log(f"layer {layer}: serial {scores['serial']:.5f}, parallel {scores['parallel']:.5f} -> {best}")
    return out


def adaptive_topology(model, objective, budget: Budget, params: ParamStore | None = None, kinds=("serial",),
                      layers: list[int] | None = None, log=None) -> tuple[dict, float, list[LayerTrial]]:
    """(topology, base KLD, per-layer trials): the blocks whose single duplicate lowers the KLD most, at most as
    many as the budget allows, only those that lower it at all."""
    apply(model, {}, params)
    base = objective(model)
    trials = []
    for layer in (layers if layers is not None else range(model.spec.n_layers)):
        s = _single(model, objective, params, layer, "serial") if "serial" in kinds else float("inf")
        p = _single(model, objective, params, layer, "parallel") if "parallel" in kinds else None
        trials.append(LayerTrial(layer, s, p))
        if log:
            log(f"layer {layer:>3}: duplicated serial {s:.5f}" + (f", parallel {p:.5f}" if p is not None else "")
                + f" (base {base:.5f})")
    best = sorted(trials, key=lambda t: min(t.serial, t.parallel if t.parallel is not None else float("inf")))
    chosen = {}
    for t in best[: budget.max_layers(model)]:
        kind = "parallel" if t.parallel is not None and t.parallel < t.serial else "serial"
        if min(t.serial, t.parallel if t.parallel is not None else float("inf")) < base:
            chosen[f"layer_{t.layer}"] = {"type": kind, "copies": 2, "shared_weight": True}
    apply(model, chosen, params)
    return chosen, base, trials


def search_space(topology: dict, act_quant: bool) -> dict:
    """The tunable parameters of a topology's duplicates, as a `SearchSpace.from_dict` mapping."""
    space: dict = {}
    for key, e in sorted(topology.items()):
        layer = key.split("_")[-1]
        for c in range(1, e.get("copies", 2)):
            if e["type"] == "serial":
                space[f"alpha.{layer}.{c}"] = {"low": 0.0, "high": 1.0, "step": 0.25}
            else:
                space[f"weight.{layer}.{c}"] = {"low": 0.0, "high": 1.0, "step": 0.25}
            if act_quant:
                space[f"clip.{layer}.{c}"] = {"low": 0.6, "high": 1.0, "step": 0.1}
                space[f"rounding.{layer}.{c}"] = ["nearest", "stochastic"]
    return space


def configure(topology: dict, base_params: ParamStore | None, values: dict) -> tuple[dict, ParamStore]:
    """(topology, params) with the searched values in place: α and clip/rounding as copy overrides, merge
    weights in the topology (copy 0 takes what the others leave, so the weights still sum to 1)."""
    topo = _copy.deepcopy(topology)
    store = ParamStore.from_dict(base_params.to_dict()) if base_params is not None else ParamStore()
    for name, v in values.items():
        what, layer, c = name.split(".")
        b, c = int(layer), int(c)
        if what == "alpha":
            store.set("copy", {"alpha": float(v)}, block=b, copy=c)
        elif what == "clip":
            store.set("copy", {"clip_ratio": float(v)}, block=b, copy=c)
        elif what == "rounding":
            # a distinct seed per copy, so stochastic copies of one block do not share their noise
            store.set("copy", {"rounding": v, **({"seed": 1000 * b + c} if v == "stochastic" else {})},
                      block=b, copy=c)
        elif what == "weight":
            e = topo[f"layer_{b}"]
            n = e.get("copies", 2)
            w = list(e.get("weights") or [1.0 / n] * n)
            w[c] = float(v)
            rest = 1.0 - sum(w[1:])
            if rest < 0:      # the copies alone exceed 1: scale them down, copy 0 gets nothing
                w = [0.0] + [x / sum(w[1:]) for x in w[1:]]
            else:
                w[0] = rest
            e["weights"] = w
        else:
            raise TwinquantError(f"unknown search parameter {name!r}")
    return topo, store


def idle_layers(topology: dict, store: ParamStore | None, n_layers: int) -> list[str]:
    """The entries whose copies change nothing: serial copies that all have α = 0 (each is the identity), or a
    parallel group whose merge weight is all on copy 0 (1·block + 0·copies). Without its entry the block runs once
    with copy 0's parameters, which is exactly what such an entry computes, so dropping it changes no output."""
    out = []
    for key, e in topology.items():
        b, n = layer_of(key, n_layers), e.get("copies", 2)
        if e.get("type", "serial") == "parallel":
            w = list(e.get("weights") or [1.0 / n] * n)
            idle = w[0] == 1.0 and all(x == 0.0 for x in w[1:])
        else:
            # α as parse_topology reads it (the entry's own values win over the store's), copy 0 first
            alpha = [store.resolve(b, c).alpha if store is not None else 1.0 for c in range(n)]
            if e.get("alpha") is not None:
                a = e["alpha"]
                a = [a] * (n - 1) if isinstance(a, (int, float)) else list(a)
                alpha = [alpha[0]] + a if len(a) == n - 1 else a
            idle = alpha[0] == 1.0 and all(x == 0.0 for x in alpha[1:])
        if idle or n == 1:
            out.append(key)
    return out


def without_layers(model, topology: dict, keys: list[str]) -> dict:
    """Drop `keys` from the model's topology: its layout loses their copies and its parameter store their copies'
    entries (copy 0's stay: the block itself runs with them). Returns the topology left."""
    n_layers = model.spec.n_layers
    gone = {layer_of(k, n_layers) for k in keys}
    left = {k: e for k, e in topology.items() if k not in keys}
    old = model.dup_params if model.dup_params is not None else ParamStore()
    store = ParamStore(base=dict(old.base), layers={b: dict(d) for b, d in old.layers.items()},
                       copies={(b, c): dict(d) for (b, c), d in old.copies.items() if b not in gone or c == 0})
    model.layout, model.dup_params = parse_topology(left, n_layers, store)
    return left


def tune(model, topology: dict, objective, strategy: str, trials: int, params: ParamStore | None = None,
         seed: int = 0, study_log=None, progress: bool = True):
    """Search the duplicates' parameters; leaves the best configuration on the model. Returns the SearchResult."""
    from twinquant.duplication.search import SearchSpace, search

    act = params is not None and params.any_act_quant([(b, 0) for b in range(model.spec.n_layers)])
    space_d = search_space(topology, act)
    if not space_d:
        raise TwinquantError("nothing to tune: the topology duplicates no layer")
    space = SearchSpace.from_dict(space_d)

    def f(values: dict) -> float:
        topo, store = configure(topology, params, values)
        model.layout, model.dup_params = parse_topology(topo, model.spec.n_layers, store)
        return objective(model)

    # The copies switched off (α = 0, merge weight 0) is the model without duplicates: measure it too and keep it
    # when no trial beats it, so tuning never returns something worse than not duplicating.
    off = {n: 0.0 if n.startswith(("alpha.", "weight.")) else 1.0 if n.startswith("clip.") else "nearest"
           for n in space_d}
    off_value = f(off)
    result = search(f, space, strategy, trials, seed=seed, study_log=study_log, progress=progress)
    result.off_value = off_value
    result.kept_off = off_value <= result.best_value
    if result.kept_off:
        result.best_params, result.best_value = off, off_value
    topo, store = configure(topology, params, result.best_params)
    model.layout, model.dup_params = parse_topology(topo, model.spec.n_layers, store)
    result.topology = topo
    return result


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
