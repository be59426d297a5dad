"""The INT2×INT8 path (`packed.gemm_i8`: Q2_K codes times per-token int8 activations on int8 tensor cores) against
the runtime's prefill path for packed weights (dequantize into bfloat16, then cuBLAS) and against cuBLAS on weights
dequantized once (a lower bound for any bf16 route), side by side in one run on the 32B shapes; each checked against
the float product.

    python benchmarks/int8_gemm.py --tag h100

Writes benchmarks/results/int8_gemm_TAG.{json,md,png}. Tile settings (BM, BN, warps) are swept; the table shows the
best and the defaults'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hadamard_warps import timed  # noqa: E402
from provenance import record  # noqa: E402

SHAPES = [(27648, 5120), (5120, 27648), (5120, 5120), (4096, 14336)]
TOKENS = [16, 256, 4096]
TILES = [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 64, 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from twinquant.formats.ggml.packed import PackedWeight, dequantize, gemm_i8, random_blocks

    rows_out = []
    for rows, cols in SHAPES:
        w = PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, cols, seed=1), cols, "cuda")
        W = dequantize(w, torch.float32)
        Wb = W.to(torch.bfloat16)
        for m in TOKENS:
            x = torch.randn(m, cols, device="cuda")
            exact = x.double() @ W.double().T
            xb = x.to(torch.bfloat16)
            r = {"rows": rows, "cols": cols, "tokens": m}
            r["dequant_bf16_us"] = timed(lambda: F.linear(xb, dequantize(w, torch.bfloat16))) * 1e6
            r["bf16_cublas_us"] = timed(lambda: F.linear(xb, Wb)) * 1e6
            r["bf16_rel_err"] = float((F.linear(xb, Wb).double() - exact).norm() / exact.norm())
            tiles = {}
            for bm, bn, nw in TILES:
                try:
                    tiles[f"{bm}x{bn}/{nw}"] = timed(lambda: gemm_i8(x, w, bm=bm, bn=bn, num_warps=nw)) * 1e6
                except Exception as e:      # a tile past the shared memory: recorded, not fatal
                    tiles[f"{bm}x{bn}/{nw}"] = f"failed: {str(e)[:60]}"
            ok = {k: v for k, v in tiles.items() if isinstance(v, float)}
            best = min(ok, key=ok.get)
            r.update(i8_tiles_us=tiles, i8_best=best, i8_best_us=ok[best], i8_default_us=ok.get("64x64/4"),
                     i8_rel_err=float((gemm_i8(x, w).double() - exact).norm() / exact.norm()))
            r["i8_vs_dequant_bf16"] = r["dequant_bf16_us"] / r["i8_best_us"]
            r["i8_vs_bf16_cublas"] = r["bf16_cublas_us"] / r["i8_best_us"]
            rows_out.append(r)
            print(json.dumps(r), file=sys.stderr)
        del w, W, Wb
    res = record(benchmark="int8_gemm", tag=args.tag, results=rows_out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"int8_gemm_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# INT2×INT8 GEMM (Q2_K × per-token int8) vs bfloat16 routes ({args.tag})", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}", "",
             "µs per product (median of 20); dequant + bf16: what `qlinear` does past 8 rows (dequantize the packed "
             "weight into bf16, cuBLAS); bf16 cuBLAS: weights dequantized once (a lower bound); relative error: "
             "Frobenius, against the float64 product of the float32 x and the dequantized weights", "",
             "| rows x cols | tokens | int8 best µs (tile) | int8 64x64 µs | dequant + bf16 µs | bf16 cuBLAS µs "
             "| int8 vs dequant + bf16 | int8 vs bf16 cuBLAS | int8 rel. error | bf16 rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['rows']}x{r['cols']} | {r['tokens']} | {r['i8_best_us']:.1f} ({r['i8_best']}) "
                     f"| {r['i8_default_us']:.1f} | {r['dequant_bf16_us']:.1f} | {r['bf16_cublas_us']:.1f} "
                     f"| {r['i8_vs_dequant_bf16']:.2f}x | {r['i8_vs_bf16_cublas']:.2f}x | {r['i8_rel_err']:.1e} "
                     f"| {r['bf16_rel_err']:.1e} |")
    (out / f"int8_gemm_{args.tag}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['rows']}x{r['cols']}\n{r['tokens']}" for r in rows_out]
    xs = range(len(rows_out))
    ax.bar([i - 0.2 for i in xs], [r["i8_vs_dequant_bf16"] for r in rows_out], 0.4, label="vs dequant + bf16")
    ax.bar([i + 0.2 for i in xs], [r["i8_vs_bf16_cublas"] for r in rows_out], 0.4, label="vs bf16 cuBLAS")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("speed-up of the int8 path (x)")
    ax.set_title(f"INT2×INT8 GEMM ({args.tag})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"int8_gemm_{args.tag}.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
