"""Where a decode step's GPU time goes: the kernels of one step of twinquant's runtime (packed GGML bytes or bfloat16
weights), from torch.profiler, grouped by what they do, next to the step's time as a CUDA graph.

The same synthetic files as `decode_gpu.py` (a real model's shapes in a llama-quantize mix). A graph replays the
eager step's kernels without the host between them, so the kernel total of an eager step is what a graph step can
at best take; the rest of a graph step is the gaps between its kernels.

    python benchmarks/decode_profile.py --tag h100 --shape qwen2.5-1.5b
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from decode_gpu import synthetic_file  # noqa: E402
from provenance import plot_option, plotted, record, results_stem, stacked_barh, write_results  # noqa: E402

# kernel name pattern -> what it does (first match wins)
GROUPS = [("gemv (Triton, packed bytes)", r"gemv|gemm_q"), ("dequantize (Triton)", r"dequant"),
          ("Hadamard (Triton)", r"fwht"), ("GEMM/GEMV (cuBLAS)", r"gemv|gemm|sm90|cutlass|ampere|Kernel2"),
          ("attention", r"flash|fmha|attention|softmax|efficient"), ("fill / zeros", r"fill|memset|zero"),
          ("copy / cast", r"copy|cast|convert|Memcpy"), ("reduce (norms, argmax)", r"reduce|norm|max|sum|mean"),
          ("index / cat / scatter", r"index|cat|scatter|gather|embedding"),
          ("elementwise", r"elementwise|vectorized|unrolled|pointwise")]


def group_of(name: str) -> str:
    low = name.lower()
    for g, pat in GROUPS:
        if re.search(pat, low):
            return g
    return "other"


def profile(path: Path, packed: bool, steps: int, ctx: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from twinquant.model.forward import KVCache, forward
    from twinquant.runtime.graph_decode import GraphStep
    from twinquant.runtime.packed_weights import load_for_decode

    model, counts = load_for_decode(path, torch.float32 if packed else torch.bfloat16, "cuda", kernels=packed,
                                    iquants=packed)
    cache = KVCache.empty(model, 1, ctx + 2 * steps + 16)
    with torch.inference_mode():
        forward(model, torch.arange(ctx)[None] + 100, cache=cache, logits_for=slice(-1, None))
        nxt = torch.tensor([[7]], device="cuda")
        for _ in range(3):                                   # compile and warm every kernel
            forward(model, nxt, cache=cache, logits_for=slice(-1, None))
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                forward(model, nxt, cache=cache, logits_for=slice(-1, None))
            torch.cuda.synchronize()
        step = GraphStep(model, cache)
        for _ in range(3):
            step(7)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(7)
        torch.cuda.synchronize()
        graph_ms = (time.perf_counter() - t0) * 1e3 / steps
    kernels: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name]
            k[0] += 1
            k[1] += e.time_range.elapsed_us()
    groups: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for name, (n, us) in kernels.items():
        g = groups[group_of(name)]
        g[0] += n
        g[1] += us
    per = lambda d: sorted(({"name": k, "per_step": n / steps, "us_per_step": us / steps} for k, (n, us) in d.items()),
                           key=lambda r: -r["us_per_step"])
    del model, cache, step
    torch.cuda.empty_cache()
    return {"packed": dict(counts), "graph_step_ms": graph_ms,
            "kernel_ms_per_step": sum(us for _, us in kernels.values()) / steps / 1e3,
            "kernels_per_step": sum(n for n, _ in kernels.values()) / steps,
            "groups": per(groups), "top_kernels": per(kernels)[:25]}


def markdown(res: dict) -> str:
    out = [f"# decode step profile ({res['tag']})", "", f"`{res['command']}` at {res['commit']}; "
           f"{res['machine'].get('gpu')}; context {res['ctx']} tokens, {res['steps']} steps profiled", ""]
    for run in res["runs"]:
        for key in ("packed", "bf16"):
            r = run[key]
            out += [f"## {run['shape']} ({run['mix']}), {key} weights", "",
                    f"graph step {r['graph_step_ms']:.3f} ms; eager kernels {r['kernel_ms_per_step']:.3f} ms in "
                    f"{r['kernels_per_step']:.0f} launches", "", "| group | launches/step | µs/step | share |",
                    "|---|---|---|---|"]
            tot = r["kernel_ms_per_step"] * 1e3
            out += [f"| {g['name']} | {g['per_step']:.0f} | {g['us_per_step']:.0f} | {g['us_per_step'] / tot:.0%} |"
                    for g in r["groups"]]
            out += ["", "| kernel | launches/step | µs/step |", "|---|---|---|"]
            out += [f"| `{k['name'][:90]}` | {k['per_step']:.0f} | {k['us_per_step']:.1f} |"
                    for k in r["top_kernels"][:12]]
            out.append("")
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    """Each run's eager kernel time per step, stacked by group, packed beside bfloat16 weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{run['shape']} {key}", run[key]) for run in res["runs"] for key in ("packed", "bf16")]
    groups = list(dict.fromkeys(g["name"] for _, r in bars for g in r["groups"]))
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(bars)))
    ax.scatter([r["graph_step_ms"] for _, r in bars], range(len(bars)), color="k", marker="|", s=300,
               label="CUDA graph step", zorder=3)
    stacked_barh(ax, [b for b, _ in bars], {name: [next((g["us_per_step"] / 1e3 for g in r["groups"]
                                                         if g["name"] == name), 0.0) for _, r in bars]
                                            for name in groups})
    ax.set_xlabel("ms per decode step (eager kernels by group)")
    ax.set_title(f"decode_profile {res['tag']}: {res['machine'].get('gpu')}, context {res['ctx']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", help="names the results files (required unless --plot)")
    ap.add_argument("--shape", nargs="+", default=["qwen2.5-1.5b"])
    ap.add_argument("--mix", default="llama.cpp:Q2_K")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=64, help="prompt tokens in the cache before the profiled steps")
    ap.add_argument("--work", default="/tmp/decode_gpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    plot_option(ap)
    a = ap.parse_args()
    if plotted(ap, a, plot):
        return
    if not torch.cuda.is_available():
        raise SystemExit("decode_profile: needs a CUDA GPU")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = record(tag=a.tag, ctx=a.ctx, steps=a.steps, runs=[])
    for shape in a.shape:
        path = synthetic_file(work, shape, a.mix)
        res["runs"].append({"shape": shape, "mix": a.mix, "packed": profile(path, True, a.steps, a.ctx),
                            "bf16": profile(path, False, a.steps, a.ctx)})
    write_results(results_stem(a.out, "decode_profile", a.tag), res, markdown(res), plot)


if __name__ == "__main__":
    main()
