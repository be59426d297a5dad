"""What `twinquant roofline` predicts for a model shape in llama-quantize's low-bit mixes on each device: bits per
weight, GB read per token, bandwidth-bound and expected tokens/s, and whether the weights fit a memory budget
(an M1 Pro with 16 GB lets the GPU use about 10.7 GB).

    python benchmarks/roofline_predictions.py --shape qwen2.5-32b --tag qwen32b
Writes benchmarks/results/roofline_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import record  # noqa: E402

MIXES = ["IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K", "IQ3_XXS", "Q3_K_S", "IQ4_XS", "Q4_K_M"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-32b")
    ap.add_argument("--mixes", nargs="+", default=MIXES, help="llama-quantize ftypes, or twinquant:Q2_K")
    ap.add_argument("--devices", nargs="+", default=["m1-pro", "m2-max", "m3-max", "h200"])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--budget-gb", type=float, default=10.7, help="weights + KV that fit (M1 Pro 16 GB: ~10.7)")
    ap.add_argument("--tag", default="qwen32b")
    args = ap.parse_args()
    from twinquant.runtime import roofline as rf

    spec = rf.shape_spec(args.shape)
    n = rf.n_weights(spec)
    rows = []
    for mix in args.mixes:
        tb = rf.plan_token_bytes(spec, rf.mix_types(spec, mix if ":" in mix else f"llama.cpp:{mix}"), args.ctx)
        row = {"mix": mix, "bpw": 8 * tb.stored / n, "stored_gb": tb.stored / 1e9, "read_gb": tb.total / 1e9,
               "fits": (tb.stored + tb.kv) / 1e9 <= args.budget_gb}
        for d in args.devices:
            p = rf.predict(tb, d)
            row[d] = {"bound_tps": p.bound_tps, "expected_tps": p.expected_tps}
        rows.append(row)
    prov = record(shape=args.shape, ctx=args.ctx, budget_gb=args.budget_gb)
    devs = {d: {"description": rf.DEVICES[d].description, "bandwidth_gbs": rf.DEVICES[d].bandwidth,
                "source": rf.DEVICES[d].source} for d in args.devices}
    out = ROOT / "benchmarks" / "results"
    stem = f"roofline_{args.tag}"
    (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "devices": devs, "rows": rows}, indent=1))
    md = [f"# `twinquant roofline`: {args.shape} in llama-quantize's mixes (with an imatrix)", "",
          f"command: `{prov['command']}`  ", f"commit {prov['commit']}; context {args.ctx}; "
          f"fits = weights + KV cache <= {args.budget_gb} GB", "",
          "| mix | bpw | weights GB | read / token GB | fits | "
          + " | ".join(f"{d} bound / expected t/s" for d in args.devices) + " |",
          "|---|---|---|---|---|" + "---|" * len(args.devices)]
    for r in rows:
        md.append(f"| {r['mix']} | {r['bpw']:.3f} | {r['stored_gb']:.2f} | {r['read_gb']:.2f} | "
                  f"{'yes' if r['fits'] else 'no'} | "
                  + " | ".join(f"{r[d]['bound_tps']:.1f} / {r[d]['expected_tps']:.1f}" for d in args.devices) + " |")
    md += ["", "Figures per device: " + "; ".join(f"{d}: {v['source']}" for d, v in devs.items())]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in args.devices:
        ax.plot([r["bpw"] for r in rows], [r[d]["expected_tps"] for r in rows], marker="o", label=f"{d} expected")
    ax.axvline(8 * args.budget_gb * 1e9 / n, color="gray", ls="--", lw=0.8, label=f"{args.budget_gb} GB budget")
    ax.set_xlabel("bits per weight (llama-quantize mix)")
    ax.set_ylabel("tokens/s (predicted)")
    ax.set_yscale("log")
    ax.set_title(f"{args.shape}: predicted decode speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print("\n".join(md))


if __name__ == "__main__":
    main()
