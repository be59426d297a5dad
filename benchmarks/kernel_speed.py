"""The runtime's Triton kernels on a GPU, side by side with their peers in one run: GB/s and % of measured copy
bandwidth, each result checked against float64.

    python benchmarks/kernel_speed.py --tag h200 [--llamacpp BUILD/test-backend-ops]

- copy: a device-to-device copy of 2 GiB (bytes read + written), the ceiling every % below is taken of.
- hadamard: twinquant's fast Hadamard transform (transforms/triton_hadamard.py) in bfloat16 at the widths of real
  models (Sylvester and Paley m = 12, 20, 28, 108, 140), 1 to 16384 rows; against the torch reference (radix-16
  matmul passes) and Dao-AILab's fast-hadamard-transform where it is installed and has the size.
- gemv: dequant-GEMV reading GGUF's K-quant bytes (formats/ggml/triton_kquants.py) on the Qwen2.5 1.5B/7B/32B
  linear shapes at batch 1, and batch 16/4096 through qlinear; against cuBLAS on float16 weights (torch) and,
  with --llamacpp, llama.cpp's CUDA MUL_MAT of the same type and shape (test-backend-ops perf, built by
  benchmarks/gpu_peers/ from the llama-cpp-python sdist with these shapes added to its perf list).
- Q2_K at batch 1 also through `gemv_q8(words=True)`: x quantized to int8 per 32 (llama.cpp's q8_1 rounding), dp4a
  products in the word-lane kernel (since s20; the rows-of-words kernel before), and both word-lane kernels on the
  weight in planes (`packed.planes`, since s21). TWINQUANT_WORDS / TWINQUANT_Q8 pick the runtime's kernels as they
  do for a decode (recorded in the command).

Timings: batch-1 GEMVs as a decode step runs them (back to back in one CUDA graph over copies of the weight that
overflow the L2, `graph_s`; since s21), everything else triton.testing.do_bench (median; the L2 is flushed before
every run: cold cache). Bytes: what the kernel must read and write (packed weights + activations for GEMV). Writes benchmarks/results/kernel_speed_TAG
.json / .md / .png with the device, driver and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import record  # noqa: E402

from twinquant.formats.ggml.packed import (QK_K, PackedWeight, dequantize, gemv, gemv_config, gemv_q8,  # noqa: E402
                                           kernel_key, planes, qlinear, quantize_q8, random_blocks)
from twinquant.transforms.hadamard import _kernel_runs, fwht, hadamard_plan  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
WIDTHS = [4096, 8192, 5120, 14336, 27648, 1536, 8960]
HAD_ROWS = [1, 16, 4096, 16384]
# rows x cols of the linears: Qwen2.5-32B (gate/up, down, q/o), Llama-3-8B down (llama.cpp's own perf shape),
# Qwen2.5-7B (gate/up, down), Qwen2.5-1.5B (gate/up, down)
SHAPES = [(27648, 5120), (5120, 27648), (5120, 5120), (4096, 14336), (18944, 3584), (3584, 18944), (8960, 1536),
          (1536, 8960)]
GEMV_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q6_K"]


def bench(fn) -> float:
    """Seconds per call: median of do_bench with the L2 flushed before each call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3


def graph_s(call, w) -> float:
    """Seconds per GEMV at batch 1, timed as decode runs it (`gemv_configs.graph_us`: calls back to back in one CUDA
    graph, each on its own copy of the weight, the copies overflowing the L2). do_bench timed each call from the
    host: GEMVs the graph times at 6-50 µs took 35-107 µs there, the launches' host time (s21's H200 run)."""
    from gemv_configs import cold_copies, graph_us

    return graph_us([lambda wi=wi: call(wi) for wi in cold_copies(w)]) / 1e6


def copy_bandwidth() -> float:
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    del x, y
    return 2 * 2**31 / t / 1e9


def fht_peer():
    """Dao-AILab's fast-hadamard-transform: (width -> callable or None, version), or (None, None) if absent."""
    try:
        import fast_hadamard_transform as fht
    except ImportError:
        return None, None
    from fast_hadamard_transform import fast_hadamard_transform_interface as fi

    fns = {1: fht.hadamard_transform}
    fns.update({m: getattr(fi, f"hadamard_transform_{m}N") for m in (12, 20, 28, 40)
                if hasattr(fi, f"hadamard_transform_{m}N")})

    def for_width(n):
        for m, f in fns.items():
            k = n // m
            if n % m == 0 and k & (k - 1) == 0:
                return lambda x: f(x, 1 / n ** 0.5)
        return None
    return for_width, getattr(fht, "__version__", "installed")


def _without_triton(fn):
    """fn run with the kernels switched off: twinquant's torch reference."""
    def run():
        os.environ["TWINQUANT_NO_TRITON"] = "1"
        try:
            return fn()
        finally:
            os.environ.pop("TWINQUANT_NO_TRITON")
    return run


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def hadamard_rows(copy_gbs: float, quick: bool) -> list[dict]:
    peer, _ = fht_peer()
    out = []
    for n in WIDTHS:
        plan = hadamard_plan(n)
        for rows in HAD_ROWS[:3] if quick else HAD_ROWS:
            x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            ref = fwht(x[:64].double(), plan=plan)
            nbytes = 2 * x.numel() * 2
            row = {"n": n, "m": plan.m, "rows": rows, "bytes": nbytes, "kernel": _kernel_runs(x, plan)}
            cands = {"twinquant": lambda: fwht(x, plan=plan),
                     "torch_reference": _without_triton(lambda: fwht(x, plan=plan))}
            f = peer(n) if peer else None
            if f is not None:
                cands["fast_hadamard_transform"] = lambda: f(x)
            for name, fn in cands.items():
                try:
                    t = bench(fn)
                    # the peer's order-m factor for m > 1 is its own matrix, not our Paley one: no common reference
                    err = rel_err(fn()[:64], ref) if name != "fast_hadamard_transform" or plan.m == 1 else None
                except Exception as e:           # a peer without this size raises
                    row[name + "_error"] = str(e).splitlines()[0][:200]
                    continue
                row[name] = {"us": t * 1e6, "gb_s": nbytes / t / 1e9, "pct_copy": 100 * nbytes / t / 1e9 / copy_gbs,
                             "rel_err": err}
            if "fast_hadamard_transform" in row and "twinquant" in row:
                row["ratio_vs_fht"] = row["fast_hadamard_transform"]["us"] / row["twinquant"]["us"]
            out.append(row)
            print(f"hadamard n={n:6d} rows={rows:6d}  " + "  ".join(
                f"{k} {v['gb_s']:7.1f} GB/s ({v['pct_copy']:4.1f}%) err {v['rel_err'] or 0:.1e}"
                for k, v in row.items() if isinstance(v, dict)), flush=True)
            del x
    return out


def gemv_rows(copy_gbs: float, quick: bool, types=GEMV_TYPES) -> list[dict]:
    out = []
    for rows, cols in SHAPES:
        xf = {b: torch.randn(b, cols, device="cuda") for b in (1, 16, 4096)}
        w16 = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        x16 = {b: v.half() for b, v in xf.items()}
        for t in types:
            try:
                out.extend(_gemv_type(t, rows, cols, xf, x16, w16, copy_gbs, quick))
            except Exception as e:               # record a kernel that does not build or run, go on
                out.append({"type": t, "rows": rows, "cols": cols, "error": str(e).splitlines()[0][:300]})
                print(f"gemv {t} {rows}x{cols}: FAILED {out[-1]['error']}", flush=True)
        del xf, w16, x16
        torch.cuda.empty_cache()
    return out


def _gemv_type(t, rows, cols, xf, x16, w16, copy_gbs, quick) -> list[dict]:
    out = []
    w = PackedWeight.from_bytes(t, random_blocks(t, rows, cols), cols, "cuda")
    wd = dequantize(w).double()
    for b in ((1,) if quick else (1, 16, 4096)):
        if b == 4096 and t != "Q2_K":
            continue
        x = xf[b]
        nbytes = w.data.numel() + x.numel() * 4 + b * rows * 4
        tq = graph_s(lambda wi: qlinear(x, wi), w) if b == 1 else bench(lambda: qlinear(x, w))
        err = rel_err(qlinear(x[:16], w), x[:16].double() @ wd.T)
        t16 = bench(lambda: torch.nn.functional.linear(x16[b], w16))
        row = {"type": t, "rows": rows, "cols": cols, "batch": b, "bytes": nbytes, "us": tq * 1e6,
               "gb_s": nbytes / tq / 1e9, "pct_copy": 100 * nbytes / tq / 1e9 / copy_gbs, "rel_err": err,
               "f16_cublas_us": t16 * 1e6, "speedup_vs_f16": t16 / tq,
               "config": gemv_config(kernel_key(t), rows, cols // QK_K)._asdict(), "kernel": kernel_key(t)}
        if t == "Q2_K" and b == 1:      # llama.cpp's arithmetic: x to int8 per 32 (its own kernel), dp4a products
            t8 = graph_s(lambda wi: gemv_q8(x, wi, words=True), w)
            row.update({"q8_us": t8 * 1e6, "q8_pct_copy": 100 * nbytes / t8 / 1e9 / copy_gbs,
                        "q8_rel_err": rel_err(gemv_q8(x, w, words=True), x.double() @ wd.T)})
            wp = planes(w)              # the same bytes in planes: float x and int8 x
            # x handed over already quantized (the runtime's int8 path: `packed.with_q8`)
            xq8 = quantize_q8(x, lanes=True)
            for key, fn, wk in (("planes", lambda wi: gemv(x, wi), wp),
                                ("q8planes", lambda wi: gemv_q8(x, wi, words=True), wp),
                                ("q8h", lambda wi: gemv_q8(x, wi, words=True, xq8=xq8), w),
                                ("q8hplanes", lambda wi: gemv_q8(x, wi, words=True, xq8=xq8), wp)):
                tp = graph_s(fn, wk)
                row.update({f"{key}_us": tp * 1e6, f"{key}_pct_copy": 100 * nbytes / tp / 1e9 / copy_gbs,
                            f"{key}_rel_err": rel_err(fn(wk), x.double() @ wd.T)})
            del wp
        out.append(row)
        print(f"gemv {t} {rows}x{cols} batch {b:5d}: {row['us']:8.1f} us {row['gb_s']:7.1f} GB/s "
              f"({row['pct_copy']:4.1f}% of copy), f16 cuBLAS {row['f16_cublas_us']:8.1f} us, err {err:.1e}",
              flush=True)
    return out


def llamacpp_rows(binary: str, types=GEMV_TYPES) -> tuple[list[dict], str]:
    """llama.cpp's CUDA MUL_MAT at batch 1 on SHAPES (test-backend-ops perf; its console lines parsed)."""
    types = "|".join(t[0].lower() + t[1:] for t in types) + "|f16"           # llama.cpp's names: q2_K
    shapes = "|".join(f"m={r},n=1,k={c}," for r, c in SHAPES)
    cmd = [binary, "perf", "-o", "MUL_MAT", "-b", "CUDA0", "-p", f"type_a=({types}),type_b=f32,({shapes})"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    pat = re.compile(r"MUL_MAT\(type_a=(\w+),type_b=f32,m=(\d+),n=1,k=(\d+),.*?:\s+(\d+) runs -\s+([\d.]+) us/run")
    out = []
    for ln in p.stdout.splitlines():
        mt = pat.search(ln)
        if mt:
            t, m, k, runs, us = mt.groups()
            out.append({"type": t.upper() if t != "f16" else "F16", "rows": int(m), "cols": int(k), "us": float(us)})
    return out, " ".join(cmd) + "\n" + p.stdout[-4000:] + p.stderr[-2000:]


def render(res: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    ax = axes[0]
    big = [r for r in res["hadamard"] if r["rows"] == max([x["rows"] for x in res["hadamard"]], default=0)]
    names = ["twinquant", "fast_hadamard_transform", "torch_reference"]
    for i, nm in enumerate(names):
        xs = [j + 0.27 * i for j, r in enumerate(big) if nm in r]
        ax.bar(xs, [r[nm]["pct_copy"] for r in big if nm in r], 0.27, label=nm)
    ax.set_xticks(range(len(big)), [f"{r['n']}" for r in big])
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title(f"Hadamard transform, bf16, {big[0]['rows'] if big else ''} rows")
    ax.axhline(80, ls=":", c="k")
    ax.legend()
    ax = axes[1]
    g = [r for r in res["gemv"] if r.get("batch") == 1 and r["type"] == "Q2_K"]
    ll = {(r["rows"], r["cols"]): r for r in res.get("llamacpp", []) if r["type"] == "Q2_K"}
    ax.bar([j for j in range(len(g))], [r["pct_copy"] for r in g], 0.4, label="twinquant Q2_K")
    ax.bar([j + 0.4 for j, r in enumerate(g) if (r["rows"], r["cols"]) in ll],
           [r["pct_copy"] * r["us"] / ll[(r["rows"], r["cols"])]["us"] for r in g if (r["rows"], r["cols"]) in ll],
           0.4, label="llama.cpp CUDA q2_K")
    ax.set_xticks(range(len(g)), [f"{r['rows']}x{r['cols']}" for r in g], rotation=30)
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title("dequant-GEMV, batch 1")
    ax.axhline(70, ls=":", c="k")
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=110)


def table(res: dict) -> str:
    by = res.get("copy_gb_s_by_section", {})
    lines = [f"# kernel_speed {res['tag']}", "", f"copy bandwidth: {res['copy_gb_s']:.0f} GB/s (read + write)"
             + "".join(f"; {sec} section: {v:.0f} GB/s (commit {res.get('section_commits', {}).get(sec)})"
                       for sec, v in by.items()), "",
             "## Hadamard transform (bf16): % of copy bandwidth", "",
             "| n | m | rows | twinquant | fast-hadamard-transform | torch reference | twinquant / fht |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["hadamard"]:
        c = [f"{r[k]['pct_copy']:.1f}%" if k in r else "-" for k in ("twinquant", "fast_hadamard_transform",
                                                                       "torch_reference")]
        lines.append(f"| {r['n']} | {r['m']} | {r['rows']} | {' | '.join(c)} | "
                     f"{r['ratio_vs_fht']:.2f}x |" if "ratio_vs_fht" in r else
                     f"| {r['n']} | {r['m']} | {r['rows']} | {' | '.join(c)} | - |")
    ll = {(r["type"], r["rows"], r["cols"]): r["us"] for r in res.get("llamacpp", [])}
    lines += ["", "## dequant-GEMV: µs and % of copy bandwidth", "",
              "| type | rows x cols | batch | twinquant µs | % copy | llama.cpp CUDA µs | twinquant / llama.cpp | "
              "f16 cuBLAS µs | rel. error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["gemv"]:
        if "error" in r:
            lines.append(f"| {r['type']} | {r['rows']}x{r['cols']} | - | failed: {r['error']} | | | | | |")
            continue
        lu = ll.get((r["type"], r["rows"], r["cols"])) if r["batch"] == 1 else None
        lus, ratio = (f"{lu:.1f}", f"{lu / r['us']:.2f}x") if lu else ("-", "-")
        lines.append(f"| {r['type']} | {r['rows']}x{r['cols']} | {r['batch']} | {r['us']:.1f} | {r['pct_copy']:.1f}% | "
                     f"{lus} | {ratio} | "
                     f"{r['f16_cublas_us']:.1f} | {r['rel_err']:.1e} |")
    q8 = [r for r in res["gemv"] if "q8_us" in r]
    if q8:
        lines += ["", "## Q2_K GEMV at batch 1 with int8 activations (llama.cpp's arithmetic: x to int8 per 32 by one "
                  "kernel, dp4a products; `packed.gemv_q8`) beside the float kernel", "",
                  "| rows x cols | float x: µs | % copy | int8 x (both kernels): µs | % copy | int8 / float speed | "
                  "rel. error vs float64 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in q8:
            lines.append(f"| {r['rows']}x{r['cols']} | {r['us']:.1f} | {r['pct_copy']:.1f}% | {r['q8_us']:.1f} | "
                         f"{r['q8_pct_copy']:.1f}% | {r['us'] / r['q8_us']:.2f}x | {r['q8_rel_err']:.1e} |")
    ll2 = {(r["rows"], r["cols"]): r["us"] for r in res.get("llamacpp", []) if r["type"] == "Q2_K"}
    kinds = [("us", "float x, GGUF layout"), ("q8_us", "int8 x, GGUF layout"), ("planes_us", "float x, planes"),
             ("q8planes_us", "int8 x, planes"), ("q8h_us", "int8 x handed over, GGUF layout"),
             ("q8hplanes_us", "int8 x handed over, planes")]
    pl = [r for r in q8 if "q8planes_us" in r]
    kinds = [k for k in kinds if all(k[0] in r for r in pl)]    # (files from before the hand-over lack it)
    if pl:
        lines += ["", "## Q2_K GEMV at batch 1: each kernel and layout (planes: `packed.planes`, the same bytes "
                  "regrouped at load) against llama.cpp's CUDA kernel, this run. int8 x: x quantized by its own "
                  "kernel, then the GEMV (llama.cpp's time includes its own quantization of x the same way); handed "
                  "over: the GEMV alone on x already quantized, as the runtime runs it (RMSNorm, SwiGLU and the decode "
                  "attention kernel store x's int8 form: `packed.with_q8`)", "",
                  "| rows x cols | " + " | ".join(f"{n}: µs (% copy)" for _, n in kinds) +
                  " | llama.cpp CUDA µs | best / llama.cpp speed | best quantizing x itself / llama.cpp |",
                  "|---" * (len(kinds) + 4) + "|"]
        for r in pl:
            cells = [f"{r[k]:.1f} ({r[k.replace('us', 'pct_copy')]:.1f}%)" for k, _ in kinds]
            lu = ll2.get((r["rows"], r["cols"]))
            best = min(r[k] for k, _ in kinds)
            own = min(r[k] for k, _ in kinds if not k.startswith("q8h"))
            ratios = [f"{lu / b:.2f}x" if lu else "-" for b in (best, own)]
            lines.append(f"| {r['rows']}x{r['cols']} | {' | '.join(cells)} | {lu if lu else '-'} | {' | '.join(ratios)} |")
    sw = [r for r in res.get("sweep", []) if "us" in r]
    if sw:
        lines += ["", "## Q2_K dequant-GEMV at batch 1: best of the sweep per shape (kernel, rows per program, warps, "
                  "split)", "", "| rows x cols | kernel | rows/program | warps | split | µs | % copy |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for shape in dict.fromkeys((r["rows"], r["cols"]) for r in sw):
            b = min((r for r in sw if (r["rows"], r["cols"]) == shape), key=lambda r: r["us"])
            lines.append(f"| {shape[0]}x{shape[1]} | {b['kernel']} | {b['br']} | {b['warps']} | {b['split']} | "
                         f"{b['us']:.1f} | {b['pct_copy']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--llamacpp", help="test-backend-ops built with CUDA (benchmarks/gpu_peers/build.sh)")
    ap.add_argument("--quick", action="store_true", help="fewer rows and batches")
    ap.add_argument("--sections", default="gemv,hadamard,llamacpp", help="comma-separated parts to run")
    ap.add_argument("--types", nargs="+", default=GEMV_TYPES, help="K-quant types of the gemv section")
    ap.add_argument("--resume", action="store_true", help="add the sections to an existing results file")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--render", help="re-render the table and PNG of a results JSON")
    a = ap.parse_args()
    if a.render:
        res = json.loads(Path(a.render).read_text())
        stem = Path(a.render).with_suffix("")
        stem.with_suffix(".md").write_text(table(res))
        render(res, stem)
        return
    if not torch.cuda.is_available():
        raise SystemExit("kernel_speed: needs a CUDA GPU")
    import triton

    stem = Path(a.out) / f"kernel_speed_{a.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    sections = a.sections.split(",")
    if stem.with_suffix(".json").exists() and a.resume:      # more sections, added to an earlier run's file
        res = json.loads(stem.with_suffix(".json").read_text())
        cb = copy_bandwidth()                                # this machine's copy: the ceiling of its sections
        res.setdefault("copy_gb_s_by_section", {}).update({sec: cb for sec in sections})
    else:
        res = record(tag=a.tag, triton=triton.__version__)
        res["copy_gb_s"] = copy_bandwidth()
        res["hadamard"], res["gemv"] = [], []
    print(f"copy bandwidth {res['copy_gb_s']:.0f} GB/s", flush=True)

    def save():
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        stem.with_suffix(".md").write_text(table(res))

    from provenance import git_commit
    res.setdefault("section_commits", {}).update({sec: git_commit() for sec in sections})
    def copy_of(sec):
        return res.get("copy_gb_s_by_section", {}).get(sec, res["copy_gb_s"])

    if "gemv" in sections:
        kept = [r for r in res["gemv"] if r["type"] not in a.types]      # rows of other types from earlier runs
        res["gemv"] = kept + gemv_rows(copy_of("gemv"), a.quick, a.types)
        save()
    if "hadamard" in sections:
        res["fast_hadamard_transform"] = fht_peer()[1]
        res["hadamard"] = hadamard_rows(copy_of("hadamard"), a.quick)
        save()
    if "llamacpp" in sections and a.llamacpp:
        res["llamacpp"], res["llamacpp_log"] = llamacpp_rows(a.llamacpp, a.types)
        save()
        save()
    render(res, stem)
    print(table(res))


if __name__ == "__main__":
    main()
