"""`twinquant duplicate` as a library: a quantized GGUF → duplicated layers (from a topology file, a sensitivity
ranking, or chosen adaptively within a budget) → optionally the copies' parameters searched → GGUF.

The options are checked before any expensive work (the output suffix, the budget, the topology file against the
model's layer count, the reference), then the quantized blocks are kept byte for byte and every choice is made on
the KL divergence to the float reference on calibration windows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twinquant.calibration.windows import calibration_for
from twinquant.duplication import tune as T
from twinquant.duplication.objective import KLDObjective
from twinquant.errors import TwinquantError
from twinquant.model.copies import ParamStore
from twinquant.model.topology import Budget, load_topology, parse_topology


@dataclass(frozen=True)
class DuplicateOptions:
    """What `duplicate` does; the names are the command line's (`calib*` are what `calibration_for` reads)."""

    ref: str | None = None                   # the float model the calibration KLD is measured against (needed)
    topology: str | None = None              # a topology file (JSON / YAML) — or `auto`
    auto: bool = False                       # choose layers within the budget (adaptive, or by `sensitivity`)
    sensitivity: str | None = None           # a `twinquant sensitivity` JSON: the most sensitive layers
    rank_by: str = "both"                    # both, alone, gain
    kind: str = "hybrid"                     # copy type for `auto`: serial, parallel, hybrid (chosen per layer)
    budget_flops: float | None = None        # max extra compute per token, percent
    budget_layers: int | None = None         # max extra block executions
    budget_memory: str | int | None = None   # max extra KV-cache bytes, e.g. "64M"
    budget_context: int = 4096               # the context the KV-cache memory is counted at
    act_bits: int | None = None              # quantize every linear input to this many bits
    search: str | None = None                # grid, bayes, evolution: tune the copies' parameters
    trials: int = 30
    seed: int = 0
    study_log: str | None = None             # optuna journal: an interrupted search resumes from it
    expand_duplicates: bool = False          # serial copies as physical blocks (stock llama.cpp)
    calib: str | None = None
    calib_tokens: int = 2048
    calib_ctx: int = 512
    quiet: bool = False                      # no progress lines (the notes on what the file holds remain)


@dataclass
class DuplicateResult:
    path: Path
    topology: dict
    params: dict                             # the copies' parameter store as written (`twinquant.dup.params`)
    cost: dict                               # `Budget.cost`: extra layers, compute %, KV-cache bytes, weight bytes
    calibration_kld: float
    search: object | None = None             # `duplication.search.SearchResult` when a search ran

    def to_dict(self) -> dict:
        """The `--report` JSON."""
        return {"topology": self.topology, "params": self.params, "cost": self.cost,
                "calibration_kld": self.calibration_kld,
                "search": self.search.to_dict() if self.search is not None else None}


def duplicate(model_path: str | Path, out: str | Path, options: DuplicateOptions,
              log: Callable[[str], None] | None = None) -> DuplicateResult:
    """Duplicate layers of the quantized GGUF `model_path` into the GGUF `out`, as `options` say. Messages go to
    `log` (default stderr); `options.quiet` keeps only the notes on what the file holds."""
    from twinquant.io.gguf_read import load_gguf
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.load import load_model

    o, out = options, Path(out)
    say = log or T.stderr_log
    progress_log = None if o.quiet else say
    budget = _budget(model_path, out, o)
    model = load_gguf(model_path, keep_quantized=True)     # metadata and mapped blocks; the tensors come later
    model.spec.require_dense("layer duplication")
    topo = _read_topology(o.topology, model.spec.n_layers) if o.topology else None
    if not o.ref:
        raise TwinquantError("--ref MODEL (the float model) is needed: choices are made on the KL divergence "
                             "to it on calibration windows")
    model.materialize()
    params = ParamStore(base={"act_bits": o.act_bits} if o.act_bits else {})
    ref = load_model(o.ref).materialize()
    calib = calibration_for(o, ref)
    if progress_log:
        progress_log(f"reference log-probs on {calib.n_tokens} calibration tokens")
    objective = KLDObjective(ref, calib.windows)
    del ref
    topo = _choose(model, topo, o, budget, objective, params, progress_log, say)
    T.apply(model, topo, params)
    result = None
    if o.search and topo:
        result = T.tune(model, topo, objective, o.search, o.trials, params, o.seed, o.study_log,
                        progress=not o.quiet)
        topo = result.topology
        if result.kept_off:
            say(f"search: no trial beat the copies switched off (KLD {result.off_value:.5f}); they stay off "
                "(alpha 0 / weight 0)")
    topo, final = _drop_useless(model, topo, o, objective, say)
    final = objective(model) if final is None else final
    cost = budget.cost(model, model.layout)
    if o.expand_duplicates:
        from twinquant.duplication.expand import expand_duplicates

        model = expand_duplicates(model)
    write_gguf(model, out, "F16")
    return DuplicateResult(out, topo, model.dup_params.to_dict() if model.dup_params else {}, cost, final, result)


def _drop_useless(model, topo: dict, o: DuplicateOptions, objective, say) -> tuple[dict, float | None]:
    """What is written keeps no copy that does nothing: entries whose copies the search switched off (α 0, merge
    weight 0: exactly the block alone) are dropped; and copies chosen by --auto that do not lower the calibration
    KLD below the model's without duplicates are all dropped (they would cost compute and KV cache for nothing).
    A --topology file's copies are the user's choice: kept, with a line saying so. Returns the topology left and
    the calibration KLD of the model as left, where it was computed (None otherwise)."""
    if not topo:
        return topo, None
    idle = T.idle_layers(topo, model.dup_params, model.spec.n_layers)
    if idle:
        topo = T.without_layers(model, topo, idle)
        say(f"dropped {', '.join(idle)}: their copies do nothing (alpha 0 / merge weight 0: the block alone)")
    if not topo:
        return topo, None
    with_copies = objective(model)
    layout, params = model.layout, model.dup_params
    T.apply(model, {}, params)
    without = objective(model)
    model.layout, model.dup_params = layout, params
    if with_copies < without:
        return topo, with_copies
    if o.auto:
        say(f"the duplicates do not lower the calibration KLD ({with_copies:.5f}, {without:.5f} without them): "
            "none are kept")
        return T.without_layers(model, topo, list(topo)), without
    say(f"note: the topology's duplicates do not lower the calibration KLD ({with_copies:.5f}, {without:.5f} "
        "without them); kept as given")
    return topo, with_copies


def _budget(model_path: str | Path, out: Path, o: DuplicateOptions) -> Budget:
    """The budget, after the checks that need nothing loaded."""
    if (o.topology is None) == (not o.auto):
        raise TwinquantError("give --topology FILE or --auto (with a budget)")
    if out.suffix != ".gguf":
        raise TwinquantError(f"{out}: the output of duplicate is a .gguf file")
    memory = None
    if o.budget_memory:
        from twinquant.io.split import parse_size

        memory = parse_size(o.budget_memory)
    if o.auto and o.budget_layers is None and o.budget_flops is None and memory is None:
        raise TwinquantError("--auto needs a budget: --budget-flops PCT, --budget-layers N and/or --budget-memory")
    if Path(model_path).suffix != ".gguf":
        raise TwinquantError("duplicate works on a quantized .gguf (from `twinquant quantize`)")
    return Budget(o.budget_layers, o.budget_flops, memory, o.budget_context)


def _read_topology(path: str, n_layers: int) -> dict:
    """The topology file, checked against the model (hybrid entries are checked as serial ones)."""
    topo = load_topology(path)
    parse_topology({k: {**e, "type": "serial"} if isinstance(e, dict) and e.get("type") == "hybrid" else e
                    for k, e in topo.items()} if isinstance(topo, dict) else topo, n_layers)
    return topo


def _choose(model, topo: dict | None, o: DuplicateOptions, budget: Budget, objective, params: ParamStore,
            log, say) -> dict:
    """The topology: the file's (hybrid entries resolved), by sensitivity, or adaptive within the budget."""
    if topo is not None:
        if any(e.get("type") == "hybrid" for e in topo.values()):
            topo = T.resolve_hybrid(model, topo, objective, params, log)
        return topo
    if o.sensitivity:
        from twinquant.duplication.sensitivity import Sensitivity

        sens = Sensitivity.from_dict(json.loads(Path(o.sensitivity).read_text()))
        topo = T.select_by_sensitivity(sens.ranking(o.rank_by), budget, model, "serial")
        if o.kind == "hybrid":
            topo = T.resolve_hybrid(model, {k: {**e, "type": "hybrid"} for k, e in topo.items()}, objective,
                                    params, log)
        return topo
    kinds = ("serial", "parallel") if o.kind == "hybrid" else (o.kind,)
    topo, base, _ = T.adaptive_topology(model, objective, budget, params, kinds, log=log)
    if not topo:
        say(f"adaptive: no single duplicate lowers the calibration KLD ({base:.5f}); the file is written "
            "without duplicates")
    return topo
