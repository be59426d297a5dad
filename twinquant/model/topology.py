"""Duplication topologies: which blocks run more than once, how (serial / parallel / hybrid), within a budget.

A topology is a mapping in the shape of the seed (chapter 9.2.2), as JSON or YAML:

    {"layer_12": {"type": "serial", "copies": 2, "shared_weight": true, "alpha": [1.0, 0.5]},
     "layer_24": {"type": "parallel", "copies": 3, "merge": "weighted_sum", "weights": [0.5, 0.25, 0.25]},
     "layer_7":  {"type": "hybrid", "copies": 2}}

`copies` counts every execution of the block, the original included (copies: 2 = one duplicate). Serial copies
run right after the original; `alpha` (one per copy, or one for the duplicates) are the residual factors, stored
as copy parameters. A parallel group's `weights` default to 1/copies. `hybrid` is decided per layer from
calibration loss (`duplication.hybrid.resolve_hybrid`) and stored as what was chosen. Copies always share
weights (`shared_weight: false` is refused: that would be a different, larger model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from twinquant.model.copies import ParamStore
from twinquant.errors import TwinquantError
from twinquant.model.layout import Layout, Slot

KEYS = {"type", "copies", "shared_weight", "alpha", "weights", "merge", "merge_strategy", "chosen_from"}


def layer_of(key: str, n_layers: int) -> int:
    m = re.fullmatch(r"(?:layer_|blk\.)?(\d+)", str(key))
    if not m:
        raise TwinquantError(f"topology: key {key!r} is not layer_N")
    b = int(m.group(1))
    if b >= n_layers:
        raise TwinquantError(f"topology: {key} but the model has {n_layers} layers (0..{n_layers - 1})")
    return b


def parse_topology(topology: dict, n_layers: int, params: ParamStore | None = None) -> tuple[Layout, ParamStore]:
    """(layout, parameter store with the copies' α) of a topology mapping; hybrid entries must be resolved first."""
    if not isinstance(topology, dict):
        raise TwinquantError("topology: expected a mapping like {\"layer_12\": {\"type\": \"serial\", \"copies\": 2}}")
    params = params if params is not None else ParamStore()
    entries: dict[int, dict] = {}
    for key, e in topology.items():
        b = layer_of(key, n_layers)
        if not isinstance(e, dict):
            raise TwinquantError(f"topology: {key} must be a mapping")
        unknown = sorted(set(e) - KEYS)
        if unknown:
            raise TwinquantError(f"topology: {key}: unknown key(s) {', '.join(unknown)}")
        if e.get("shared_weight", True) is not True:
            raise TwinquantError(f"topology: {key}: copies always share weights (shared_weight: false is a larger "
                                 "model, not a duplicate)")
        kind = e.get("type", "serial")
        if kind == "hybrid":
            raise TwinquantError(f"topology: {key} is hybrid; resolve it on calibration data first "
                                 "(twinquant duplicate does)")
        if kind not in ("serial", "parallel"):
            raise TwinquantError(f"topology: {key}: type {kind!r} is not serial, parallel or hybrid")
        n = e.get("copies", 2)
        if not isinstance(n, int) or n < 1:
            raise TwinquantError(f"topology: {key}: copies must be a positive integer (the original included)")
        merge = e.get("merge", e.get("merge_strategy", "weighted_sum"))
        if merge != "weighted_sum":
            raise TwinquantError(f"topology: {key}: merge {merge!r}: only weighted_sum is defined")
        entries[b] = {**e, "type": kind, "copies": n}
    slots = []
    for b in range(n_layers):
        e = entries.get(b)
        if e is None or e["copies"] == 1:
            slots.append(Slot(b))
            continue
        n = e["copies"]
        if e["type"] == "serial":
            alpha = e.get("alpha")
            if alpha is not None:
                alpha = [alpha] * (n - 1) if isinstance(alpha, (int, float)) else list(alpha)
                if len(alpha) == n - 1:
                    alpha = [1.0] + alpha
                if len(alpha) != n:
                    raise TwinquantError(f"topology: layer_{b}: alpha needs {n} values (or {n - 1} for the copies)")
                for c, a in enumerate(alpha):
                    params.set("copy", {"alpha": float(a)}, block=b, copy=c)
            slots += [Slot(b, c) for c in range(n)]
        else:
            w = e.get("weights") or [1.0 / n] * n
            if len(w) != n:
                raise TwinquantError(f"topology: layer_{b}: weights needs {n} values")
            slots.append(Slot(b, members=tuple((c, float(x)) for c, x in enumerate(w))))
    layout = Layout(tuple(slots))
    layout.validate(n_layers)
    return layout, params


def topology_of(layout: Layout) -> dict:
    """The topology mapping of a layout (the inverse of parse_topology; α stays in the parameter store)."""
    out: dict = {}
    for s in layout.slots:
        key = f"layer_{s.block}"
        if s.parallel:
            out[key] = {"type": "parallel", "copies": len(s.members), "shared_weight": True,
                        "merge": "weighted_sum", "weights": [w for _, w in s.members]}
        elif s.copy > 0:
            out[key] = {"type": "serial", "copies": s.copy + 1, "shared_weight": True}
    return out


def load_topology(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TwinquantError(f"{p}: topology file not found")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        return json.loads(text)
    except Exception as e:   # noqa: BLE001 - any parse error is the user's file
        raise TwinquantError(f"{p}: not a valid topology file ({str(e).splitlines()[0]})") from None


@dataclass(frozen=True)
class Budget:
    """Limits on what duplication may add: block executions, compute per token (%), memory (bytes)."""

    max_extra_layers: int | None = None
    max_extra_flops_pct: float | None = None
    max_extra_memory: int | None = None
    context: int = 4096                       # the context the KV-cache memory is counted at

    def per_execution(self, model) -> tuple[float, int]:
        """(% of the model's compute per token, KV-cache bytes) that one more block execution costs."""
        s = model.spec
        block_flops = 2 * (s.hidden * (s.q_dim + 2 * s.kv_dim) + s.q_dim * s.hidden + 3 * s.hidden * s.intermediate)
        total = s.n_layers * block_flops + 2 * s.hidden * s.vocab
        return 100.0 * block_flops / total, 2 * s.kv_dim * self.context * 2    # f16 keys and values

    def cost(self, model, layout: Layout) -> dict:
        pct, kv = self.per_execution(model)
        extra = layout.extra_executions()
        return {"extra_layers": extra, "extra_flops_pct": extra * pct, "extra_memory": extra * kv,
                "extra_weight_bytes": 0}

    def max_layers(self, model) -> int:
        """The most extra block executions this budget allows."""
        pct, kv = self.per_execution(model)
        limits = [4 * model.spec.n_layers]
        if self.max_extra_layers is not None:
            limits.append(self.max_extra_layers)
        if self.max_extra_flops_pct is not None:
            limits.append(int(self.max_extra_flops_pct / pct + 1e-9))
        if self.max_extra_memory is not None:
            limits.append(self.max_extra_memory // kv)
        return max(0, min(limits))

    def allows(self, model, layout: Layout) -> bool:
        return layout.extra_executions() <= self.max_layers(model)
