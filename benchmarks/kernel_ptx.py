"""Instructions per weight of the packed GEMV kernels, read from the PTX Triton compiles for a GPU target: no GPU
needed (Triton's LLVM backend runs here). A batch-1 GEMV must issue few instructions a weight to keep up with
memory: at copy bandwidth B, bytes per weight b and an issue rate I (SMs × 4 schedulers × 32 lanes × clock), the
budget is I·b / B instructions a weight; above it the kernel is bound by issue, not by memory.

    python benchmarks/kernel_ptx.py --tag s19 [--rows 27648 --cols 5120] [--arch 90]

Counts are PTX instructions in the innermost loop (ptxas fuses some, e.g. and + or into one lop3, so SASS is a bit
fewer), per thread per iteration, times threads / weights per iteration. Each kernel at the runtime's launch for the
shape (`packed.gemv_config`), the int8 one at gemv_q8's."""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from twinquant.formats.ggml import triton_kquants as K  # noqa: E402

DEFAULT_K = K
from twinquant.formats.ggml.packed import KERNEL_TYPES, QK_K, _gemv_config, gemv_config, kernel_key  # noqa: E402

# issue-rate assumption for the budget column: H100 SXM (132 SMs, 1.98 GHz boost), copy as measured on it
# (gemv_configs_s17-h100.md: 3041 GB/s)
SMS, CLOCK_GHZ, COPY_GBS = 132, 1.98, 3041.0
CATEGORIES = {"load": ("ld.",), "shuffle": ("shfl",), "convert": ("cvt",), "float": (".f32", ".f16", ".f64"),
              "dp4a": ("dp4a",)}

W = {"w_ptr": "*u8", "x_ptr": "*fp32", "y_ptr": "*fp32", "b_ptr": "*fp32"}
DIMS = {"R": "i32", "NB": "i32", "row_bytes": "i32", "stride_xm": "i32", "stride_ym": "i32"}


def int_args(rows: int, cols: int) -> dict:
    """The integer arguments of a batch-1 launch on a [rows, cols] weight (those Triton sees divisible by 16 are
    specialised as such)."""
    nb = cols // QK_K
    return {"R": rows, "NB": nb, "row_bytes": nb * 84, "row_words": nb * 21,
            "stride_xm": cols, "stride_ym": rows, "stride_xq": cols // 4, "stride_xd": cols // 32,
            "stride_xs": cols // 16}


def compile_ptx(fn, sig: dict, consts: dict, warps: int, arch: int, ints: dict | None = None) -> str:
    """PTX of fn for sm_`arch`; pointers and the integer arguments in `ints` divisible by 16 marked so, as Triton
    marks them at such a launch."""
    ints = ints or {}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm["ptx"]


def innermost_loop(ptx: str) -> list[str]:
    """The instructions of the longest loop body (the loop over super-blocks), labels and comments dropped."""
    lines = ptx.splitlines()
    best: list[str] = []
    for i, ln in enumerate(lines):
        if "Loop Header" not in ln:
            continue
        label = ln.split(":")[0].strip()
        ends = [k for k, e in enumerate(lines) if re.search(r"bra(\.uni)?\s+" + re.escape(label) + ";", e)]
        body = [e for e in lines[i:max(ends) + 1] if ";" in e and not e.strip().startswith("//")] if ends else []
        best = max(best, body, key=len)
    return best


def opcode(line: str) -> str:
    return re.sub(r"^\s*(@!?%p\d+\s+)?", "", line).split()[0]


def kernels(rows: int, cols: int, K=K, iq: bool = True):
    """(name, type, kernel, signature, constexprs, warps, weights per iteration) at the runtime's launches."""
    nb = cols // QK_K
    for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        tid, bs = KERNEL_TYPES[t]
        c = gemv_config(kernel_key(t, False), rows, nb)
        sig = {**W, "tab_ptr": "*i64", "sign_ptr": "*i32", **DIMS}
        yield (f"generic {t}", t, K.gemv_kernel, sig, dict(TYPE=tid, BS=bs, BR=c.br, U=c.u, SPLIT=c.split,
                                                           HAS_BIAS=False), c, c.br * c.u * QK_K)
    for t in ("Q2_K", "Q3_K"):
        c = gemv_config(kernel_key(t, True), rows, nb)
        yield (f"byte-order {t}", t, K.gemv_bytes_kernel, {**W, **DIMS},
               dict(TYPE=KERNEL_TYPES[t][0], BR=c.br, U=c.u, SPLIT=c.split, HAS_BIAS=False), c, c.br * c.u * QK_K)
    c = gemv_config(kernel_key("Q2_K", words=True), rows, nb)
    sig = {**W, "w_ptr": "*i32", **{k if k != "row_bytes" else "row_words": v for k, v in DIMS.items()}}
    if hasattr(K, "gemv_q2k_words_kernel"):
        yield ("word-lane Q2_K", "Q2_K", K.gemv_q2k_words_kernel, sig,
               dict(BR=c.br, U=c.u, SPLIT=c.split, HAS_BIAS=False), c, c.br * c.u * QK_K)
    sig = {**W, "w_ptr": "*i16", **{k if k != "row_bytes" else "row_halves": v for k, v in DIMS.items()}}
    for t in ("Q3_K", "Q6_K"):
        fn = getattr(K, f"gemv_q{t[1]}k_words_kernel", None)
        if fn is not None:
            c = gemv_config(kernel_key(t, words=True), rows, nb)
            yield (f"word-lane {t}", t, fn, sig, dict(BR=c.br, U=c.u, SPLIT=c.split, HAS_BIAS=False), c,
                   c.br * c.u * QK_K)
    from twinquant.formats.ggml.triton_iquants import gemv_iq2_kernel

    for t in ("IQ2_XXS", "IQ2_XS") if iq else ():
        tid, bs = KERNEL_TYPES[t]
        c = gemv_config(kernel_key(t, True), rows, nb)
        yield (f"group {t}", t, gemv_iq2_kernel, {**W, "grid_ptr": "*fp32", "sign_ptr": "*i32", **DIMS},
               dict(TYPE=tid, BS=bs, BR=c.br, U=c.u, SPLIT=c.split, HAS_BIAS=False), c, c.br * c.u * QK_K)
    br, split = _gemv_config(rows, nb, 64, max_split=8)
    sig = {"w_ptr": "*i32", "xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": "*fp32", "R": "i32",
           "NB": "i32", "row_words": "i32", "stride_xq": "i32", "stride_xd": "i32", "stride_xs": "i32",
           "stride_ym": "i32"}
    yield ("int8 x (dp4a) Q2_K", "Q2_K", K.gemv_q2k_q8_kernel, sig, dict(BR=br, SPLIT=split, ASM=True),
           (br, 1, split, 2), br * QK_K)
    if hasattr(K, "gemv_q2k_q8_words_kernel"):
        c = gemv_config("Q2_K:q8words", rows, nb)
        yield ("int8 x (dp4a) word-lane Q2_K", "Q2_K", K.gemv_q2k_q8_words_kernel, sig,
               dict(BR=c.br, U=c.u, SPLIT=c.split, ASM=True), c, c.br * c.u * QK_K)


def measure(rows: int, cols: int, arch: int, K=K) -> list[dict]:
    """Each kernel's counts; K: the triton_kquants module to take the K-quant kernels from (the i-quant group
    kernels only with the tree's)."""
    out = []
    for name, t, fn, sig, consts, cfg, per_iter in kernels(rows, cols, K, iq=K is DEFAULT_K):
        warps = cfg[3]
        ints = int_args(rows, cols)
        ints["row_bytes"] = cols // QK_K * KERNEL_TYPES[t][1]
        ints["row_halves"] = ints["row_bytes"] // 2
        body = innermost_loop(compile_ptx(fn, sig, consts, warps, arch, ints))
        ops = collections.Counter(opcode(e) for e in body)
        per_weight = len(body) * 32 * warps / per_iter
        cats = {c: sum(n for op, n in ops.items() if any(k in op for k in keys)) * 32 * warps / per_iter
                for c, keys in CATEGORIES.items()}
        bpw = KERNEL_TYPES[t][1] / QK_K * 8
        budget = SMS * 4 * 32 * CLOCK_GHZ * 1e9 * (bpw / 8) / (COPY_GBS * 1e9)
        out.append({"kernel": name, "type": t, "bpw": bpw, "config": list(cfg), "instructions_per_iteration":
                    len(body), "weights_per_iteration": per_iter, "threads": 32 * warps,
                    "instructions_per_weight": per_weight, "by_category_per_weight": cats,
                    "budget_per_weight": budget, "top": ops.most_common(8)})
        print(f"{name:22s} {tuple(cfg)}: {per_weight:6.2f} instr/weight (budget {budget:.1f}); "
              + ", ".join(f"{k} {v:.2f}" for k, v in cats.items()), flush=True)
    return out


def add_measured(res: dict, path: Path, base: list[dict] | None = None) -> None:
    """Each kernel's measured % of copy at this shape from a `gemv_configs.py` results file (its best launch, which
    the runtime's table holds), and measured / issue bound (min(1, budget / instructions) of copy), the
    instructions counted on the kernels the sweep ran (`base`: those of its commit) where given."""
    sweep = json.loads(path.read_text())
    counted = {r["kernel"]: r["instructions_per_weight"] for r in base or []}
    kernel_of = {"Q2_K": "byte-order Q2_K", "Q3_K:bytes": "byte-order Q3_K", "IQ2_XS:bytes": "group IQ2_XS",
                 "IQ2_XXS:bytes": "group IQ2_XXS",
                 **{f"{t}:words": f"word-lane {t}" for t in ("Q2_K", "Q3_K", "Q6_K")}}
    for b in sweep["best"]:
        if [b["rows"], b["cols"]] != res["shape"]:
            continue
        name = kernel_of.get(b["type"], f"generic {b['type']}")
        for r in res["kernels"]:
            if r["kernel"] == name:
                r["measured_pct_copy"] = b["pct_copy"]
                r["measured_config"] = b["config"]
                n = counted.get(name, r["instructions_per_weight"])
                r["measured_kernel_instructions_per_weight"] = n
                r["measured_over_issue_bound"] = b["pct_copy"] / 100 / min(1.0, r["budget_per_weight"] / n)
    res["measured_from"] = f"{path.name} ({sweep['machine'].get('gpu')}, commit {sweep['commit'][:7]})"


def markdown(res: dict) -> str:
    out = [f"# GEMV kernels: PTX instructions per weight ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']}; Triton {res['triton']}, sm_{res['arch']}; shape "
           f"{res['shape'][0]}x{res['shape'][1]}; budget = instructions a weight at copy bandwidth ({COPY_GBS:.0f} "
           f"GB/s) for an H100 SXM issuing {SMS}×4×32 lanes at {CLOCK_GHZ} GHz", "",
           "| kernel | launch (BR, U, split, warps) | instr / weight | loads | shuffles | float | conversions | "
           "budget | over budget | measured % copy | measured / issue bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["kernels"]:
        c = r["by_category_per_weight"]
        out.append(f"| {r['kernel']} | {tuple(r['config'])} | {r['instructions_per_weight']:.2f} | {c['load']:.2f} | "
                   f"{c['shuffle']:.2f} | {c['float']:.2f} | {c['convert']:.2f} | {r['budget_per_weight']:.1f} | "
                   f"{r['instructions_per_weight'] / r['budget_per_weight']:.1f}x | "
                   + (f"{r['measured_pct_copy']:.1f} | {r['measured_over_issue_bound']:.2f} |"
                      if "measured_pct_copy" in r else "– | – |"))
    if res.get("measured_from"):
        out += ["", f"measured: {res['measured_from']}; issue bound = min(1, budget / instructions) of copy, the "
                f"instructions of the kernels measured ({res.get('base_kernels', 'these')})"]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["kernels"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(len(rows))
    ax.bar(list(xs), [r["instructions_per_weight"] for r in rows], 0.6, label="PTX instructions a weight")
    ax.scatter(list(xs), [r["budget_per_weight"] for r in rows], color="k", marker="_", s=400, zorder=3,
               label="budget at copy bandwidth (H100)")
    ax.set_xticks(list(xs), [r["kernel"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("instructions per weight (innermost loop)")
    ax.set_title(f"GEMV {res['shape'][0]}x{res['shape'][1]}: PTX for sm_{res['arch']}, Triton {res['triton']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--rows", type=int, default=27648)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--measured", help="a gemv_configs.py results file: its measured %% of copy beside the counts")
    ap.add_argument("--base", help="a `gemv_ab.py --prepare` folder holding the kernels the --measured sweep ran "
                    "(their counts give the measured / issue bound ratio)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    from provenance import record

    res = record(tag=a.tag, arch=a.arch, triton=triton.__version__, shape=[a.rows, a.cols],
                 budget_assumptions={"sms": SMS, "clock_ghz": CLOCK_GHZ, "copy_gbs": COPY_GBS})
    res["kernels"] = measure(a.rows, a.cols, a.arch)
    if a.measured:
        base = None
        if a.base:
            sys.path.insert(0, str(Path(a.base).resolve()))
            from basek import triton_kquants as base_kernels

            base = measure(a.rows, a.cols, a.arch, base_kernels)
            res["base_kernels"] = (Path(a.base) / "basek" / "__init__.py").read_text().strip().strip('"')
        add_measured(res, Path(a.measured), base)
    stem = Path(a.out) / f"kernel_ptx_{a.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
