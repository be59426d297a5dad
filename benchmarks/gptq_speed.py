"""GPTQ of one matrix at Qwen2.5-32B's shapes, side by side in one run: the torch column loop ("torch"), the Triton
sweep (`algorithms/triton_gptq.py`, "triton") and the Triton sweep with the block fits replayed from CUDA graphs
(`algorithms/fit_graphs.py`, "triton+graphs"), with the time split into the factorisation, the block fits and the
rest (the sweep and the lazy updates); how many codes each gives alike with the torch loop.

    python benchmarks/gptq_speed.py --device cuda --tag h200
    python benchmarks/gptq_speed.py --device cpu --shapes 2048x1536:Q2_K --tag cpu-small

Writes benchmarks/results/gptq_speed_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import record  # noqa: E402

# the 32B model's GPTQ matrices (rows x cols) with the default recipe's types for them
SHAPES = ["27648x5120:Q2_K", "5120x27648:Q3_K", "5120x5120:Q2_K", "1024x5120:Q4_K", "64x27648:Q4_K"]
VARIANTS = ("torch", "triton", "triton+graphs")


def _inputs(rows: int, cols: int, device: str, tokens: int = 4096):
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(rows, cols, generator=g) * 0.02).to(device)
    x = torch.randn(tokens, cols, generator=g).to(device)
    x[:, : cols // 2] += 0.5 * x[:, cols // 2:]           # correlated inputs: the updates matter
    return W, 2 * x.T @ x / tokens


def run(args) -> dict:
    import twinquant.algorithms.gptq as G
    from twinquant.formats import codec_for

    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    spent = {"fit": 0.0, "factor": 0.0}
    real_fit, real_factor = G.fit_params, G.unit_factor

    def timed(key, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            r = fn(*a, **k)
            sync()
            spent[key] += time.perf_counter() - t
            return r
        return wrapper

    G.fit_params, G.unit_factor = timed("fit", real_fit), timed("factor", real_factor)
    rows_out = []
    try:
        for spec in args.shapes:
            shape, type_name = spec.split(":")
            rows, cols = map(int, shape.split("x"))
            W, H = _inputs(rows, cols, dev)
            codec = codec_for(type_name, cols)
            codes = {}
            for sweep in VARIANTS:
                os.environ["TWINQUANT_NO_TRITON"] = "1" if sweep == "torch" else "0"
                os.environ["TWINQUANT_NO_FIT_GRAPHS"] = "0" if sweep == "triton+graphs" else "1"
                best = None
                for _ in range(args.repeat):
                    spent.update(fit=0.0, factor=0.0)
                    sync()
                    t0 = time.perf_counter()
                    r = G.gptq(W, H, codec, importance=torch.diagonal(H))   # as the pipeline without an imatrix
                    sync()
                    tot = time.perf_counter() - t0
                    if best is None or tot < best["seconds"]:
                        best = {"seconds": tot, "fit_s": spent["fit"], "factor_s": spent["factor"], "loss": r.loss}
                codes[sweep] = r.codes.cpu()
                rest = best["seconds"] - best["fit_s"] - best["factor_s"]
                row = {"shape": shape, "type": type_name, "sweep": sweep, "seconds": round(best["seconds"], 3),
                       "factor_s": round(best["factor_s"], 3), "fit_s": round(best["fit_s"], 3),
                       "rest_s": round(rest, 3), "rest_us_per_column": round(rest / cols * 1e6, 1),
                       "loss": best["loss"]}
                rows_out.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                del r
            base = rows_out[-len(VARIANTS)]
            for r in rows_out[-len(VARIANTS) + 1:]:
                r["codes_same_as_torch"] = float((codes["torch"] == codes[r["sweep"]]).float().mean())
                r["speedup"] = round(base["seconds"] / r["seconds"], 2)
            del W, H
            if dev == "cuda":
                torch.cuda.empty_cache()
    finally:
        G.fit_params, G.unit_factor = real_fit, real_factor
        os.environ.pop("TWINQUANT_NO_TRITON", None)
        os.environ.pop("TWINQUANT_NO_FIT_GRAPHS", None)
    return record(benchmark="gptq_speed", tag=args.tag, device=dev, repeat=args.repeat, results=rows_out)


def write(res: dict, out: Path, tag: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gptq_speed_{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# GPTQ of one matrix: torch column loop vs Triton sweep, {res['device']}", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}", "",
             "| rows x cols | type | sweep | seconds | factor s | block fits s | rest s | rest µs/column "
             "| speedup | codes equal to torch's |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['shape']} | {r['type']} | {r['sweep']} | {r['seconds']:.3f} | {r['factor_s']:.3f} "
                     f"| {r['fit_s']:.3f} | {r['rest_s']:.3f} | {r['rest_us_per_column']} "
                     f"| {r.get('speedup', '')} | {r['codes_same_as_torch']:.5f} |" if "speedup" in r else
                     f"| {r['shape']} | {r['type']} | {r['sweep']} | {r['seconds']:.3f} | {r['factor_s']:.3f} "
                     f"| {r['fit_s']:.3f} | {r['rest_s']:.3f} | {r['rest_us_per_column']} | | |")
    table = "\n".join(lines) + "\n"
    (out / f"gptq_speed_{tag}.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['shape']}\n{r['type']} {r['sweep']}" for r in res["results"]]
    parts = [("factor_s", "factorisation"), ("fit_s", "block fits"), ("rest_s", "sweep + updates")]
    bottom = [0.0] * len(labels)
    for key, name in parts:
        vals = [r[key] for r in res["results"]]
        ax.bar(range(len(labels)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.set_ylabel("seconds")
    ax.set_title(f"GPTQ of one matrix ({res['device']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"gptq_speed_{tag}.png", dpi=120)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS:TYPE ...")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is kept (the first compiles)")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    print(write(run(args), Path(args.out), args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
