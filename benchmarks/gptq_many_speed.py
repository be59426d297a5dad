"""GPTQ of a MoE layer's experts on the GPU (`gptq_many`): seconds per expert by batch size, in float32 and with
TF32 matmuls, on DeepSeek-V3's expert shape (2048 x 7168, Q2_K) by default; how many codes TF32 changes.

    python benchmarks/gptq_many_speed.py --device cuda --tag h200-v3-gate

Writes benchmarks/results/gptq_many_speed_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import record  # noqa: E402


def _case(n: int, rows: int, cols: int, tokens: int, device: str, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(n, rows, cols, generator=g) * 0.02).to(device)
    H = []
    for _ in range(n):
        x = torch.randn(tokens, cols, generator=g).to(device)
        H.append(2 * x.T @ x / tokens)
    return W, torch.stack(H)


def run(args) -> dict:
    from twinquant.algorithms.gptq import gptq_many
    from twinquant.formats import codec_for

    codec = codec_for(args.type, args.cols)
    rows = []
    base_codes = None
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for n in args.batches:
            W, H = _case(n, args.rows, args.cols, args.tokens, args.device)
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = gptq_many(W, H, codec, importance=torch.diagonal(H, dim1=1, dim2=2))
            if args.device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            codes = torch.stack([r.codes.to(torch.int32).cpu() for r in res[:1]])
            same = None
            if n == args.batches[0]:
                if base_codes is None:
                    base_codes = codes
                else:
                    same = float((codes == base_codes).float().mean())
            rows.append({"tf32": tf32, "experts": n, "seconds": round(sec, 2), "per_expert_s": round(sec / n, 3),
                         "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                         if args.device == "cuda" else None, "codes_same_as_fp32": same})
            print(json.dumps(rows[-1]), file=sys.stderr)
            del W, H, res
    return record(benchmark="gptq_many_speed", tag=args.tag, type=args.type, rows_per_expert=args.rows,
                  cols=args.cols, tokens=args.tokens, device=args.device, results=rows)


def write(res: dict, out: Path, tag: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gptq_many_speed_{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# gptq_many: {res['type']} experts of {res['rows_per_expert']} x {res['cols']}, {res['device']}", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}", "",
             "| TF32 | experts per batch | seconds | s per expert | peak GPU GiB | codes equal to fp32's |",
             "|---|---|---|---|---|---|"]
    for r in res["results"]:
        same = "" if r["codes_same_as_fp32"] is None else f"{r['codes_same_as_fp32']:.4f}"
        lines.append(f"| {r['tf32']} | {r['experts']} | {r['seconds']:.2f} | {r['per_expert_s']:.3f} "
                     f"| {r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else ''} | {same} |")
    table = "\n".join(lines) + "\n"
    (out / f"gptq_many_speed_{tag}.md").write_text(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for tf32 in (False, True):
        rs = [r for r in res["results"] if r["tf32"] == tf32]
        ax.plot([r["experts"] for r in rs], [r["per_expert_s"] for r in rs], "o-", label=f"TF32 {tf32}")
    ax.set_xlabel("experts per batch")
    ax.set_ylabel("seconds per expert")
    ax.set_title(f"gptq_many {res['type']} {res['rows_per_expert']}x{res['cols']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"gptq_many_speed_{tag}.png", dpi=120)
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="Q2_K")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    print(write(run(args), Path(args.out), args.tag))
    return 0


if __name__ == "__main__":
    sys.exit(main())
