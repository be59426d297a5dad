"""Block LDLQ (GPTQ into llama.cpp's i-quants, `algorithms/gptq_blocks.py`) of one matrix, this tree side by side
with an earlier one in the same run: seconds per matrix, and whether both wrote the same bytes (both are meant to
be llama.cpp's search exactly, so they must).

`measure` prices every i-quant candidate by block LDLQ on a few dozen sampled rows of each tensor; such small
calls are bound by how many operations (GPU kernel launches, CPU dispatches) each group's search makes, not by
their arithmetic. `default` puts a 32B model's ffn_gate/up into IQ3_XXS: full-size calls.

    python benchmarks/iquant_ldlq_speed.py --before /path/to/old/checkout --device cuda --tag h200
    TWINQUANT_LIBGGML=0 python benchmarks/iquant_ldlq_speed.py --before OLD --device cpu --tag cpu \\
        --shapes 64x5120:IQ2_XXS 64x5120:IQ3_XXS

(`TWINQUANT_LIBGGML=0` on a CPU: the codecs' own torch search, the code a GPU runs, instead of libggml's C.)
Each case runs in a fresh interpreter with the tree's package first on the path; the fastest of `--repeat` runs
is kept (the first builds tables). Writes benchmarks/results/iquant_ldlq_speed_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import record  # noqa: E402

# measure's sampled rows of a 32B block's matrices (5120 / 27648 columns), and default's ffn_gate/up
SHAPES = ["64x5120:IQ2_XXS", "64x5120:IQ2_XS", "64x5120:IQ2_S", "64x5120:IQ3_XXS", "64x5120:IQ3_S",
          "64x27648:IQ2_XXS", "64x27648:IQ3_XXS", "27648x5120:IQ3_XXS"]

_CASE = r"""
import hashlib, json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from twinquant.algorithms.gptq_blocks import gptq_blocks
from twinquant.formats.ggml import get_codec
rows, cols, qtype, device, repeat = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
g = torch.Generator().manual_seed(0)
W = torch.randn(rows, cols, generator=g) * 0.02
x = torch.randn(2048, cols, generator=g)
x[:, : cols // 2] += 0.5 * x[:, cols // 2:]
H = 2 * x.T @ x / x.shape[0]
imp = torch.diagonal(H).clone()
W, H, imp = W.to(device), H.to(device), imp.to(device)
codec = get_codec(qtype)
times = []
for _ in range(repeat):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    r = gptq_blocks(W, H, codec, importance=imp)
    if device == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": min(times), "sha256": hashlib.sha256(r.data.tobytes()).hexdigest(), "loss": r.loss,
                  "package": __import__("twinquant").__file__}))
"""


def run_case(tree: str, shape: str, device: str, repeat: int) -> dict:
    dims, qtype = shape.split(":")
    rows, cols = dims.split("x")
    p = subprocess.run([sys.executable, "-c", _CASE, tree, rows, cols, qtype, device, str(repeat)],
                       capture_output=True, text=True, check=False)
    if p.returncode:
        raise SystemExit(f"{tree} {shape}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout (or a folder holding the `twinquant` package) to "
                                                    "compare with")
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS:TYPE ...")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if not (Path(args.before) / "twinquant" / "__init__.py").is_file():
        raise SystemExit(f"--before {args.before}: no twinquant package there")
    rows = []
    print(f"{'matrix':>12} {'type':>8} {'before s':>9} {'now s':>8} {'speed-up':>8}  same bytes")
    for shape in args.shapes:
        b = run_case(str(Path(args.before).resolve()), shape, args.device, args.repeat)
        n = run_case(str(ROOT), shape, args.device, args.repeat)
        assert Path(b["package"]).resolve() != Path(n["package"]).resolve(), "both cases imported one package"
        dims, qtype = shape.split(":")
        r = {"matrix": dims, "type": qtype, "before_seconds": round(b["seconds"], 4), "seconds": round(n["seconds"], 4),
             "speedup": round(b["seconds"] / n["seconds"], 2), "same_bytes": b["sha256"] == n["sha256"],
             "loss": n["loss"]}
        rows.append(r)
        print(f"{dims:>12} {qtype:>8} {r['before_seconds']:9.3f} {r['seconds']:8.3f} {r['speedup']:7.2f}x  "
              f"{r['same_bytes']}")
    before_files = sorted((Path(args.before) / "twinquant").rglob("*.py"))
    h = hashlib.sha256()
    for f in before_files:
        h.update(f.read_bytes())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {**record(benchmark="iquant_ldlq_speed"), "tag": args.tag,
           "device": args.device, "libggml": os.environ.get("TWINQUANT_LIBGGML", "1") != "0",
           "before_package_sha256": h.hexdigest(), "results": rows}
    stem = out / f"iquant_ldlq_speed_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| matrix | type | before s | now s | speed-up | same bytes |", "|---|---|---|---|---|---|"]
    md += [f"| {r['matrix']} | {r['type']} | {r['before_seconds']:.3f} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
           f"{'yes' if r['same_bytes'] else 'NO'} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['matrix']}\n{r['type']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["before_seconds"] for r in rows], 0.4, label="before")
    ax.bar([x + 0.2 for x in xs], [r["seconds"] for r in rows], 0.4, label="now")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("seconds per matrix (log)")
    ax.set_yscale("log")
    ax.set_title(f"block LDLQ into i-quants ({args.device}, {args.tag})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
