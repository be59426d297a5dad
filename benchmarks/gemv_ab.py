"""The packed GEMV kernels of a base commit against the tree's, side by side in one run: same weights, same launch
(`packed.gemv_config`), timed as `gemv_configs.py` times them (back to back in one CUDA graph over copies of the
weight that overflow the L2), outputs compared. For a kernel change whose effect must be read on a shared GPU.

The base kernels travel as files (the GPU machine's copy of the tree has no git history):

    python benchmarks/gemv_ab.py --prepare REV DIR         # here: DIR/basek/ = triton_{bytes,kquants}.py at REV
    python benchmarks/gemv_ab.py --tag TAG --base DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from gemv_configs import SHAPES, cold_copies, graph_us, pair_plot, weights  # noqa: E402
from twinquant.formats.ggml import triton_kquants  # noqa: E402
from twinquant.formats.ggml.packed import BYTE_ORDER_DEFAULT, QK_K, gemv, gemv_config, kernel_key  # noqa: E402

FILES = ("triton_bytes.py", "triton_kquants.py")
KERNELS = ("gemv_kernel", "gemv_bytes_kernel")


def prepare(rev: str, out: Path) -> None:
    pkg = out / "basek"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f'"""triton_kquants / triton_bytes at {rev}"""\n')
    for f in FILES:
        src = subprocess.run(["git", "show", f"{rev}:twinquant/formats/ggml/{f}"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        (pkg / f).write_text(src.replace("twinquant.formats.ggml.triton_bytes", "basek.triton_bytes"))
    print(f"wrote {pkg}")


@contextlib.contextmanager
def base_kernels(base):
    """packed.gemv launches the base module's kernels inside this block (it imports them at each call)."""
    saved = {k: getattr(triton_kquants, k) for k in KERNELS}
    for k in KERNELS:
        setattr(triton_kquants, k, getattr(base, k))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(triton_kquants, k, v)


def markdown(res: dict) -> str:
    out = [f"# packed GEMV: base kernels against the tree's ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']} (base: {res['base']}); {res['machine'].get('gpu')}; copy "
           f"{res['copy_gbs']:.0f} GB/s; {res['method']}", "",
           "| type | rows x cols | launch (BR, U, split, warps) | base µs | % copy | tree µs | % copy | tree / base speed "
           "| max abs diff / max abs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['type']} | {r['rows']}x{r['cols']} | {tuple(r['config'])} | {r['base_us']:.1f} | "
                   f"{r['base_pct']:.1f} | {r['tree_us']:.1f} | {r['tree_pct']:.1f} | "
                   f"{r['base_us'] / r['tree_us']:.2f}x | {r['rel_diff']:.1e} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    pair_plot(path, [f"{r['type']}\n{r['rows']}x{r['cols']}" for r in res["rows"]],
              (f"base {res['base']}", [r["base_pct"] for r in res["rows"]]),
              (f"tree {res['commit']}", [r["tree_pct"] for r in res["rows"]]), res["machine"].get("gpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", nargs=2, metavar=("REV", "DIR"))
    ap.add_argument("--tag")
    ap.add_argument("--base", help="the folder --prepare wrote")
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K", "Q4_K", "Q6_K"])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if a.prepare:
        return prepare(a.prepare[0], Path(a.prepare[1]))
    if not (a.tag and a.base):
        raise SystemExit("gemv_ab: --tag and --base are required (or --prepare REV DIR)")
    if not torch.cuda.is_available():
        raise SystemExit("gemv_ab: needs a CUDA GPU")
    from kernel_speed import copy_bandwidth
    from provenance import record, results_stem, write_results

    sys.path.insert(0, a.base)
    import basek.triton_kquants as base

    t0 = time.perf_counter()
    res = record(tag=a.tag, base=(Path(a.base) / "basek" / "__init__.py").read_text().split(" at ")[-1].strip('"\n '),
                 copy_gbs=copy_bandwidth(), rows=[],
                 method="GEMVs back to back in one CUDA graph over copies of the weight (>= 160 MiB), median of 5 "
                        "replays; each kernel at the tree's launch for the shape")
    stem = results_stem(a.out, "gemv_ab", a.tag)
    for t in a.types:
        for rows, cols in (s for m in a.models for s in SHAPES[m]):
            w = weights(t, rows, cols)
            ws = cold_copies(w)
            x = torch.randn(1, cols, device="cuda")
            cfg = gemv_config(kernel_key(t), rows, cols // QK_K)
            nbytes = w.data.numel() + cols * 4 + rows * 4
            with base_kernels(base):
                y_base = gemv(x, w, config=cfg)
                base_us = graph_us([lambda wi=wi: gemv(x, wi, config=cfg) for wi in ws])
            y_tree = gemv(x, w, config=cfg)
            tree_us = graph_us([lambda wi=wi: gemv(x, wi, config=cfg) for wi in ws])
            pct = lambda us: 100 * nbytes / (us * 1e-6) / 1e9 / res["copy_gbs"]     # noqa: E731
            r = {"type": t, "kernel": "bytes" if t in BYTE_ORDER_DEFAULT else "generic", "rows": rows, "cols": cols,
                 "config": list(cfg), "base_us": base_us, "tree_us": tree_us, "base_pct": pct(base_us),
                 "tree_pct": pct(tree_us),
                 "rel_diff": float((y_tree - y_base).abs().max() / y_base.abs().max().clamp_min(1e-30))}
            res["rows"].append(r)
            print(f"{t} {rows}x{cols} {tuple(cfg)}: base {base_us:.1f} us ({r['base_pct']:.1f}%), tree "
                  f"{tree_us:.1f} us ({r['tree_pct']:.1f}%), {base_us / tree_us:.2f}x", flush=True)
            del ws
            write_results(stem, res)
    res["seconds"] = time.perf_counter() - t0
    write_results(stem, res, markdown(res), plot)


if __name__ == "__main__":
    main()
