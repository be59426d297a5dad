"""What handing x over quantized saves in the int8-x decode (`TWINQUANT_Q8=Q2_K`): the kernel that makes a GEMV's
input (RMSNorm, SwiGLU, the decode attention) with and without storing x's int8 form (`packed.with_q8`), the
quantize launch it replaces, and each pair as a decode step runs it (the kernel, then the Q2_K GEMV on its output:
handed over vs quantizing x itself). Every row is timed as decode runs it: back to back in one CUDA graph
(`gemv_configs.graph_us`), the GEMV's weights cold (copies that overflow the L2).

    python benchmarks/q8_handover.py --tag h100 [--shape qwen2.5-32b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from twinquant.formats.ggml.packed import (PackedWeight, gemv_q8, planes, q8_of, quantize_q8,  # noqa: E402
                                           random_blocks)
from twinquant.model import triton_attention, triton_norm, triton_swiglu  # noqa: E402

# hidden, FFN width, query heads, kv heads, head width (Qwen2.5)
SHAPES = {"qwen2.5-32b": (5120, 27648, 40, 8, 128), "qwen2.5-7b": (3584, 18944, 28, 4, 128)}
CACHED = 256            # positions in the KV cache the attention reads


def stages(hidden: int, ffn: int, heads: int, kv: int, hd: int, dev: str = "cuda"):
    """(name, the kernel making x, with q8, the GEMV's weight [rows, cols]) of one block: the attention norm ->
    q/k/v joined, the attention -> o (as the runtime cuts the cache, and in TWINQUANT_ATTN_CHUNK=auto's parts),
    the FFN norm -> gate/up joined, SwiGLU -> down."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1, 1, hidden, device=dev, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, device=dev, generator=g)
    gu = torch.randn(1, 1, 2 * ffn, device=dev, generator=g)
    q = torch.randn(1, heads, 1, hd, device=dev, generator=g)
    k, v = (torch.randn(1, kv, CACHED, hd, device=dev, generator=g) for _ in range(2))
    pos = torch.tensor([CACHED - 1], device=dev)
    auto = triton_attention.chunk_for(CACHED, kv, "auto")      # (TWINQUANT_ATTN_CHUNK=auto's parts)
    return [("RMSNorm -> qkv", lambda q8: triton_norm.rms_norm(x, w, 1e-6, q8=q8), (hidden + 2 * kv * hd, hidden)),
            ("attention -> o", lambda q8: _rows(triton_attention.decode_attention(q, k, v, pos, q8)),
             (hidden, heads * hd)),
            (f"attention in parts of {auto} -> o", lambda q8: _rows(triton_attention.decode_attention(q, k, v, pos, q8,
                                                                                                     chunk=auto)),
             (hidden, heads * hd)),
            ("RMSNorm + residual -> gate/up", lambda q8: triton_norm.rms_norm(x, w, 1e-6, res=x, q8=q8)[1],
             (2 * ffn, hidden)),
            ("SwiGLU -> down", lambda q8: triton_swiglu.silu_mul(gu[..., :ffn], gu[..., ffn:], q8), (hidden, ffn))]


def _rows(o: torch.Tensor) -> torch.Tensor:
    """The attention output as the rows the GEMV reads, keeping its int8 form (as forward._decode_attention)."""
    from twinquant.formats.ggml.packed import with_q8

    return with_q8(o.reshape(1, 1, -1), q8_of(o))


def measure(shape: str, dev: str = "cuda", timer=None, dims=None) -> list[dict]:
    """The rows of one shape (`timer`, `dims`: another timer and block widths, for a smoke run on the CPU)."""
    from gemv_configs import cold_copies, graph_us

    graph_us = timer or graph_us
    out = []
    for name, make, (rows, cols) in stages(*(dims or SHAPES[shape]), dev=dev):
        ws = cold_copies(planes(PackedWeight.from_bytes("Q2_K", random_blocks("Q2_K", rows, cols), cols, dev)))
        n = len(ws)
        made = make(True)
        assert q8_of(made) is not None, name
        xq = made.reshape(1, -1)
        r = {"shape": shape, "stage": name, "gemv": [rows, cols],
             "kernel_us": graph_us([lambda: make(False)] * n),
             "kernel_q8_us": graph_us([lambda: make(True)] * n),
             "quantize_us": graph_us([lambda: quantize_q8(xq, lanes=True)] * n),
             "pair_us": graph_us([lambda wi=wi: gemv_q8(make(False).reshape(1, -1), wi, words=True) for wi in ws]),
             "pair_handed_us": graph_us([lambda wi=wi: _handed(make, wi) for wi in ws])}
        r["saved_us"] = r["pair_us"] - r["pair_handed_us"]
        out.append(r)
        print(f"{shape} {name:30s} kernel {r['kernel_us']:6.2f} / with q8 {r['kernel_q8_us']:6.2f} us, quantize "
              f"{r['quantize_us']:5.2f} us; kernel+GEMV {r['pair_us']:6.2f} -> handed over {r['pair_handed_us']:6.2f} "
              f"us", flush=True)
    return out


def _handed(make, w: PackedWeight) -> torch.Tensor:
    x = make(True)
    return gemv_q8(x.reshape(1, -1), w, words=True, xq8=q8_of(x))


def markdown(res: dict) -> str:
    lines = [f"# The int8-x decode's quantize launch handed over ({res['tag']})", "",
             f"`{res['command']}` at {res['commit']}; {res['machine'].get('gpu')}, driver "
             f"{res['machine'].get('driver')}; {res['method']}.", "",
             "| shape | stage | GEMV rows x cols | kernel µs | kernel storing int8 x µs | quantize alone µs | "
             "kernel + GEMV quantizing x µs | kernel + GEMV on x handed over µs | saved µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['stage']} | {r['gemv'][0]}x{r['gemv'][1]} | {r['kernel_us']:.2f} | "
                     f"{r['kernel_q8_us']:.2f} | {r['quantize_us']:.2f} | {r['pair_us']:.2f} | "
                     f"{r['pair_handed_us']:.2f} | {r['saved_us']:.2f} |")
    for shape in dict.fromkeys(r["shape"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["shape"] == shape and "in parts" not in r["stage"]]     # (as it runs)
        lines += ["", f"{shape}: a block's four pairs {sum(r['pair_us'] for r in rs):.1f} µs quantizing x in the GEMV, "
                  f"{sum(r['pair_handed_us'] for r in rs):.1f} µs handed over."]
        parts = [r for r in res["rows"] if r["shape"] == shape and "in parts" in r["stage"]]
        whole = [r for r in rs if r["stage"] == "attention -> o"]
        if parts and whole:
            lines.append(f"{shape}: the attention alone {whole[0]['kernel_us']:.2f} µs as the runtime cuts the cache, "
                         f"{parts[0]['kernel_us']:.2f} µs {parts[0]['stage'].split(' -> ')[0][10:]} "
                         "(TWINQUANT_ATTN_CHUNK=auto).")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    keys = [("kernel_us", "kernel"), ("kernel_q8_us", "kernel storing int8 x"), ("quantize_us", "quantize alone"),
            ("pair_us", "kernel + GEMV quantizing x"), ("pair_handed_us", "kernel + GEMV, handed over")]
    for i, (k, label) in enumerate(keys):
        ax.bar([j + (i - len(keys) / 2) * 0.15 for j in range(len(rows))], [r[k] for r in rows], 0.15, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['shape']}\n{r['stage']}" for r in rows], fontsize=7)
    ax.set_ylabel("µs (CUDA graph)")
    ax.set_title(f"int8-x decode: x handed over quantized ({res['machine'].get('gpu')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--shape", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("q8_handover: needs a CUDA GPU")
    from gemv_configs import COLD_BYTES
    from provenance import record, results_stem, write_results

    t0 = time.perf_counter()
    res = record(tag=a.tag, rows=[], method=f"each row back to back in one CUDA graph, the GEMV's Q2_K weight (planes)"
                                            f" in copies totalling {COLD_BYTES >> 20} MiB, median of 5 replays; "
                                            f"attention over {CACHED} cached positions")
    stem = results_stem(a.out, "q8_handover", a.tag)
    for shape in a.shape:
        res["rows"] += measure(shape)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_results(stem, res)
    write_results(stem, res, markdown(res), plot)


if __name__ == "__main__":
    main()
