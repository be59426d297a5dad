"""Fast Hadamard transform vs a dense matmul with the precomputed matrix, float32, CPU.

For each n: 512 rows, `fwht(x)` (Sylvester butterflies + small Paley factor) against `x @ H/√n` with H built
once in float32. Repetitions are interleaved (fwht, dense, fwht, …) so machine noise hits both alike. The dense
matrix for n = 27648 takes 3 GB: it is skipped when available memory is short. Writes JSON and a PNG to
benchmarks/results/.

    python benchmarks/fwht_speed.py [--sizes 896 4864 5120 27648] [--rows 512] [--repeats 15] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from twinquant.transforms.hadamard import fwht, hadamard_plan

ROOT = Path(__file__).resolve().parent.parent


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); 0 when unknown, so big dense runs are skipped."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def plan_name(plan) -> str:
    if plan.construction == "sylvester":
        return f"sylvester {plan.pow2}"
    return f"{plan.pow2} x {plan.construction}(q={plan.q}) {plan.m}"


def bench(n: int, rows: int, repeats: int, threads: list[int]) -> list[dict]:
    """One result row per thread count; the dense matrix is built once."""
    plan = hadamard_plan(n)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    base = {"n": n, "plan": plan_name(plan), "plan_dict": plan.to_dict(), "rows": rows}
    if n * n * 4 * 2 + (2 << 30) > available_bytes():          # matrix + construction temporaries + slack
        H = None
        base["dense"] = "skipped (memory)"
    else:
        H = plan.matrix(torch.float32).mul_(1 / math.sqrt(n))
    runs = {"fwht": lambda: fwht(x)}
    if H is not None:
        runs["dense"] = lambda: x @ H
    outs = {k: f() for k, f in runs.items()}                     # warm-up, and agreement check
    if H is not None:
        base["max_abs_diff"] = (outs["fwht"] - outs["dense"]).abs().max().item()
    del outs
    reps = repeats if n * n * rows < 1e11 else 3                 # the 27648 dense run takes seconds
    results = []
    for t in threads:
        torch.set_num_threads(t)
        row = dict(base, threads=t)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(reps):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k, v in times.items():
            row[f"{k}_ms"], row[f"{k}_ms_min"], row[f"{k}_ms_all"] = statistics.median(v), min(v), v
        if H is not None:
            row["ratio"] = row["dense_ms"] / row["fwht_ms"]
            row["ratio_min"] = row["dense_ms_min"] / row["fwht_ms_min"]
        results.append(row)
    return results


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4), squeeze=False)
    for ax, t in zip(axes[0], threads):
        rs = [r for r in rows if r["threads"] == t]
        xs = range(len(rs))
        ax.bar([i - 0.2 for i in xs], [r["fwht_ms"] for r in rs], 0.4, label="fwht")
        ax.bar([i + 0.2 for i in xs], [r.get("dense_ms", 0) for r in rs], 0.4, label="dense x @ H")
        mins = [(i - 0.2, r["fwht_ms_min"]) for i, r in enumerate(rs)]
        mins += [(i + 0.2, r["dense_ms_min"]) for i, r in enumerate(rs) if "dense_ms_min" in r]
        ax.scatter(*zip(*mins), marker="_", s=200, color="k", label="min of repeats", zorder=3)
        for i, r in enumerate(rs):
            if "dense_ms" not in r:
                ax.text(i + 0.2, r["fwht_ms"], "skipped\n(memory)", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [f"{r['n']}\n{r['plan']}" for r in rs], fontsize=6)
        ax.set_yscale("log")
        ax.set_ylabel(f"ms per {rs[0]['rows']} rows (bars: median)")
        ax.set_title(f"Hadamard transform, float32, CPU, {t} thread{'s' * (t > 1)}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[896, 4864, 5120, 27648])
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    with torch.inference_mode():
        rows = [r for n in args.sizes for r in bench(n, args.rows, args.repeats, args.threads)]

    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"float32, CPU (load average {load}), {args.rows} rows; "
          f"median / min of interleaved repeats (min: least disturbed by other jobs)")
    print(f"{'n':>6} {'thr':>3}  {'plan':<28} {'fwht ms':>15} {'dense ms':>19} {'ratio':>15}")
    for r in rows:
        fw = f"{r['fwht_ms']:.2f} / {r['fwht_ms_min']:.2f}"
        dense = f"{r['dense_ms']:.1f} / {r['dense_ms_min']:.1f}" if "dense_ms" in r else r["dense"]
        ratio = f"{r['ratio']:.1f}x / {r['ratio_min']:.1f}x" if "ratio" in r else "-"
        print(f"{r['n']:>6} {r['threads']:>3}  {r['plan']:<28} {fw:>15} {dense:>19} {ratio:>15}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"load_average": load, "threads": args.threads, "rows": args.rows, "repeats": args.repeats,
            "torch": torch.__version__}
    (out / "fwht_speed.json").write_text(json.dumps({"config": meta, "results": rows}, indent=2) + "\n")
    plot(rows, out / "fwht_speed.png")
    print(f"wrote {out / 'fwht_speed.json'} and {out / 'fwht_speed.png'}")


if __name__ == "__main__":
    main()
