"""The `quantize --report` JSON and the PNG beside it (relative output error per tensor, by layer)."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Atomically: a temporary file renamed into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, p)


def write_report(path: str, res, recipe, calib_rec: dict | None) -> None:
    report = res.report
    write_json(path, {**(report.to_dict() if report else {"method": "from-measurement"}),
                      "file_bytes": res.file_bytes, "n_params": res.n_params, "seconds": res.seconds,
                      "recipe": recipe.to_dict(), "rotation": res.rotation, "calibration": calib_rec,
                      "plan": [s.__dict__ for s in res.plan.steps],
                      "allocation": res.allocation.to_dict() if res.allocation is not None else None,
                      "imatrix_coverage": res.imatrix_coverage})
    if report:
        plot(path, report)


def plot(path: str, report) -> None:
    """A PNG beside the JSON report: relative output error per tensor, by layer, one line per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for t in report.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and t.out_error is not None:
            series[parts[2]].append((int(parts[1]), t.out_error))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for role, pts in sorted(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=role)
    ax.set_xlabel("layer")
    ax.set_ylabel("relative output error on calibration inputs")
    ax.set_yscale("log")
    ax.set_title(f"twinquant quantize ({report.method}): error per tensor")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
