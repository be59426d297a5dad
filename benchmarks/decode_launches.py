"""How many kernels one decode step launches per block: the replayed CUDA-graph step (`KVCache.at`) of a packed
GGUF counted op by op, on the CPU. A replayed step pays a few microseconds per launch whatever its size, so the
count is what the step's small kernels cost on a GPU (benchmarks/decode_profile.py times them there).

Counted: the compute ops torch runs (leaf aten ops, not views or allocations: on CUDA each launches at least one
kernel) and the Triton launches (run through Triton's interpreter here), over a device-position step of a
synthetic file with Qwen2.5's block structure (`decode_gpu.synthetic_file`, 256-wide "tiny" shape, the Q2_K mix).
`--base DIR` runs the same count on another checkout of twinquant (a `git worktree` of an older commit) in a
subprocess, so a change shows side by side in one run.

    git worktree add /tmp/base REV
    TRITON_INTERPRET=1 TWINQUANT_TRITON_CPU=1 python benchmarks/decode_launches.py --tag TAG --base /tmp/base
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::transpose", "aten::slice", "aten::select",
         "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::as_strided", "aten::t", "aten::split",
         "aten::split_with_sizes", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::detach",
         "aten::alias", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous",
         "aten::permute", "aten::narrow", "aten::unbind", "aten::_unsafe_view", "aten::item", "aten::_local_scalar_dense",
         "aten::is_nonzero", "aten::result_type", "aten::to", "aten::_to_copy", "aten::unflatten", "aten::flatten",
         "aten::resize_", "aten::detach_"}

PRODUCTS = {"aten::baddbmm", "aten::addmm", "aten::addbmm", "aten::mm", "aten::bmm", "aten::addmv", "aten::mv"}


def count(tree: Path, work: Path, mix: str) -> dict:
    """{op: launches per block} of one device-position decode step, with twinquant imported from `tree`."""
    sys.path[:0] = [str(tree), str(ROOT / "benchmarks")]
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from triton.runtime.interpreter import InterpretedFunction

    from twinquant.io.load import load_model           # from `tree`: imported before decode_gpu adds this one
    from twinquant.model.forward import KVCache, forward
    from twinquant.runtime.packed_weights import join_shared_inputs, pack_linears

    from decode_gpu import synthetic_file

    # what load_for_decode does on CUDA (packed K-quant linears, q+k / gate+up joined), here on the CPU
    model = load_model(synthetic_file(work, "tiny", mix), dtype=torch.float32, device="cpu", keep_quantized=True)
    pack_linears(model)
    model.materialize()
    join_shared_inputs(model)
    cache = KVCache.empty(model, 1, 32)
    forward(model, torch.arange(6)[None] + 10, cache=cache)
    cache.at = torch.full((), cache.pos, dtype=torch.long)
    triton_runs: collections.Counter = collections.Counter()
    real_run = InterpretedFunction.run

    def run(self, *a, **k):
        triton_runs[f"triton:{self.fn.__name__}"] += 1
        with record_function("triton_launch"):
            return real_run(self, *a, **k)

    InterpretedFunction.run = run
    try:
        forward(model, torch.tensor([[11]]), cache=cache)              # compile / warm
        triton_runs.clear()
        with profile(activities=[ProfilerActivity.CPU]) as p:
            forward(model, torch.tensor([[12]]), cache=cache, logits_for=slice(-1, None))
    finally:
        InterpretedFunction.run = real_run
    ops: collections.Counter = collections.Counter(triton_runs)
    compute = lambda e: e.name.startswith("aten::") and e.name not in VIEWS      # noqa: E731

    def leaf(e) -> bool:               # no compute op below it (its children may be views and allocations)
        return all(not compute(c) and leaf(c) for c in e.cpu_children)

    for e in p.events():               # a product counts itself besides its children (baddbmm: copy_ + the GEMM)
        if not compute(e) or not (leaf(e) or e.name in PRODUCTS):
            continue
        a, inside = e.cpu_parent, False
        while a is not None:
            inside |= a.name == "triton_launch"
            a = a.cpu_parent
        if not inside:
            ops[e.name] += 1
    n = model.spec.n_layers
    return {"blocks": n, "per_block": {k: v / n for k, v in ops.most_common()}, "total": sum(ops.values())}


def markdown(res: dict) -> str:
    runs = res["runs"]
    names = sorted({k for r in runs.values() for k in r["per_block"]},
                   key=lambda k: -max(r["per_block"].get(k, 0) for r in runs.values()))
    out = [f"# kernel launches of a decode step ({res['tag']})", "", f"`{res['command']}` at {res['commit']}; "
           f"synthetic {res['shape']} file ({res['mix']}, {next(iter(runs.values()))['blocks']} blocks), float32, one "
           "device-position step (what a CUDA graph replays), counted on the CPU: leaf aten compute ops + Triton "
           "launches, per block (the head and embedding spread over the blocks)", "",
           "| op | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    out += [f"| {k} | " + " | ".join(f"{r['per_block'].get(k, 0):.1f}" for r in runs.values()) + " |" for k in names]
    out.append("| **total per block** | " + " | ".join(f"**{r['total'] / r['blocks']:.1f}**" for r in runs.values())
               + " |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: Path) -> None:
    """Each counted tree's launches per block, stacked by op (the eight commonest, the rest as one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from provenance import stacked_barh

    runs = res["runs"]
    names = sorted({k for r in runs.values() for k in r["per_block"]},
                   key=lambda k: -max(r["per_block"].get(k, 0) for r in runs.values()))
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.6 * len(runs)))
    parts = {k: [r["per_block"].get(k, 0) for r in runs.values()] for k in names[:8]}
    parts["other"] = [sum(r["per_block"].get(n, 0) for n in names[8:]) for r in runs.values()]
    stacked_barh(ax, list(runs), parts)
    ax.set_xlabel("kernel launches per block of one decode step")
    ax.set_title(f"decode_launches {res['tag']}: {res['shape']} file, {res['mix']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag")
    ap.add_argument("--base", help="another twinquant checkout, counted in a subprocess")
    ap.add_argument("--mix", default="llama.cpp:Q2_K")
    ap.add_argument("--work", default="/tmp/decode_launches")
    ap.add_argument("--count-only", help=argparse.SUPPRESS)        # the subprocess: a tree to count, JSON out
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from provenance import plot_option, plotted, record, results_stem, write_results

    plot_option(ap)
    a = ap.parse_args()
    if plotted(ap, a, plot, required=()):           # (--tag: only once the subprocess's case is past)
        return
    if not (os.environ.get("TRITON_INTERPRET") and os.environ.get("TWINQUANT_TRITON_CPU")):
        raise SystemExit("decode_launches: set TRITON_INTERPRET=1 TWINQUANT_TRITON_CPU=1 (the kernels run on the CPU)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.count_only:
        return print(json.dumps(count(Path(a.count_only), work, a.mix)))
    if not a.tag:
        raise SystemExit("decode_launches: --tag is required")
    runs = {}
    for label, tree in ([("base " + _rev(Path(a.base)), Path(a.base))] if a.base else []) + [("tree", ROOT)]:
        out = subprocess.run([sys.executable, __file__, "--count-only", str(tree), "--mix", a.mix, "--work", a.work],
                             check=True, capture_output=True, text=True).stdout
        runs[label] = json.loads(out.strip().splitlines()[-1])
    res = record(tag=a.tag, shape="tiny", mix=a.mix, runs=runs)
    write_results(results_stem(a.out, "decode_launches", a.tag), res, markdown(res), plot)


def _rev(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
