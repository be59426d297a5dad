"""Where the int8-x Q2_K GEMV's time goes at batch 1 (planes layout, `gemv_q2k_q8_words_kernel`): the same bytes
read by kernels that do less and less, each timed as decode runs it (`gemv_configs.graph_us`: back to back in one
CUDA graph over copies of the weight that overflow the L2).

    empty        the kernel's grid, each program storing its rows' zeros: launch and scheduling alone
    stream       the weight's bytes read contiguously (16 bytes a thread, BLOCK words a program, best of a few):
                 what one launch can read these bytes in
    loads        the kernel's own weight loads (`_q2k_lane_block`, its lanes and launch), folded with xor
    loads+x      also x's int8 words, scales and sums as the kernel loads them
    kernel       the kernel on x already quantized (at the launch table's launch; "kernel best": the best of
                 `KERNELS`, and "loads+x @kernel best" its loads alone at that launch)
    prefetch     the kernel with its next step's weight loads issued before this step's products (PREFETCH; and
                 its best launch of a few)
    quantize     `quantize_q8(lanes=True)` alone
    gemv_q8      both, as the runtime calls it

The steps between rows say what costs: stream -> loads is the access pattern, loads -> kernel the arithmetic,
kernel -> gemv_q8 the second launch. The loads row is also swept over launches (rows/program, super-blocks/step,
warps) to see whether another launch reads faster.

    python benchmarks/gemv_limits.py --tag h200
    ncu --section SpeedOfLight ... python benchmarks/gemv_limits.py --ncu      # each kernel twice, outside a graph
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from twinquant.formats.ggml.packed import (QK_K, GemvConfig, PackedWeight, _q2k_rows, _x_broadcast,  # noqa: E402
                                           gemv_config, gemv_q8, planes, quantize_q8, random_blocks)
from twinquant.formats.ggml.triton_kquants import (_q2k_lane_block, _word_lanes,  # noqa: E402
                                                   gemv_q2k_q8_words_kernel)

SHAPES = [(27648, 5120), (5120, 27648), (5120, 5120)]
STREAM = [(b, w) for b in (1024, 4096, 8192) for w in (4, 8)]
LOADS = [GemvConfig(br, u, 1, w) for br, u, w in itertools.product((4, 8, 16), (2, 4, 8), (2, 4, 8))]
# the kernel's launches: also one warp, and 16 super-blocks a step (a warp's lanes then span super-blocks only, so
# each thread holds all the program's rows and loads x once for them)
KERNELS = [GemvConfig(br, u, 1, w) for br, u, w in itertools.product((4, 8, 16, 32), (4, 8, 16), (1, 2, 4))
           if br * u <= 256]
PREFETCH = [GemvConfig(br, u, 1, w) for br, u, w in itertools.product((4, 8, 16), (2, 4), (2, 4))]


@triton.jit
def empty_kernel(y_ptr, R, BR: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    tl.store(y_ptr + rows, tl.zeros((BR,), dtype=tl.int32), mask=rows < R)


@triton.jit
def stream_kernel(p, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + tl.program_id(0), tl.xor_sum(tl.load(p + offs, mask=offs < n, other=0), axis=0))


@triton.jit
def lane_loads_kernel(w_ptr, xq_ptr, xd_ptr, xs_ptr, y_ptr, R, NB, row_n, BR: tl.constexpr, U: tl.constexpr,
                      SPLIT: tl.constexpr, PLANES: tl.constexpr, ALIGN: tl.constexpr, X: tl.constexpr):
    """`gemv_q2k_q8_words_kernel`'s loads (X: x's too) at its lanes and launch, xor-folded (so none is dropped)."""
    m, part, rows, g, u, row_base, _ = _word_lanes(w_ptr, xq_ptr, 0, R, row_n * ALIGN, BR, U)
    e = tl.arange(0, 4)[None, None, None, :] + tl.zeros((BR, 1, 1, 1), dtype=tl.int32)     # as the kernel's x loads
    xw = (xq_ptr + 32 * (g // 2) + 4 * (g % 2))[:, :, :, None] + e
    acc = tl.zeros((BR, U, 4), dtype=tl.int32)
    for b0 in range(part * U, NB, SPLIT * U):
        b = tl.minimum(b0 + u, NB - 1)
        words, scales, dd = _q2k_lane_block(row_base, NB, b, g, BR, U, PLANES)
        acc ^= words[0] ^ words[1] ^ words[2] ^ words[3] ^ scales[0] ^ scales[1] ^ dd
        if X:
            xd = tl.load((xd_ptr + 4 * (g // 2) + b * 8)[:, :, :, None] + e).to(tl.int32, bitcast=True)
            xs = tl.load((xs_ptr + 8 * (g // 2) + 4 * (g % 2) + b * 16)[:, :, :, None] + e).to(tl.int32, bitcast=True)
            v = tl.xor_sum(xd ^ xs, axis=3)
            for j in tl.static_range(4):
                v ^= tl.xor_sum(tl.load(xw + (b * 64 + 8 * j)[:, :, :, None]), axis=3)
            acc ^= v
    tl.store(y_ptr + rows, tl.xor_sum(tl.xor_sum(acc, axis=2), axis=1), mask=rows < R)


def case(rows: int, cols: int, device: str = "cuda") -> dict:
    """One shape's operands: a random Q2_K weight in planes, x quantized in lane order, the runtime's launch for
    the int8 planes kernel, and float / int output rows."""
    w = planes(PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, cols), cols, device))
    x = torch.randn(1, cols, device=device)
    xq, xd, xs = quantize_q8(x, lanes=True)
    return dict(rows=rows, nb=cols // QK_K, w=w, x=x, xq=xq, xd=xd, xs=xs,
                cfg=gemv_config("Q2_K:q8planes", rows, cols // QK_K),
                y=torch.empty(rows, dtype=torch.float32, device=device),
                yi=torch.empty(rows, dtype=torch.int32, device=device))


def run_kernel(k: dict, w: PackedWeight, c: GemvConfig, prefetch: bool = False) -> None:
    """The int8 planes kernel on k's quantized x (split launches add into a zeroed output of their own)."""
    y = k["y"] if c.split == 1 else torch.zeros_like(k["y"])
    gemv_q2k_q8_words_kernel[(-(-k["rows"] // c.br), 1, c.split)](
        w.data.view(torch.int32), k["xq"], k["xd"], k["xs"], y, y, k["rows"], k["nb"], stride_ym=0, BR=c.br, U=c.u,
        SPLIT=c.split, ASM=w.data.is_cuda, HAS_BIAS=False, PREFETCH=prefetch, XB=_x_broadcast(c), num_warps=c.warps,
        **_q2k_rows(w))


def run_loads(k: dict, w: PackedWeight, c: GemvConfig, with_x: bool) -> None:
    """The kernel's loads alone (`lane_loads_kernel`) at launch c."""
    lane_loads_kernel[(-(-k["rows"] // c.br), 1, c.split)](
        w.data.view(torch.int32), k["xq"], k["xd"], k["xs"], k["yi"], k["rows"], k["nb"], BR=c.br, U=c.u,
        SPLIT=c.split, X=with_x, num_warps=c.warps, **_q2k_rows(w))


def measure(rows: int, cols: int, copy_gbs: float) -> list[dict]:
    """The table's rows for one shape: µs, GB/s and % of copy of each kernel on the same bytes."""
    from gemv_configs import cold_copies, graph_us

    k = case(rows, cols)
    w, cfg = k["w"], k["cfg"]
    ws = cold_copies(w)
    nbytes = w.data.numel()
    xbytes = 4 * (k["xq"].numel() + k["xd"].numel() + k["xs"].numel())
    out = []

    def row(what, us, launch, extra=0):
        r = {"rows": rows, "cols": cols, "what": what, "launch": launch, "us": us,
             "gbs": (nbytes + extra) / (us * 1e-6) / 1e9}
        r["pct_copy"] = 100 * r["gbs"] / copy_gbs
        out.append(r)
        print(f"{rows}x{cols} {what:10s} {str(launch):24s} {us:7.2f} us {r['pct_copy']:5.1f}% copy", flush=True)

    def timed(fn, c: GemvConfig, *args) -> float:
        return graph_us([lambda wi=wi: fn(k, wi, c, *args) for wi in ws])

    row("empty", graph_us([lambda: empty_kernel[(-(-rows // cfg.br),)](k["yi"], rows, BR=cfg.br,
                                                                     num_warps=cfg.warps)] * 24), list(cfg))
    flat = [wi.data.view(torch.int32).reshape(-1) for wi in ws]
    best = None
    for block, warps in STREAM:
        sink = torch.empty(-(-flat[0].numel() // block), dtype=torch.int32, device="cuda")
        us = graph_us([lambda f=f: stream_kernel[(sink.numel(),)](f, sink, f.numel(), BLOCK=block, num_warps=warps)
                       for f in flat])
        best = min(best or (us, block, warps), (us, block, warps))
    row("stream", best[0], [best[1], best[2]])
    row("loads", timed(run_loads, cfg, False), list(cfg))
    swept = min(((timed(run_loads, c, False), c) for c in LOADS), key=lambda t: t[0])
    row("loads best", swept[0], list(swept[1]))
    row("loads+x", timed(run_loads, cfg, True), list(cfg), xbytes)
    row("kernel", timed(run_kernel, cfg), list(cfg), xbytes)
    kb = min(((timed(run_kernel, c), c) for c in KERNELS), key=lambda t: t[0])
    row("kernel best", kb[0], list(kb[1]), xbytes)
    row("loads+x @kernel best", timed(run_loads, kb[1], True), list(kb[1]), xbytes)
    row("prefetch", timed(run_kernel, cfg, True), list(cfg), xbytes)
    pf = min(((timed(run_kernel, c, True), c) for c in PREFETCH), key=lambda t: t[0])
    row("prefetch best", pf[0], list(pf[1]), xbytes)
    row("quantize", graph_us([lambda: quantize_q8(k["x"], lanes=True)] * 24), "", -nbytes + k["x"].numel() * 4 + xbytes)
    row("gemv_q8", graph_us([lambda wi=wi: gemv_q8(k["x"], wi, words=True) for wi in ws]), list(cfg), xbytes)
    return out


def profile() -> None:
    """Each kernel (stream, loads+x, kernel, kernel with prefetch) twice at 27648x5120 outside a graph: the second
    round is the one to read in a profiler."""
    k = case(*SHAPES[0])
    w, cfg = k["w"], k["cfg"]
    flat = w.data.view(torch.int32).reshape(-1)
    sink = torch.empty(-(-flat.numel() // 4096), dtype=torch.int32, device="cuda")
    for _ in range(2):
        stream_kernel[(sink.numel(),)](flat, sink, flat.numel(), BLOCK=4096, num_warps=8)
        run_loads(k, w, cfg, True)
        for pf in (False, True):
            run_kernel(k, w, cfg, pf)
    torch.cuda.synchronize()
    print(f"profiled at {k['rows']}x{SHAPES[0][1]}, launch {tuple(cfg)}")


def markdown(res: dict) -> str:
    out = [f"# Where the int8-x Q2_K GEMV's time goes ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']}; {res['machine'].get('gpu')}; copy {res['copy_gbs']:.0f} GB/s; "
           f"{res['method']}. GB/s: the weight's bytes (and x's where read) over the time.", "",
           "| rows x cols | what | launch | µs | GB/s | % copy |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['rows']}x{r['cols']} | {r['what']} | {r['launch']} | {r['us']:.2f} | {r['gbs']:.0f} | "
                   f"{r['pct_copy']:.1f} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["rows"], r["cols"]) for r in res["rows"]}, key=lambda s: -s[0] * s[1])
    whats = ["stream", "loads best", "loads", "loads+x", "kernel", "kernel best", "prefetch best", "gemv_q8"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, wh in enumerate(whats):
        pct = [next((r["pct_copy"] for r in res["rows"] if (r["rows"], r["cols"]) == s and r["what"] == wh), 0)
               for s in shapes]
        ax.bar([k + (i - len(whats) / 2) * 0.1 for k in range(len(shapes))], pct, 0.1, label=wh)
    ax.set_xticks(range(len(shapes)), [f"{r}x{c}" for r, c in shapes])
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title(f"Q2_K int8-x GEMV (planes) and its loads alone, batch 1, CUDA graph, cold L2 "
                 f"({res['machine'].get('gpu')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag")
    ap.add_argument("--ncu", action="store_true", help="each kernel twice at 27648x5120 outside a graph, for ncu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemv_limits: needs a CUDA GPU")
    if a.ncu:
        return profile()
    if not a.tag:
        raise SystemExit("gemv_limits: --tag is required")
    from gemv_configs import COLD_BYTES
    from kernel_speed import copy_bandwidth
    from provenance import record, results_stem, write_results

    t0 = time.perf_counter()
    res = record(tag=a.tag, copy_gbs=copy_bandwidth(), rows=[],
                 method=f"kernels back to back in one CUDA graph over copies of the weight totalling "
                        f"{COLD_BYTES >> 20} MiB, median of 5 replays")
    stem = results_stem(a.out, "gemv_limits", a.tag)
    for rows, cols in SHAPES:
        res["rows"] += measure(rows, cols, res["copy_gbs"])
        res["seconds"] = time.perf_counter() - t0
        write_results(stem, res)
    write_results(stem, res, markdown(res), plot)


if __name__ == "__main__":
    main()
