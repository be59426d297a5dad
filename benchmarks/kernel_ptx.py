"""Instructions per weight of the packed GEMV kernels, read from the PTX and the machine code Triton compiles for a
GPU target, and a static model of their speed: no GPU needed (Triton's LLVM backend and ptxas run here). A batch-1
GEMV must issue few instructions a weight to keep up with memory: at copy bandwidth B, bytes per weight b and an
issue rate I (SMs × 4 schedulers × 32 lanes × clock), the budget is I·b / B instructions a weight; above it the
kernel is bound by issue, not by memory.

    python benchmarks/kernel_ptx.py --tag s20 [--rows 27648 --cols 5120] [--arch 90]

Counts are instructions in the innermost loop (PTX; SASS: ptxas fuses some, e.g. and + or into one lop3), per thread
per iteration, times threads / weights per iteration. The model adds what the count alone misses: registers limit
the programs resident on a SM, which limits the bytes in flight (Little's law) and leaves a partial last wave. Each
kernel at the runtime's launch for the shape (`packed.gemv_config`), the int8 ones at gemv_q8's."""

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
# loaded DRAM latency assumed for Little's law (H100 HBM3 measures ~500-700 ns under load); bytes a SM must keep in
# flight = COPY_GBS x LATENCY_NS / SMS (~14 KB)
LATENCY_NS = 600.0
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


def compile_kernel(fn, sig: dict, consts: dict, warps: int, arch: int, ints: dict | None = None):
    """fn compiled for sm_`arch` (its .asm holds the PTX and the cubin); pointers and the integer arguments in `ints`
    divisible by 16 marked so, as Triton marks them at such a launch."""
    ints = ints or {}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or (n in ints and ints[n] % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def _nv_tool(name: str) -> str:
    """One of the CUDA binary tools Triton's wheel ships (nvdisasm, cuobjdump)."""
    import triton.backends.nvidia as nv

    return str(Path(nv.__file__).parent / "bin" / name)


def sass_loop_and_registers(cubin: bytes) -> tuple[list[str], int]:
    """The SASS of the longest loop body (a backward branch to a label) and the registers a thread uses, from the
    machine code ptxas made (what the GPU runs: ptxas fuses and schedules, so it is the count that matters)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nv_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
        usage = subprocess.run([_nv_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    labels = {ln.strip().rstrip(":"): i for i, ln in enumerate(sass) if re.match(r"^\.L_x_\d+:", ln.strip())}
    best: list[str] = []
    for i, ln in enumerate(sass):
        m = re.search(r"BRA\s+`\((\.L_x_\d+)\)", ln)
        if m and labels.get(m.group(1), i + 1) < i:
            body = [e for e in sass[labels[m.group(1)]:i + 1] if re.match(r"^\s*/\*[0-9a-f]+\*/", e)]
            best = max(best, body, key=len)
    return best, regs


def occupancy(regs: int, warps: int) -> int:
    """Resident programs per SM on sm_90: 64K registers (allocated per warp in units of 256), 64 warps, 32 blocks;
    shared memory is not the limit for these kernels (a few KB)."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(0, min(65536 // (per_warp * warps), 64 // warps, 32))


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


def sass_opcode(line: str) -> str:
    """The opcode of an nvdisasm line ("/*0a30*/  @!P0 BAR.SYNC.DEFER_BLOCKING 0x0 ;" -> "BAR.SYNC.DEFER_BLOCKING")."""
    return re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", line).split()[0]


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
    for spec in WORD_SPECS[:3]:
        if hasattr(K, WORD_KERNELS[spec]):
            c = gemv_config(spec, rows, nb)
            yield (*word_kernel(spec, c, K), c, c.br * c.u * QK_K)
    from twinquant.formats.ggml.triton_iquants import gemv_iq2_kernel

    for t in ("IQ2_XXS", "IQ2_XS") if iq else ():
        tid, bs = KERNEL_TYPES[t]
        c = gemv_config(kernel_key(t, True), rows, nb)
        yield (f"group {t}", t, gemv_iq2_kernel, {**W, "grid_ptr": "*fp32", "sign_ptr": "*i32", **DIMS},
               dict(TYPE=tid, BS=bs, BR=c.br, U=c.u, SPLIT=c.split, HAS_BIAS=False), c, c.br * c.u * QK_K)
    br, split = _gemv_config(rows, nb, 64, max_split=8)
    yield ("int8 x (dp4a) Q2_K", "Q2_K", K.gemv_q2k_q8_kernel, Q8_SIG, dict(BR=br, SPLIT=split, ASM=True),
           (br, 1, split, 2), br * QK_K)
    for spec in WORD_SPECS[3:]:
        fn = getattr(K, WORD_KERNELS[spec], None)
        if fn is not None and (not spec.endswith("planes") or "PLANES" in fn.arg_names):
            c = gemv_config(spec, rows, nb)
            yield (*word_kernel(spec, c, K), c, c.br * c.u * QK_K)


# the word-lane kernels by launch-table key (their launches the static model can pick: `--launches`); ":planes":
# Q2_K's kernels reading the planes layout (`packed.planes`)
WORD_SPECS = ("Q2_K:words", "Q3_K:words", "Q6_K:words", "Q2_K:q8words", "Q2_K:planes", "Q2_K:q8planes")
WORD_KERNELS = {"Q2_K:words": "gemv_q2k_words_kernel", "Q3_K:words": "gemv_q3k_words_kernel",
                "Q6_K:words": "gemv_q6k_words_kernel", "Q2_K:q8words": "gemv_q2k_q8_words_kernel",
                "Q2_K:planes": "gemv_q2k_words_kernel", "Q2_K:q8planes": "gemv_q2k_q8_words_kernel"}
ARG_TYPES = {"w_ptr": "*i32", "xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": "*fp32",
             "b_ptr": "*fp32", "x_ptr": "*fp32"}
Q8_SIG = {"w_ptr": "*i32", "xq_ptr": "*i32", "xd_ptr": "*fp32", "xs_ptr": "*fp32", "y_ptr": "*fp32", "R": "i32",
          "NB": "i32", "row_words": "i32", "stride_xq": "i32", "stride_xd": "i32", "stride_xs": "i32",
          "stride_ym": "i32"}
# at the 32B FFN shape: a Q2_K row of 20 super-blocks is 420 int32 words, a multiple of 4
PLANES_ALIGN = 4


def word_label(spec: str) -> str:
    """The report's name of a word-lane kernel spec ("Q2_K:q8planes" -> "int8 x (dp4a) word-lane Q2_K (planes)")."""
    t, kind = spec.split(":")
    return (("int8 x (dp4a) " if kind.startswith("q8") else "") + f"word-lane {t}"
            + (" (planes)" if kind.endswith("planes") else ""))


def word_kernel(spec: str, c, K=K) -> tuple:
    """(name, type, kernel, signature, constexprs) of a word-lane kernel at launch c (the signature from the
    kernel's own arguments: older kernels of a --base checkout took x's strides and no bias)."""
    t = spec.split(":")[0]
    fn = getattr(K, WORD_KERNELS[spec])
    consts = dict(BR=c.br, U=c.u, SPLIT=c.split)
    names = [p.name for p in fn.params if not p.is_constexpr]
    if "PLANES" in fn.arg_names:          # (compiling from source takes no defaults)
        planes = spec.endswith((":planes", ":q8planes"))
        consts.update(PLANES=planes, ALIGN=PLANES_ALIGN if planes else 1)
    if "HAS_BIAS" in fn.arg_names:
        consts["HAS_BIAS"] = False
    if "PREFETCH" in fn.arg_names:
        consts["PREFETCH"] = False
    if "XB" in fn.arg_names:              # as gemv_q8 launches it
        from twinquant.formats.ggml.packed import _x_broadcast

        consts["XB"] = _x_broadcast(c)
    if spec.endswith((":q8words", ":q8planes")):
        consts["ASM"] = True
    w_ptr = "*i32" if t == "Q2_K" else "*i16"        # Q3_K, Q6_K: read as 16-bit halves
    sig = {n: w_ptr if n == "w_ptr" else ARG_TYPES.get(n, "i32") for n in names}
    return word_label(spec), t, fn, sig, consts


SHARED_MEMORY_OPS = ("BAR", "STS", "LDS", "STSM", "LDSM")


def loop_shared_memory_ops(spec: str, c, rows: int = 27648, cols: int = 5120, arch: int = 90) -> dict:
    """The shared-memory instructions and barriers (SASS opcode -> count) in the loop of word-lane kernel `spec` at
    launch c: a word-lane kernel should have none (each lane holds its own values). The int8 kernel had 12 barriers
    a step while x's loads had fewer values than threads (Triton moved them through shared memory into the lanes'
    layout; benchmarks/results/gemv_limits_s22-h100-c.md)."""
    body, _ = loop_sass(spec, c, K, rows, cols, arch)
    ops = collections.Counter(sass_opcode(e) for e in body)
    return {op: n for op, n in ops.items() if op.split(".")[0] in SHARED_MEMORY_OPS}


def loop_sass(spec: str, c, K=K, rows: int = 27648, cols: int = 5120, arch: int = 90) -> tuple[list[str], int]:
    """(loop SASS, registers) of word-lane kernel `spec` of module K at launch c."""
    _, t, fn, sig, consts = word_kernel(spec, c, K)
    k = compile_kernel(fn, sig, consts, c[3], arch, shape_ints(rows, cols, t))
    return sass_loop_and_registers(k.asm["cubin"])


# launches that show where a word-lane kernel's loop moves values through shared memory: lanes (rows x super-blocks
# x 4) above, equal to and below the program's threads
SHARED_PROBES = [(8, 4, 1, 2), (8, 4, 1, 4), (8, 8, 1, 2), (16, 4, 1, 2), (32, 4, 4, 4), (16, 16, 1, 4),
                 (8, 2, 4, 8), (16, 2, 2, 8), (16, 1, 4, 8)]


def shared_ops_table(modules: dict, arch: int) -> list[dict]:
    """For each word-lane kernel and `SHARED_PROBES` launch, each module's loop: registers, SASS a weight and its
    shared-memory ops and barriers (the tree's kernels beside other versions of triton_kquants.py)."""
    from twinquant.formats.ggml.packed import GemvConfig

    out = []
    for spec in WORD_SPECS:
        for probe in SHARED_PROBES:
            c = GemvConfig(*probe)
            row = {"kernel": spec, "launch": list(c), "lanes": c.br * c.u * 4, "threads": 32 * c.warps}
            for name, mod in modules.items():
                body, regs = loop_sass(spec, c, mod, arch=arch)
                ops = collections.Counter(sass_opcode(e) for e in body)
                row[name] = {"registers": regs, "sass_per_weight": len(body) * 32 * c.warps / (c.br * c.u * QK_K),
                             "shared_ops": sum(n for op, n in ops.items() if op.split(".")[0] in SHARED_MEMORY_OPS)}
            out.append(row)
            print(spec, probe, {k: v for k, v in row.items() if isinstance(v, dict)}, flush=True)
    return out


def shared_markdown(res: dict) -> str:
    names = list(res["modules"])
    out = [f"# Shared-memory moves in the word-lane GEMV loops ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']}; Triton {res['triton']}, sm_{res['arch']}, compiled here (no GPU). "
           "Per loop step: registers / SASS a weight / shared-memory ops and barriers (BAR, STS, LDS, STSM, LDSM). "
           "Modules: " + "; ".join(f"{n}: {d}" for n, d in res["modules"].items()), "",
           "| kernel | launch | lanes / threads | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for r in res["rows"]:
        out.append(f"| {r['kernel']} | {tuple(r['launch'])} | {r['lanes']} / {r['threads']} | " + " | ".join(
            f"{r[n]['registers']} / {r[n]['sass_per_weight']:.2f} / {r[n]['shared_ops']}" for n in names) + " |")
    return "\n".join(out) + "\n"


def budget(t: str) -> float:
    """Instructions a weight of type t that keep up with copy bandwidth on the H100 (lanes issued per byte read)."""
    return SMS * 4 * 32 * CLOCK_GHZ * 1e9 * (KERNEL_TYPES[t][1] / QK_K) / (COPY_GBS * 1e9)


def static_model(rows: int, t: str, cfg, per_iter: int, sass_per_weight: float, regs: int) -> dict:
    """Issue (SASS a weight vs the budget), memory-level parallelism (one iteration's weight bytes in flight per
    resident program, against bandwidth × latency per SM: Little's law) and the last wave of a launch."""
    br, split, warps = cfg[0], cfg[2], cfg[3]
    per_sm = occupancy(regs, warps)
    grid = -(-rows // br) * split
    slots = per_sm * SMS
    wave_eff = grid / (-(-grid // slots) * slots) if slots else 0.0
    in_flight = min(per_sm, grid / SMS) * per_iter * KERNEL_TYPES[t][1] / QK_K
    mlp = min(1.0, in_flight / (COPY_GBS * LATENCY_NS / SMS))
    issue = min(1.0, budget(t) / sass_per_weight)
    return {"programs_per_sm": per_sm, "grid": grid, "wave_efficiency": wave_eff, "bytes_in_flight_per_sm":
            in_flight, "issue_bound": issue, "mlp_bound": mlp, "model_pct_copy": 100 * wave_eff * min(issue, mlp)}


def measure(rows: int, cols: int, arch: int, K=K) -> list[dict]:
    """Each kernel's counts and static model; K: the triton_kquants module to take the K-quant kernels from (the
    i-quant group kernels only with the tree's)."""
    out = []
    for name, t, fn, sig, consts, cfg, per_iter in kernels(rows, cols, K, iq=K is DEFAULT_K):
        warps = cfg[3]
        k = compile_kernel(fn, sig, consts, warps, arch, shape_ints(rows, cols, t))
        body = innermost_loop(k.asm["ptx"])
        sass, regs = sass_loop_and_registers(k.asm["cubin"])
        ops = collections.Counter(opcode(e) for e in body)
        per_weight = len(body) * 32 * warps / per_iter
        sass_per_weight = len(sass) * 32 * warps / per_iter
        cats = {c: sum(n for op, n in ops.items() if any(k in op for k in keys)) * 32 * warps / per_iter
                for c, keys in CATEGORIES.items()}
        m = static_model(rows, t, cfg, per_iter, sass_per_weight, regs)
        out.append({"kernel": name, "type": t, "bpw": KERNEL_TYPES[t][1] / QK_K * 8, "config": list(cfg),
                    "instructions_per_iteration": len(body), "weights_per_iteration": per_iter,
                    "threads": 32 * warps, "instructions_per_weight": per_weight, "by_category_per_weight": cats,
                    "sass_per_weight": sass_per_weight, "registers": regs, **m, "budget_per_weight": budget(t),
                    "top": ops.most_common(8)})
        print(f"{name:22s} {tuple(cfg)}: {per_weight:6.2f} PTX / {sass_per_weight:5.2f} SASS a weight (budget "
              f"{budget(t):.1f}); {regs} regs, {m['programs_per_sm']} programs/SM, waves "
              f"{m['wave_efficiency']:.2f}, {m['bytes_in_flight_per_sm'] / 1024:.1f} KB in flight/SM -> model "
              f"{m['model_pct_copy']:.0f}% of copy", flush=True)
    return out


def shape_ints(rows: int, cols: int, t: str) -> dict:
    """`int_args` with the row length in bytes / 16-bit halves of type t."""
    ints = int_args(rows, cols)
    ints["row_bytes"] = cols // QK_K * KERNEL_TYPES[t][1]
    ints["row_halves"] = ints["row_bytes"] // 2
    ints["row_n"] = ints["row_words"]
    return ints


def model_launches(arch: int) -> dict:
    """For each word-lane kernel (`WORD_SPECS`) and each shape of `gemv_configs.SHAPES`, the launch of the sweep's
    space (`gemv_configs.configs`) the static model ranks first: each launch compiled once (at the 32B FFN shape's
    alignment), its SASS and registers then modelled at every shape."""
    from gemv_configs import SHAPES, configs

    shapes = [s for v in SHAPES.values() for s in v]
    out: dict[str, list] = {}
    for spec in WORD_SPECS:
        t = spec.split(":")[0]
        stats = []
        for c in configs(spec):
            name, t, fn, sig, consts = word_kernel(spec, c)
            k = compile_kernel(fn, sig, consts, c.warps, arch, shape_ints(27648, 5120, t))
            sass, regs = sass_loop_and_registers(k.asm["cubin"])
            stats.append((c, len(sass) * 32 * c.warps / (c.br * c.u * QK_K), regs))
        for rows, cols in shapes:
            nb = cols // QK_K
            ranked = [(static_model(rows, t, c, c.br * c.u * QK_K, spw, regs)["model_pct_copy"], -spw, c)
                      for c, spw, regs in stats if c.u * c.split <= nb]
            pct, _, c = max(ranked, key=lambda r: r[:2])
            out.setdefault(spec, []).append([rows, nb, c.br, c.u, c.split, c.warps, round(pct, 1)])
            print(f"{spec:14s} {rows}x{cols}: {tuple(c)} model {pct:.0f}% of copy", flush=True)
    return out


def add_measured(res: dict, path: Path, base: list[dict] | None = None) -> None:
    """Each kernel's measured % of copy at this shape from a `gemv_configs.py` results file (its best launch, which
    the runtime's table holds), and measured / model, the model of the kernels the sweep ran (`base`: those of
    its commit) where given."""
    sweep = json.loads(path.read_text())
    modelled = {r["kernel"]: r for r in base or []}
    kernel_of = {"Q2_K": "byte-order Q2_K", "Q3_K:bytes": "byte-order Q3_K", "IQ2_XS:bytes": "group IQ2_XS",
                 "IQ2_XXS:bytes": "group IQ2_XXS", **{spec: word_label(spec) for spec in WORD_SPECS}}
    for b in sweep["best"]:
        if [b["rows"], b["cols"]] != res["shape"]:
            continue
        name = kernel_of.get(b["type"], f"generic {b['type']}")
        for r in res["kernels"]:
            if r["kernel"] == name:
                m = modelled.get(name, r)
                r["measured_pct_copy"] = b["pct_copy"]
                r["measured_config"] = b["config"]
                r["measured_kernel_model_pct_copy"] = m["model_pct_copy"]
                r["measured_over_model"] = b["pct_copy"] / m["model_pct_copy"]
    res["measured_from"] = f"{path.name} ({sweep['machine'].get('gpu')}, commit {sweep['commit'][:7]})"


def markdown(res: dict) -> str:
    out = [f"# GEMV kernels: instructions per weight and a static model ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']}; Triton {res['triton']}, sm_{res['arch']}; shape "
           f"{res['shape'][0]}x{res['shape'][1]}; budget = instructions a weight at copy bandwidth ({COPY_GBS:.0f} "
           f"GB/s) for an H100 SXM issuing {SMS}×4×32 lanes at {CLOCK_GHZ} GHz", "",
           "| kernel | launch (BR, U, split, warps) | PTX / weight | SASS / weight | budget | registers | "
           "programs / SM | last-wave efficiency | KB in flight / SM | model % copy | measured % copy | "
           "measured / model |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["kernels"]:
        out.append(f"| {r['kernel']} | {tuple(r['config'])} | {r['instructions_per_weight']:.2f} | "
                   f"{r['sass_per_weight']:.2f} | {r['budget_per_weight']:.1f} | {r['registers']} | "
                   f"{r['programs_per_sm']} | {r['wave_efficiency']:.2f} | "
                   f"{r['bytes_in_flight_per_sm'] / 1024:.1f} | "
                   f"{r['model_pct_copy']:.0f} | "
                   + (f"{r['measured_pct_copy']:.1f} | {r['measured_over_model']:.2f} |"
                      if "measured_pct_copy" in r else "– | – |"))
    out += ["", "model % copy = last-wave efficiency × min(issue bound, memory-level-parallelism bound): "
            "issue bound = min(1, budget / SASS a weight); MLP bound = min(1, one iteration's weight bytes of every "
            f"resident program / ({COPY_GBS:.0f} GB/s × {LATENCY_NS:.0f} ns / {SMS} SMs)); "
            "last-wave efficiency = programs / (waves rounded up × resident programs); "
            "registers and SASS from the cubin ptxas made (nvdisasm, cuobjdump of Triton's wheel)"]
    if res.get("measured_from"):
        out += ["", f"measured: {res['measured_from']}; the model of the kernels measured "
                f"({res.get('base_kernels', 'these')})"]
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["kernels"]
    xs = list(range(len(rows)))
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax.bar([x - 0.2 for x in xs], [r["instructions_per_weight"] for r in rows], 0.4, label="PTX")
    ax.bar([x + 0.2 for x in xs], [r["sass_per_weight"] for r in rows], 0.4, label="SASS")
    ax.scatter(xs, [r["budget_per_weight"] for r in rows], color="k", marker="_", s=400, zorder=3,
               label="budget at copy bandwidth (H100)")
    ax.set_ylabel("instructions a weight (loop)")
    ax.set_title(f"GEMV {res['shape'][0]}x{res['shape'][1]}: sm_{res['arch']}, Triton {res['triton']}")
    ax.legend()
    bx.bar([x - 0.2 for x in xs], [r["model_pct_copy"] for r in rows], 0.4, label="static model")
    bx.bar([x + 0.2 for x in xs], [r.get("measured_pct_copy", 0) for r in rows], 0.4, label="measured (H100)")
    bx.set_ylabel("% of copy bandwidth")
    bx.set_xticks(xs, [r["kernel"] for r in rows], rotation=30, ha="right", fontsize=8)
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_launches(a, res: dict) -> None:
    """`--launches`: the model's picks as a results file, and in the runtime's table for the keys no sweep holds."""
    from gemv_configs import merge_tables
    from provenance import results_stem, write_results

    from twinquant.formats.ggml.packed import LAUNCH_TABLE

    res["launches"] = model_launches(a.arch)
    lines = [f"# Word-lane GEMV launches picked by the static model ({a.tag})", "",
             f"`{res['command']}` at {res['commit']}; Triton {res['triton']}, sm_{a.arch}; not measured: the launch "
             "of `gemv_configs.configs` with the highest model % of copy (`kernel_ptx.static_model`, H100 "
             "figures), until a GPU sweep replaces them", "",
             "| kernel | rows x cols | launch (BR, U, split, warps) | model % copy |", "|---|---|---|---|"]
    lines += [f"| {k} | {e[0]}x{e[1] * QK_K} | {tuple(e[2:6])} | {e[6]:.0f} |" for k, v in res["launches"].items()
              for e in v]
    write_results(results_stem(a.out, "kernel_ptx_launches", a.tag), res, "\n".join(lines) + "\n")
    table = json.loads(LAUNCH_TABLE.read_text())
    swept = {k for k, src in (table.get("sources") or {}).items() if "gemv_configs_" in str(src)}
    new = {k: [e[:6] for e in v] for k, v in res["launches"].items() if k not in swept}
    if new:
        LAUNCH_TABLE.write_text(json.dumps(merge_tables(table, {
            "source": f"benchmarks/results/kernel_ptx_launches_{a.tag}.json (static model, not measured)",
            "gpu": None, "commit": res["commit"], "launches": new})) + "\n")
    print(f"merged into {LAUNCH_TABLE}: {', '.join(new) or 'none (all swept)'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--rows", type=int, default=27648)
    ap.add_argument("--cols", type=int, default=5120)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--measured", help="a gemv_configs.py results file: its measured %% of copy beside the counts")
    ap.add_argument("--base", help="a `gemv_ab.py --prepare` folder holding the kernels the --measured sweep ran "
                    "(their counts give the measured / issue bound ratio)")
    ap.add_argument("--launches", action="store_true", help="pick the word-lane kernels' launches by the static "
                    "model for every swept shape (kernel_ptx_launches_TAG.{json,md}) and merge them into the "
                    "runtime's launch table where no GPU sweep measured that kernel")
    ap.add_argument("--shared-ops", nargs="*", metavar="NAME=FILE", help="the shared-memory moves of each word-lane "
                    "loop at `SHARED_PROBES` (kernel_sass_TAG.{json,md}): the tree's kernels beside other versions "
                    "of triton_kquants.py")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    from provenance import record, results_stem, write_results

    if a.shared_ops is not None:
        import hashlib
        import importlib.util

        modules, about = {"tree": K}, {"tree": "twinquant/formats/ggml/triton_kquants.py"}
        for item in a.shared_ops:
            name, path = item.split("=", 1)
            spec = importlib.util.spec_from_file_location(f"kquants_{name}", path)
            modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
            about[name] = f"{Path(path).name} (sha256 {hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]})"
        res = record(tag=a.tag, arch=a.arch, triton=triton.__version__, modules=about)
        res["rows"] = shared_ops_table(modules, a.arch)
        return write_results(results_stem(a.out, "kernel_sass", a.tag), res, shared_markdown(res))

    if a.launches:
        return write_launches(a, record(tag=a.tag, arch=a.arch, triton=triton.__version__,
                                        budget_assumptions={"sms": SMS, "clock_ghz": CLOCK_GHZ,
                                                            "copy_gbs": COPY_GBS, "latency_ns": LATENCY_NS}))
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
    write_results(results_stem(a.out, "kernel_ptx", a.tag), res, markdown(res), plot)


if __name__ == "__main__":
    main()
