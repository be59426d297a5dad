"""The Triton Hadamard transform's speed by warps per row program, at issue 19's widths (bf16, 16384 rows), side by
side in one run with a device copy of the same kind (read + write bytes), the transform checked against float32.

    python benchmarks/hadamard_warps.py --tag h100

Writes benchmarks/results/hadamard_warps_TAG.{json,md,png}; the row the runtime's `kernel_warps` picks is marked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import record  # noqa: E402

WIDTHS = (4096, 8192, 5120, 14336, 27648, 1536, 8960)
WARPS = (1, 2, 4, 8, 16, 32)


def timed(fn, reps: int = 20) -> float:
    """Median seconds of `reps` calls after 3 warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from twinquant.transforms.hadamard import _kernel_factors, fwht, hadamard_plan, kernel_warps
    from twinquant.transforms.triton_hadamard import fwht_kernel

    big = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    copy = 2 * big.numel() / timed(lambda: big.clone()) / 1e9
    del big
    rows = []
    for n in WIDTHS:
        plan = hadamard_plan(n)
        (A, C, D), (L, SA, SC) = _kernel_factors(plan, False, torch.bfloat16, "cuda:0")
        x = torch.randn(args.rows, n, device="cuda").to(torch.bfloat16)
        y = torch.empty_like(x)
        ref = fwht(x[:64].float(), n)
        for w in WARPS:
            def run():
                fwht_kernel[(x.shape[0],)](x, y, L, SA, SC, L, x.stride(0), y.stride(0), 1 / math.sqrt(n),
                                           M=plan.m if plan.m > 1 else D, A=A, C=C, D=D, SIGN_IN=False,
                                           SIGN_OUT=False, PREC="tf32", num_warps=w)
            t = timed(run)
            gbs = 2 * x.numel() * x.element_size() / t / 1e9
            err = float((y[:64].float() - ref).abs().max() / ref.abs().max())
            rows.append({"n": n, "m": plan.m, "tile": [A, C, D], "warps": w, "us": round(t * 1e6, 1),
                         "gbs": round(gbs), "pct_copy": round(100 * gbs / copy, 1), "rel_err": err,
                         "runtime_choice": w == kernel_warps(A, C, D)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    res = record(benchmark="hadamard_warps", tag=args.tag, rows_per_call=args.rows, dtype="bfloat16",
                 copy_gbs=round(copy), results=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hadamard_warps_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Triton Hadamard transform by warps per row program ({args.tag})", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}  ",
             f"bf16, {args.rows} rows; copy bandwidth {round(copy)} GB/s (read + write); relative error against "
             "the float32 transform of the same bf16 rows; **bold**: the runtime's `kernel_warps` choice", "",
             "| n | tile (A, C, D) | " + " | ".join(f"{w} warps" for w in WARPS) + " |",
             "|---|---|" + "---|" * len(WARPS)]
    for n in WIDTHS:
        rs = [r for r in rows if r["n"] == n]
        cells = [(f"**{r['pct_copy']}%**" if r["runtime_choice"] else f"{r['pct_copy']}%") for r in rs]
        lines.append(f"| {n} | {tuple(rs[0]['tile'])} | " + " | ".join(cells) + " |")
    (out / f"hadamard_warps_{args.tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in WIDTHS:
        rs = [r for r in rows if r["n"] == n]
        ax.plot([r["warps"] for r in rs], [r["pct_copy"] for r in rs], marker="o", label=f"n = {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("warps per row program")
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title(f"Triton Hadamard, bf16, {args.rows} rows ({args.tag})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"hadamard_warps_{args.tag}.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
