"""Decode speed of stock llama.cpp on this CPU, and how well `twinquant roofline` predicts it.

1. Calibration: the first N blocks of Qwen2.5-Coder-1.5B (real weights and tokenizer, tied 151936x1536 head) in
   one GGML type each (`llama-quantize --pure`; the types that need an importance matrix get a uniform one), so
   a file's decode time belongs to one type: efficiency(type) = bytes read per token / (copy bandwidth × time).
2. Validation: whole 28-block files of mixed types (the packaged Q4_K_M, the F16 reference, llama.cpp's and
   twinquant's quantized files from benchmarks/quality.py / frontier.py's cache): the roofline's prediction with
   the efficiencies of step 1 against the measured decode time.

Decode is timed through llama-cpp-python (the same llama.cpp build as the tools, 2 threads), one token per
`eval` after a 16-token prompt and 4 warm-up tokens, median over --tokens tokens, each file in a fresh process.
The copy bandwidth is measured in the same run (best of 1 s of 512 MiB copies, before and after).

    python benchmarks/decode_speed.py --tag cpu
Writes benchmarks/results/decode_speed_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import record  # noqa: E402
from quality import TWINQUANT, llamacpp_bin, llamacpp_version, log, run, sha256  # noqa: E402

MODEL = "qwen2.5-coder-1.5b"
QUALITY = Path.home() / ".cache" / "twinquant" / "quality" / MODEL
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS",
         "IQ2_XXS", "IQ1_M"]
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_S", "IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"}     # llama-quantize refuses them without
PROMPT, WARM = 16, 4

TIMER = r"""
import json, statistics, sys, time
import llama_cpp
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=threads, n_threads_batch=threads, n_batch=64,
                      verbose=False)
llm.eval(list(range(100, 100 + %d)))
for _ in range(%d):
    llm.eval([200])
ts = []
for _ in range(n):
    t0 = time.perf_counter()
    llm.eval([200])
    ts.append(time.perf_counter() - t0)
print(json.dumps({"median_s": statistics.median(ts), "mean_s": sum(ts) / n, "min_s": min(ts)}))
""" % (PROMPT, WARM)


def decode_time(path: Path, tokens: int, threads: int) -> dict:
    p = subprocess.run([sys.executable, "-c", TIMER, str(path), str(tokens), str(threads)], capture_output=True,
                       text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def truncated(ref: Path, layers: int, out: Path) -> Path:
    """The first `layers` blocks of the reference, F16, with its tokenizer (written once)."""
    if out.exists():
        return out
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.load import load_model
    from twinquant.model.layout import Layout
    from twinquant.model.model import Model

    src = load_model(ref)
    spec = dataclasses.replace(src.spec, n_layers=layers)
    names = [n for n in src.tensor_names() if not n.startswith("blk.") or int(n.split(".")[1]) < layers]
    m = Model(spec=spec, tokenizer=src.tokenizer, layout=Layout.sequential(layers), dtype=src.dtype,
              device=src.device, tensors={n: src.get(n) for n in names})
    tmp = out.with_suffix(".tmp.gguf")
    write_gguf(m, tmp, "F16")
    tmp.rename(out)
    return out


def uniform_imatrix(model_path: Path, out: Path) -> Path:
    """An importance matrix of ones for every block linear (llama-quantize needs one for IQ2_XXS/XS, IQ1_*)."""
    if out.exists():
        return out
    import numpy as np

    from twinquant.calibration.imatrix import Imatrix
    from twinquant.io.load import load_model
    from twinquant.model import roles

    m = load_model(model_path)
    sums, counts = {}, {}
    names = [n for layer in range(m.spec.n_layers) for n in roles.block_tensor_names(m.spec, layer)]
    for n in names + roles.global_tensor_names(m.spec):      # the IQ2 types want one for the embedding too
        shape = roles.expected_shape(m.spec, n)
        if len(shape) == 2:
            sums[n], counts[n] = np.ones(shape[1], np.float32), np.array([1], np.int64)
    Imatrix(sums, counts, ["uniform"], 1, 1).write_gguf(out)
    return out


def token_bytes(path: Path, ctx: int):
    from twinquant.runtime.roofline import file_token_bytes
    from twinquant.io.load import load_model

    return file_token_bytes(load_model(path, load_tokenizer=False), ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="blocks of the calibration files")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--validate", nargs="*", default=None,
                    help="whole-model files to predict (default: the packaged source and the quality cache's)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "twinquant" / "decode_speed"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--make-only", action="store_true", help="make the calibration files, measure nothing")
    args = ap.parse_args()
    from twinquant import zoo
    from twinquant.runtime.roofline import DEVICES, copy_bandwidth, predict

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bindir = llamacpp_bin()
    ref = QUALITY / "ref-f16.gguf"
    if not ref.exists():
        QUALITY.mkdir(parents=True, exist_ok=True)
        run(TWINQUANT + ["convert", MODEL, "-o", ref, "--outtype", "f16", "-q"], QUALITY / "ref.log")
    base = truncated(ref, args.layers, work / f"first{args.layers}-f16.gguf")
    ones = uniform_imatrix(base, work / f"first{args.layers}-ones.imatrix.gguf")
    calib = {}
    for t in args.types:
        f = base if t == "F16" else work / f"first{args.layers}-{t}.gguf"
        if not f.exists():
            extra = ["--imatrix", ones] if t in NEEDS_IMATRIX else []
            run([bindir / "llama-quantize", "--pure", *extra, base, f.with_suffix(".tmp.gguf"), t, args.threads],
                f.with_suffix(".log"))
            f.with_suffix(".tmp.gguf").rename(f)
        calib[t] = f
    if args.make_only:
        return
    if args.validate is None:          # model files only (not the imatrix, a dry run's or an unfinished one)
        made = [p for p in sorted(QUALITY.glob("*.gguf")) if p != ref and p.name != "imatrix.gguf"
                and ".tmp" not in p.name and not p.name.startswith("dry")]
        args.validate = [str(p) for p in [zoo.resolve(MODEL), ref, *made]]
    validate = list(dict.fromkeys(Path(p) for p in args.validate if Path(p).exists() and "tmp" not in Path(p).name))

    ctx = PROMPT + WARM + args.tokens // 2                # the mean context of the timed tokens
    bw = [copy_bandwidth()]
    log(f"copy bandwidth {bw[0]:.1f} GB/s")
    rows = []
    for kind, files in (("calibration", calib.items()), ("validation", ((p.name, p) for p in validate))):
        for name, f in files:
            m = decode_time(f, args.tokens, args.threads)
            tb = token_bytes(f, ctx)
            rows.append({"kind": kind, "name": name, "file": str(f), "file_bytes": f.stat().st_size,
                         "sha256": sha256(f), "bytes_per_token": tb.total, "weights_by_type": tb.weights,
                         "kv_bytes": tb.kv, **m})
            log(f"{kind} {name}: {1e3 * m['median_s']:.1f} ms/token, {tb.total / 1e6:.1f} MB/token")
    bw.append(copy_bandwidth())
    bandwidth = statistics.median(bw)
    log(f"copy bandwidth after {bw[1]:.1f} GB/s")

    # efficiency of a type: its bytes over the time left when the small rest (F32 norms, KV) moves at full speed
    eff = {}
    for r in (x for x in rows if x["kind"] == "calibration"):
        t = r["name"]
        rest = sum(b for k, b in r["weights_by_type"].items() if k != t) + r["kv_bytes"]
        main_s = r["median_s"] - rest / (bandwidth * 1e9)
        eff[t] = r["weights_by_type"][t] / (bandwidth * 1e9 * main_s)
    eff["*"] = statistics.median(eff.values())
    dev = dataclasses.replace(DEVICES["this-cpu"], efficiency=eff)
    from twinquant.runtime.roofline import TokenBytes

    for r in rows:
        tb = TokenBytes(weights=r["weights_by_type"], kv=r["kv_bytes"], ctx=ctx)
        p = predict(tb, dev, bandwidth)
        r["predicted_s"] = 1 / p.expected_tps
        r["bound_s"] = 1 / p.bound_tps
        r["measured_over_predicted"] = r["median_s"] / r["predicted_s"]

    prov = record(llama_cpp=llamacpp_version(bindir), tokens=args.tokens, threads=args.threads, ctx=ctx,
                  copy_bandwidth_gbs=bw, layers=args.layers)
    out = Path(args.out)
    stem = f"decode_speed_{args.tag}"
    res = {"provenance": prov, "bandwidth_gbs": bandwidth, "efficiency": eff, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / f"{stem}.md").write_text(md)
    plot(res, out / f"{stem}.png")
    print(md)


def markdown(res: dict) -> str:
    p = res["provenance"]
    lines = [f"# decode speed: stock llama.cpp on this CPU vs `twinquant roofline`", "",
             f"command: `{p['command']}`  ", f"commit {p['commit']}; llama.cpp {p['llama_cpp']}; "
             f"{p['machine']['cpu']}, {p['machine']['cores']} cores; {p['threads']} threads; copy bandwidth "
             f"{res['bandwidth_gbs']:.1f} GB/s (runs: {', '.join(f'{x:.1f}' for x in p['copy_bandwidth_gbs'])}); "
             f"context {p['ctx']} (mean of the timed tokens)", "",
             "| kind | file | MB read / token | measured ms / token | tokens/s | bandwidth bound tokens/s | "
             "predicted ms / token | measured ÷ predicted | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        e = f"{res['efficiency'][r['name']]:.3f}" if r["kind"] == "calibration" else ""
        lines.append(f"| {r['kind']} | {r['name']} | {r['bytes_per_token'] / 1e6:.1f} | {1e3 * r['median_s']:.1f} | "
                     f"{1 / r['median_s']:.2f} | {1 / r['bound_s']:.1f} | {1e3 * r['predicted_s']:.1f} | "
                     f"{r['measured_over_predicted']:.3f} | {e} |")
    v = [r["measured_over_predicted"] for r in res["rows"] if r["kind"] == "validation"]
    if v:
        lines += ["", f"Validation: measured ÷ predicted from {min(v):.3f} to {max(v):.3f} over {len(v)} files "
                  f"(target: within 0.75-1.25)."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for kind, c in (("calibration", "tab:blue"), ("validation", "tab:red")):
        rr = [r for r in rows if r["kind"] == kind]
        ax.scatter([1 / r["predicted_s"] for r in rr], [1 / r["median_s"] for r in rr], color=c, label=kind)
        for r in rr:
            ax.annotate(r["name"].replace(".gguf", "")[:28], (1 / r["predicted_s"], 1 / r["median_s"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    lim = max(max(1 / r["predicted_s"], 1 / r["median_s"]) for r in rows) * 1.1
    ax.plot([0, lim], [0, lim], color="gray", lw=0.8)
    ax.fill_between([0, lim], [0, 0.75 * lim], [0, 1.25 * lim], color="gray", alpha=0.1, label="±25%")
    ax.set_xlabel("predicted tokens/s (twinquant roofline)")
    ax.set_ylabel("measured tokens/s (llama.cpp CPU)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
