"""Peak memory of GPTQ's factorisation (prepare_inputs + the Cholesky factor of H) on the CPU, this tree against
another checkout, side by side: each in its own process, the peak resident memory above the inputs, in units of one
n×n float32 matrix (3.1 GB at n = 27648, ffn_down of a 32B model).

    python benchmarks/gptq_memory.py --n 16384 --before OLD_CHECKOUT --tag cpu

Writes benchmarks/results/gptq_memory_TAG.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_commit, machine, plot_option, plotted, results_stem, versions, write_results  # noqa: E402

CHILD = r"""
import hashlib, json, resource, sys, time
# the tree's own package first (`python -c` puts the working directory, this checkout, ahead of PYTHONPATH)
sys.path.insert(0, sys.argv[3])
import torch
import twinquant
from twinquant.algorithms.gptq import prepare_inputs, unit_factor
n, rows = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(0)
A = torch.randn(n, 64, generator=g) / 8
H = torch.empty(n, n)
torch.mm(A, A.T, out=H)
H.diagonal().add_(1.0)
del A
W = torch.randn(rows, n, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
W0, Hp, dead = prepare_inputs(W, H)
M, rdiag = unit_factor(H, Hp, 0.01)
secs = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"package": twinquant.__file__, "base_bytes": base, "peak_bytes": peak, "seconds": secs,
                  "factor_sha256": hashlib.sha256(M.numpy().tobytes() + rdiag.numpy().tobytes()).hexdigest()}))
"""


def run(tree: Path, n: int, rows: int) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(n), str(rows), str(tree)], capture_output=True, text=True,
                       check=True)
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["above_inputs_in_matrices"] = round((r["peak_bytes"] - r["base_bytes"]) / (4 * n * n), 2)
    return r


def plot(res: dict, path: Path) -> None:
    """Each tree's peak memory above its inputs, in n×n float32 matrices, and its seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = res["runs"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(8, 3.2))
    ax.bar(list(runs), [r["above_inputs_in_matrices"] for r in runs.values()], color="tab:blue")
    ax.set_ylabel("peak above the inputs (n×n float32)")
    bx.bar(list(runs), [r["seconds"] for r in runs.values()], color="tab:gray")
    bx.set_ylabel("seconds")
    fig.suptitle(f"GPTQ factorisation on the CPU, n = {res['n']} ({res['tag']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--before", help="another checkout (its twinquant package) to run beside this one")
    ap.add_argument("--tag", help="names the results files (required unless --plot)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    plot_option(ap)
    args = ap.parse_args(argv)
    if plotted(ap, args, plot):
        return 0
    trees = {"now": ROOT} | ({"before": Path(args.before).resolve()} if args.before else {})
    res = {"benchmark": "gptq_memory", "tag": args.tag, "command": "python " + " ".join(sys.argv),
           "commit": git_commit(), "versions": versions(), "machine": machine(), "n": args.n, "rows": args.rows,
           "matrix_bytes": 4 * args.n * args.n, "runs": {k: run(t, args.n, args.rows) for k, t in trees.items()}}
    if "before" in res["runs"]:
        res["same_factor"] = res["runs"]["now"]["factor_sha256"] == res["runs"]["before"]["factor_sha256"]
    lines = [f"# GPTQ factorisation memory on the CPU, n = {args.n}", "", f"command: `{res['command']}`  ",
             f"commit: {res['commit']}  ", f"machine: {res['machine']}", "",
             "| tree | peak above the inputs (n×n float32 matrices) | GB | seconds |", "|---|---|---|---|"]
    for k, r in res["runs"].items():
        lines.append(f"| {k} | {r['above_inputs_in_matrices']} | {(r['peak_bytes'] - r['base_bytes']) / 1e9:.2f} "
                     f"| {r['seconds']:.1f} |")
    if "same_factor" in res:
        lines += ["", f"the same factor, bit for bit (sha256 of M and diag R): {res['same_factor']}"]
    write_results(results_stem(args.out, "gptq_memory", args.tag), res, "\n".join(lines) + "\n", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
