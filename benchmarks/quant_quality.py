"""Quality of 2-bit mixes: RTN vs GPTQ, with and without RH rotation, beside llama.cpp's own quantizer.

For each model: the dequantized packaged model is the reference (F32). Every variant is quantized into llama.cpp's
`Q2_K` mix (the types llama-quantize picks, incl. its fallbacks for rows not divisible by 256) and evaluated on
WikiText-2 test (llama.cpp protocol, ctx 512, 40 chunks) against the reference's log-probs: PPL, mean / p99 KLD,
same-top. llama.cpp's own `llama_model_quantize` (no imatrix) runs on an F32 export of the reference; its file is
compared byte for byte with our RTN file (identical codecs and types) and evaluated only if they differ.

    python benchmarks/quant_quality.py [--models smollm2-135m qwen2.5-coder-0.5b] [--chunks 40]
        [--variants rtn gptq rtn+rh gptq+rh gptq+pad gptq+pad+rh]

A variant is a method (rtn, gptq) plus optional steps: `rh` (R1+R2 randomized Hadamard) and `pad` (exact
zero-channel padding to multiples of 256, so rows take K-quants instead of llama.cpp's fallbacks).

Writes benchmarks/results/quant_quality[_TAG].{json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

from twinquant.calibration.windows import load_calibration
from twinquant.eval.perplexity import compute_logprobs, evaluate, windows_for_text
from twinquant.io.gguf_read import load_gguf
from twinquant.io.gguf_write import write_gguf
from twinquant.io.load import load_model
from twinquant.model import roles
from twinquant.allocation.mixes import assign_types
from twinquant.pipeline.executor import quantize_model
from twinquant.rotation.rotate import rotate

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return dst


def same_tensors(a: Path, b: Path) -> bool:
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    return len(ra.tensors) == len(tb) and all(
        t.tensor_type == tb[t.name].tensor_type and np.array_equal(np.asarray(t.data), np.asarray(tb[t.name].data))
        for t in ra.tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--mix", default="Q2_K")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--variants", nargs="+", default=["rtn", "gptq", "rtn+rh", "gptq+rh"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    args = ap.parse_args()
    stem = "quant_quality" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tq-bench-"))
    results = []
    for name in args.models:
        base = load_model(name, materialize=True)
        n_params = base.n_params()
        windows = windows_for_text(base, WIKI.read_text(encoding="utf-8"), 512, args.chunks, "llama.cpp")
        t0 = time.perf_counter()
        ref = compute_logprobs(base, windows)
        print(f"{name}: reference log-probs in {time.perf_counter() - t0:.0f}s", flush=True)
        f32 = write_gguf(base, tmp / f"{name}-f32.gguf", "F32")
        lcpp = llama_quantize(f32, tmp / f"{name}-lcpp-{args.mix}.gguf", args.mix)
        del base
        for variant in args.variants:
            method, *steps = variant.split("+")
            rotation = "rh" if "rh" in steps else "none"
            model = load_model(name, materialize=True)
            if "pad" in steps:
                from twinquant.export.padding import pad_model

                model = pad_model(model, ffn=True, heads=True).materialize()
            if rotation != "none":
                model.to(dtype=torch.float64)
                rotate(model, rotation, seed=0)
                model.to(dtype=torch.float32)
            calib = load_calibration(model, None, args.calib_tokens, 512) if method == "gptq" else None
            choices = assign_types(model.spec, roles.all_tensor_names(model.spec), mix=f"llama.cpp:{args.mix}")
            types = {c.name: c.type.name for c in choices if c.type.name not in ("F32", "F16", "BF16")}
            t0 = time.perf_counter()
            rep = quantize_model(model, types, method, calib.windows if calib else None, progress=False)
            qsec = time.perf_counter() - t0
            path = write_gguf(model, tmp / f"{name}-{variant}.gguf", "F16")
            row = {"model": name, "variant": "twinquant " + " + ".join([method.upper()] + [x.upper() for x in steps]),
                   "bytes": path.stat().st_size, "quantize_seconds": qsec,
                   "gptq_seconds_per_block": (sum(rep.seconds_per_block) / len(rep.seconds_per_block)
                                              if method == "gptq" else None)}
            if not steps and method == "rtn":
                row["identical_to_llama_cpp"] = same_tensors(path, lcpp)
            res = evaluate(model, windows, ref=ref, progress=False)
            row.update({k: res[k] for k in ("ppl", "ppl_err", "ref_ppl", "kld_mean", "kld_p99", "same_top")})
            row["bpw"] = 8 * row["bytes"] / n_params
            results.append(row)
            print(json.dumps(row), flush=True)
            if row.get("identical_to_llama_cpp") is False:
                lm = load_gguf(lcpp).materialize()
                r2 = evaluate(lm, windows, ref=ref, progress=False)
                results.append({"model": name, "variant": f"llama.cpp {args.mix}", "bytes": lcpp.stat().st_size,
                                "bpw": 8 * lcpp.stat().st_size / n_params,
                                **{k: r2[k] for k in ("ppl", "ppl_err", "ref_ppl", "kld_mean", "kld_p99",
                                                       "same_top")}})
            del model
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    print(f"\nWikiText-2 test, llama.cpp protocol, ctx 512, {args.chunks} chunks; KLD vs the dequantized original")
    print(f"{'model':<20} {'variant':<22} {'MiB':>7} {'bpw':>6} {'PPL':>9} {'ref PPL':>8} {'KLD':>8} {'KLD p99':>8} "
          f"{'same top':>8} {'GPTQ s/block':>12}")
    for r in results:
        note = " (= llama.cpp Q2_K, byte-identical)" if r.get("identical_to_llama_cpp") else ""
        gs = f"{r['gptq_seconds_per_block']:.1f}" if r.get("gptq_seconds_per_block") else ""
        print(f"{r['model']:<20} {r['variant']:<22} {r['bytes'] / 2**20:>7.1f} {r['bpw']:>6.2f} {r['ppl']:>9.3f} "
              f"{r['ref_ppl']:>8.3f} {r['kld_mean']:>8.4f} {r['kld_p99']:>8.3f} {100 * r['same_top']:>7.1f}% "
              f"{gs:>12}{note}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.scatter(r["bpw"], r["kld_mean"], label=f"{r['model']}: {r['variant']}")
    ax.set_xlabel("bits per weight (file)")
    ax.set_ylabel("mean KLD vs reference (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
