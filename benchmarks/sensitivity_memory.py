"""Wall time and peak memory of `twinquant sensitivity` (streamed block by block) on a real model.

Runs the command as a subprocess (memory sampled as in pipeline_memory.py), and records beside it what the
former in-memory implementation had to hold: both models materialized in float32 (2 x parameters x 4 bytes).
Writes benchmarks/results/sensitivity_memory_TAG.{json,md,png} (the PNG is the command's own bar chart).

    python benchmarks/sensitivity_memory.py --model qwen2.5-coder-1.5b --quantized Q.gguf --tag qwen15
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_memory import run  # noqa: E402
from provenance import git_commit, machine, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--quantized", required=True, help="a quantized GGUF of MODEL")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out-dir", default=str(Path.home() / ".cache" / "twinquant" / "sensitivity_memory"))
    args = ap.parse_args()
    from twinquant.io.load import load_model
    from twinquant.zoo import resolve, sha256_of

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / args.tag
    cmd = [sys.executable, "-m", "twinquant", "sensitivity", args.model, "--quantized", args.quantized, "-o",
           str(stem), "--calib-tokens", str(args.calib_tokens)]
    commit = git_commit()     # the code that runs (HEAD may move while it does)
    res = run(cmd)
    sens = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {}
    spec_model = load_model(args.model, load_tokenizer=False)
    n_params = spec_model.n_params()
    src, q = resolve(args.model), Path(args.quantized)
    result = {
        "benchmark": "sensitivity_memory", "tag": args.tag, "command": " ".join(cmd), "commit": commit,
        "versions": versions(), "machine": machine(), "model": args.model,
        "model_sha256": sha256_of([src]) if src.is_file() else None, "quantized": q.name,
        "quantized_sha256": sha256_of([q]), "n_params": n_params, "n_layers": spec_model.spec.n_layers,
        "calibration_tokens": args.calib_tokens, "run": res,
        "in_memory_float32_gib": 2 * n_params * 4 / 2**30,
        "kld_quantized": sens.get("kld_quantized"), "ranking": sens.get("ranking", [])[:5],
    }
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"sensitivity_memory_{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    if stem.with_suffix(".png").is_file():
        shutil.copyfile(stem.with_suffix(".png"), dest / f"sensitivity_memory_{args.tag}.png")
    r = res
    top = ", ".join(f"{x['layer']} ({x['score']:.4f})" for x in result["ranking"])
    md = [f"# twinquant sensitivity: time and memory ({args.model})", "",
          f"command: `{result['command']}`  ", f"commit {result['commit'][:12]}; {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB; torch "
          f"{result['versions']['torch']}; quantized file {q.name} (sha256 {result['quantized_sha256'][:12]})", "",
          "| model | layers | calib tokens | wall min | CPU min | peak RSS GiB | both models in float32 GiB "
          "(the former in-memory pass) | KLD all quantized | most sensitive layers (score) |",
          "|---|---|---|---|---|---|---|---|---|",
          f"| {args.model} | {result['n_layers']} | {args.calib_tokens} | {r['wall_s'] / 60:.1f} | "
          f"{r['cpu_s'] / 60:.1f} | {r['peak_rss_gib']:.2f} | {result['in_memory_float32_gib']:.2f} | "
          f"{result['kld_quantized'] or 0:.4f} | {top} |", ""]
    (dest / f"sensitivity_memory_{args.tag}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
