"""`quantize --target-size / --target-bpw`: from a measurement and the user's rules to one type per tensor.

The measurement (`twinquant.allocation.measure`) prices every candidate type of every tensor; `allocate.solve` picks one
per tensor minimising the summed cost under the byte budget. The budget is exact: `--target-size` bounds the whole
file, so the GGUF header (hyperparameters, tokenizer, twinquant.* metadata with this very allocation) and the
alignment padding are measured first (`gguf_write.file_bytes`) and taken off; `--target-bpw` bounds the tensor data
per source weight, as llama.cpp reports a model's size (`model size … BPW`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twinquant.errors import TwinquantError

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """"85MB", "85M" (decimal), "81.5MiB" (binary), "123456" (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise TwinquantError(f"--target-size {text!r}: give bytes or a size like 85MB, 81.5MiB, 1.2GB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise TwinquantError(f"--target-size {text!r} must be positive")
    return n


@dataclass(frozen=True)
class Target:
    kind: str          # "size": whole file bytes; "bpw": tensor-data bits per source weight
    value: float

    def text(self) -> str:
        return f"{self.value:,.0f} bytes (file)" if self.kind == "size" else f"{self.value:g} bits per weight"


def parse_target(size: str | None, bpw: float | None) -> Target | None:
    if size is not None and bpw is not None:
        raise TwinquantError("give --target-size or --target-bpw, not both")
    if size is not None:
        return Target("size", parse_bytes(size))
    if bpw is not None:
        if not 0 < bpw <= 32:
            raise TwinquantError(f"--target-bpw {bpw}: expected bits per weight between 0 and 32")
        return Target("bpw", float(bpw))
    return None


def _record(alloc, meas_sha: str, target: Target, placeholder: bool = False) -> dict:
    """What goes into twinquant.quant.allocation (compact: type per tensor; numbers rounded)."""
    width = max(len(c.type) for c in alloc.choice.values()) if not placeholder else 6
    return {"target": {"kind": target.kind, "value": target.value},
            "measurement_sha256": meas_sha,
            "predicted_kld": float(f"{alloc.total_cost:.6g}") if not placeholder else 1.23456e-300,
            "tensor_bytes": alloc.total_bytes if not placeholder else 10**15,
            "gap": float(f"{alloc.gap:.4g}") if not placeholder else 1.234e-300,
            "types": {n: (c.type if not placeholder else "X" * width) for n, c in alloc.choice.items()}}


def allocate(model, meas, target: Target, fixed_rules: dict[str, str], min_rules: dict[str, str], outtype: str,
             method: str = "dp", exclude: tuple[str, ...] = ()):
    """Solve the allocation for `model` (prepared: padded / rotated as measured, quant_record set without the
    allocation); `exclude`: types no tensor may take (unless a rule fixes it). Returns (Allocation, record for
    twinquant.quant.allocation)."""
    from twinquant.io.gguf_write import file_bytes
    from twinquant.allocation.solve import solve

    groups = meas.groups(fixed_rules, min_rules, exclude)
    names = [g.name for g in groups]
    missing = [n for n in names if n not in model.tensor_names()]
    if missing:
        raise TwinquantError(f"the measurement names {missing[0]}, which this model does not have")
    # the header holds this allocation: measure it with a placeholder at least as long as the real record
    smallest = {g.name: min(g.candidates, key=lambda c: c.bytes) for g in groups}
    from twinquant.allocation.solve import Allocation

    probe = Allocation(smallest, 0, 0.0, 0, method, 0.0)
    record = model.quant_record or {}
    model.quant_record = {**record, "allocation": _record(probe, "0" * 64, target, placeholder=True)}
    try:
        total, data = file_bytes(model, {n: smallest[n].type for n in names}, outtype)
    finally:
        model.quant_record = record
    fixed = data - sum(c.bytes for c in smallest.values())     # tensors kept in float, in this run's outtype
    if target.kind == "bpw":
        budget, overhead = int(target.value * meas.n_params / 8), 0
    else:
        overhead = total - data + 64 * len(names)   # + 64: each tensor's padding may change with its type
        budget = int(target.value) - overhead
    from twinquant.allocation.solve import _allowed

    least = fixed + sum(_allowed(g)[0].bytes for g in groups)
    if least > budget:
        if target.kind == "bpw":
            raise TwinquantError(f"--target-bpw {target.value:g} is below the smallest these rules allow: "
                                 f"{8 * least / meas.n_params:.3f} bits per weight (every tensor at its smallest "
                                 "allowed type)")
        raise TwinquantError(f"--target-size {int(target.value):,} bytes is below the smallest file these rules "
                             f"allow: {least + overhead:,} bytes ({(least + overhead) / 1e6:.2f} MB; every tensor at "
                             "its smallest allowed type)")
    alloc = solve(groups, budget, fixed, method=method)
    rec = _record(alloc, meas.sha256(), target)
    if exclude:
        rec["excluded_types"] = sorted(exclude)
    return alloc, rec, overhead


def format_allocation(alloc, meas) -> str:
    """A table: tensor, shape, chosen type, bytes, predicted KL; then totals."""
    lines = [f"{'tensor':<30} {'shape':>14} {'type':<6} {'bytes':>12} {'pred. KLD':>10}"]
    for n, c in alloc.choice.items():
        shape = "x".join(str(v) for v in meas.tensors[n]["shape"])
        lines.append(f"{n:<30} {shape:>14} {c.type:<6} {c.bytes:>12,} {c.cost:>10.5f}")
    lines.append(f"tensor data {alloc.total_bytes:,} bytes ({alloc.total_bytes / 2**20:.2f} MiB, "
                 f"{8 * alloc.total_bytes / meas.n_params:.3f} bits per weight), predicted KLD {alloc.total_cost:.5f} "
                 f"(sum of measured costs), solver gap {alloc.gap:.2g}")
    return "\n".join(lines)
