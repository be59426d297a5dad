"""The Triton Hadamard transform's speed by launch (rows per tile, warps, programs per SM, pipelining stages), at
issue 19's widths (bf16, 16384 rows), side by side in one run with a device copy (read + write bytes), the transform
checked against float32; the launch the runtime picks (`hadamard.kernel_config`) is marked.

    python benchmarks/hadamard_warps.py --tag h100

Writes benchmarks/results/hadamard_warps_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402

from provenance import plot_option, plotted, record  # noqa: E402

WIDTHS = (4096, 8192, 5120, 14336, 27648, 1536, 8960)
WARPS = (4, 8)
GRIDS = ((0, 1), (2, 2), (4, 2), (8, 2))      # (programs per SM, 0: one per tile; pipelining stages)
MAX_TILE = 16384                                       # weights per tile (bf16: 32 KB)


def configs(A: int, C: int, D: int):
    from twinquant.transforms.hadamard import KernelConfig

    size = A * C * D
    rows = [1] if A > 1 else [r for r in (1, 2, 4, 8) if r * size <= MAX_TILE]
    return [KernelConfig(rows=r, warps=w, stages=st, per_sm=ps) for r in rows for w in WARPS for ps, st in GRIDS]


def plot(res: dict, path: Path) -> None:
    """% of copy bandwidth of every launch tried, by width; the runtime's launch starred (and, in the sixteenth
    session's slicing experiment, each count of output slices in its own colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["results"]
    widths = list(dict.fromkeys(r["n"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    for chunks in sorted({r.get("chunks", 1) for r in rows}):
        rs = [r for r in rows if r.get("chunks", 1) == chunks]
        ax.scatter([widths.index(r["n"]) for r in rs], [r["pct_copy"] for r in rs], s=10, alpha=0.6,
                   label=f"{chunks} output slice{'s' * (chunks > 1)}" if "chunks" in rows[0] else None)
    mine = [r for r in rows if r["runtime_choice"] and r.get("chunks", 1) == 1]
    ax.scatter([widths.index(r["n"]) for r in mine], [r["pct_copy"] for r in mine], marker="*", s=120,
               color="black", label="the runtime's launch")
    ax.set_xticks(range(len(widths)), [str(n) for n in widths])
    ax.set_xlabel("n")
    ax.set_ylabel("% of copy bandwidth")
    name = res.get("tag") or res.get("benchmark", "")
    ax.set_title(f"Triton Hadamard launches, bf16, {res.get('rows_per_call', 16384)} rows ({name})",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    ap.add_argument("--tag", help="names the results files (required unless --plot)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    plot_option(ap)
    args = ap.parse_args(argv)
    if plotted(ap, args, plot):
        return 0
    from kernel_speed import bench, copy_bandwidth, fht_peer

    from twinquant.transforms.hadamard import _kernel_factors, fwht, hadamard_plan, kernel_config, launch_fwht

    copy = copy_bandwidth()
    rows, peer_rows = [], {}
    for n in args.widths:
        plan = hadamard_plan(n)
        factors = _kernel_factors(plan, False, torch.bfloat16, "cuda:0")
        A, C, D = factors[0]
        x = torch.randn(args.rows, n, device="cuda").to(torch.bfloat16)
        y = torch.empty_like(x)
        ref = fwht(x[:64].float(), n)
        default = kernel_config(A, C, D)
        for cfg in configs(A, C, D):
            def run():
                launch_fwht(x, y, plan, factors, None, False, 1 / math.sqrt(n), cfg)
            y.zero_()
            try:
                t = bench(run)                # kernel_speed.py's timing: median, L2 flushed before each run
            except triton.runtime.errors.OutOfResources as e:       # a launch this GPU cannot hold: not a result
                print(json.dumps({"n": n, "launch": dataclasses.asdict(cfg), "skipped": str(e)}), file=sys.stderr)
                continue
            gbs = 2 * x.numel() * x.element_size() / t / 1e9
            err = float((y[:64].float() - ref).abs().max() / ref.abs().max())
            rows.append({"n": n, "m": plan.m, "tile": [A, C, D], **dataclasses.asdict(cfg), "us": round(t * 1e6, 1),
                         "gbs": round(gbs), "pct_copy": round(100 * gbs / copy, 1), "rel_err": err,
                         "runtime_choice": cfg == default})
            print(json.dumps(rows[-1]), file=sys.stderr)
        importlib.invalidate_caches()            # the peer may be built in the background meanwhile: look again
        peer, version = fht_peer()
        f = peer(n) if peer else None
        if f is not None:
            t = bench(lambda: f(x))
            peer_rows[n] = {"version": version, "us": round(t * 1e6, 1),
                            "pct_copy": round(100 * 2 * x.numel() * x.element_size() / t / 1e9 / copy, 1)}
            print(json.dumps({"n": n, "fast_hadamard_transform": peer_rows[n]}), file=sys.stderr)
        del x, y
    res = record(benchmark="hadamard_warps", tag=args.tag, rows_per_call=args.rows, dtype="bfloat16",
                 copy_gbs=round(copy), results=rows, fast_hadamard_transform=peer_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hadamard_warps_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Triton Hadamard transform by launch configuration ({args.tag})", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}  ",
             f"bf16, {args.rows} rows; copy bandwidth {round(copy)} GB/s (read + write); do_bench medians, L2 "
             "flushed; relative error against the float32 transform of the same bf16 rows. A launch: rows per tile, "
             "warps, programs per SM (0: one per tile), software-pipelining stages", "",
             "| n | tile (A, C, D) | best launch | best % copy | runtime's launch | its % copy | worst % copy | "
             "max rel. error | fast-hadamard-transform % copy | runtime's launch / fht speed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.widths:
        rs = [r for r in rows if r["n"] == n]
        best = max(rs, key=lambda r: r["pct_copy"])
        mine = next(r for r in rs if r["runtime_choice"]) if any(r["runtime_choice"] for r in rs) else None

        def name(r):
            return f"{r['rows']} r, {r['warps']} w, {r['per_sm']}/SM, {r['stages']} st"
        lines.append(f"| {n} | {tuple(rs[0]['tile'])} | {name(best)} | {best['pct_copy']}% | "
                     f"{name(mine) if mine else 'not swept'} | {mine['pct_copy'] if mine else '-'}% | "
                     f"{min(r['pct_copy'] for r in rs)}% | {max(r['rel_err'] for r in rs):.1e} | "
                     + (f"{peer_rows[n]['pct_copy']}% | {peer_rows[n]['us'] / mine['us']:.2f}x |"
                        if n in peer_rows and mine else "- | - |"))
    (out / f"hadamard_warps_{args.tag}.md").write_text("\n".join(lines) + "\n")
    plot(res, out / f"hadamard_warps_{args.tag}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
