"""The packed GEMV's launch at batch 1, swept: rows per program (BR), super-blocks per step (U), column split and
warps, for each type on the Qwen2.5 1.5B / 7B / 32B decode shapes. `packed.gemv_config` is chosen from this.

Each launch is timed as decode runs it: GEMVs back to back inside a CUDA graph (no host between kernels), each on
its own copy of the weight so that the copies together overflow the L2 (weights come from memory, as in a decode
step), the output buffer zeroed or not as `packed.gemv` does it. (The seventeenth session's run, s17-h100, cleared
a 96 MiB buffer before each GEMV instead and took the clear's time off, which cannot resolve GEMVs of ~2 µs.)
Kernels are compiled first by --procs processes sharing Triton's cache (one GPU process would spend most of the run
compiling), then timed in one process.

    python benchmarks/gemv_configs.py --tag h100
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from twinquant.formats.ggml.packed import (QK_K, GemvConfig, PackedWeight, gemv, gemv_config, gemv_q8,  # noqa: E402
                                           planes, random_blocks)

SHAPES = {"1.5B": [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960), (151936, 1536)],
          "7B": [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)],
          "32B": [(5120, 5120), (1024, 5120), (27648, 5120), (5120, 27648)]}
# "T:bytes": T through the kernel that reads it in its own order, "T:words": through the word-lane kernel (opt-in
# where it is not the default); "Q2_K:q8words": x to int8, then the word-lane dp4a kernel (`gemv_q8`);
# "Q2_K:planes" / "Q2_K:q8planes": those two kernels on the weight moved into planes (`packed.planes`)
TYPES = ["Q2_K", "Q2_K:words", "Q3_K", "Q3_K:bytes", "Q4_K", "Q6_K", "IQ2_XS", "IQ2_XS:bytes", "IQ2_XXS:bytes"]
WARPS = (4, 8)
WORD_LANES = (":words", ":q8words", ":planes", ":q8planes")        # the word-lane kernels' specs
SPLITS = (1, 2, 4, 8)


def _bytes(spec: str) -> bool:
    """A type through the byte-order kernel (Q2_K's default; "Q3_K:bytes": `packed.kernel_key`)."""
    return spec == "Q2_K" or spec.endswith(":bytes")


def _generic(spec: str) -> bool:
    """A type through the generic kernel."""
    return not _bytes(spec) and not spec.endswith(WORD_LANES)


def _call(spec: str, x, w, cfg):
    """One GEMV of the sweep's type spec at launch cfg ("Q2_K:q8words": x quantized to int8 first, then the word-lane
    dp4a kernel, llama.cpp's arithmetic: `packed.gemv_q8`)."""
    if spec.endswith((":q8words", ":q8planes")):
        return gemv_q8(x, w, words=True, config=cfg)
    kernel = {"words": True} if spec.endswith((":words", ":planes")) else {"byte_order": _bytes(spec)}
    return gemv(x, w, config=cfg, **kernel)


# --narrow: the word-lane kernels' launches near those the s22 runs found best once x is loaded in the lanes' layout
# (8 rows, 8-16 super-blocks a step, 2-4 warps; gemv_limits_s22-h100-c), a shorter sweep for a device call
NARROW = [GemvConfig(br, u, s, w) for br, u, s, w in itertools.product((4, 8, 16, 32), (4, 8, 16), (1, 2, 4), (2, 4))
          if br * u <= 256]


def configs(spec: str, narrow: bool = False) -> list[GemvConfig]:
    """The K-quant byte-order kernel holds [BR, U, 64] codes a step, the word-lane kernel [BR, U, 16] code words,
    the generic and IQ2 group kernels [BR, U, 256] weights: BR·U up to 64, 128 and 16."""
    if spec.endswith(WORD_LANES) and narrow:
        return NARROW
    if spec.endswith(WORD_LANES):
        return [GemvConfig(br, u, s, w) for br, u, s, w in itertools.product((8, 16, 32, 64, 128), (1, 2, 4), SPLITS,
                                                                               WARPS) if br * u <= 128]
    cap, brs = (64, (4, 8, 16, 32)) if _bytes(spec) and not spec.startswith("IQ") else (16, (1, 2, 4, 8))
    return [GemvConfig(br, u, s, w) for br, u, s, w in itertools.product(brs, (1, 2, 4, 8), SPLITS, WARPS)
            if br * u <= cap]


def cases(types, shapes, narrow: bool = False):
    for t in types:
        for rows, cols in shapes:
            for cfg in configs(t, narrow):
                if cfg.split * cfg.u <= cols // QK_K:
                    yield t, rows, cols, cfg


COLD_BYTES = 160 * 2**20      # the copies of a weight a sweep cycles through: more than an H100/H200's 50 MiB L2


def graph_us(calls, reps: int = 5) -> float:
    """µs per call: the calls (one per copy of the weight) back to back in one CUDA graph, as a decode step runs its
    GEMVs; each replay reads every copy once, so the weights come from memory, not from the L2."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls[0]()
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return sorted(times)[reps // 2]


def cold_copies(w: PackedWeight, launches: int = 24, most: int = 2048) -> list[PackedWeight]:
    """Copies of w totalling COLD_BYTES (at most `most`), repeated to at least `launches` entries."""
    n = max(2, min(most, -(-COLD_BYTES // w.data.numel())))
    ws = [w] + [PackedWeight(w.ggml_type, w.data.clone(), w.cols, w.layout) for _ in range(n - 1)]
    return ws * -(-launches // n)


def weights(spec, rows, cols, cache={}):
    """The sweep's weight of this type and shape (in planes for the planes kernels), made once per shape."""
    t = spec.split(":")[0]
    key = (t, rows, cols, spec.endswith("planes"))
    if key not in cache:
        if not any(k[:3] == key[:3] for k in cache):
            cache.clear()
        w = PackedWeight.from_bytes(t, random_blocks(t, rows, cols), cols, "cuda")
        cache[key] = planes(w) if key[3] else w
    return cache[key]


def warm(part: int, procs: int, types, shapes, narrow: bool) -> None:
    """Compile (into Triton's on-disk cache) every launch of the sweep whose index ≡ part (mod procs)."""
    for i, (t, rows, cols, cfg) in enumerate(cases(types, shapes, narrow)):
        if i % procs == part:
            try:
                _call(t, torch.randn(1, cols, device="cuda"), weights(t, rows, cols), cfg)
            except Exception:            # recorded by the timing pass
                pass
    torch.cuda.synchronize()


def launch_table(res: dict) -> dict:
    """The runtime's table (formats/ggml/gemv_launches.json) from a sweep: each type's best launch per shape."""
    launches: dict[str, list] = {}
    for b in res["best"]:
        launches.setdefault(b["type"], []).append([b["rows"], b["cols"] // QK_K, *b["config"]])
    # "generic": per shape, the launch with the least total time over the generic kernel's swept types (for the
    # types the sweep did not take)
    by_shape: dict[tuple, dict] = {}
    for r in res["rows"]:
        if "us" in r and _generic(r["type"]):
            d = by_shape.setdefault((r["rows"], r["cols"]), {})
            d.setdefault(tuple(r["config"]), []).append(r["us"])
    n_types = len({r["type"] for r in res["rows"] if _generic(r["type"])})
    for (rows, cols), cfgs in sorted(by_shape.items()):
        full = {c: sum(ts) for c, ts in cfgs.items() if len(ts) == n_types}
        if full:
            launches.setdefault("generic", []).append([rows, cols // QK_K, *min(full, key=full.get)])
    return {"source": f"benchmarks/results/gemv_configs_{res['tag']}.json", "gpu": res["machine"].get("gpu"),
            "commit": res["commit"], "launches": launches}


def merge_tables(old: dict, new: dict) -> dict:
    """The runtime's table with `new`'s launches over `old`'s for the same key and shape (a sweep of a few types or
    shapes keeps the other entries); `sources` says where each key's entries came from."""
    launches = {k: list(v) for k, v in old.get("launches", {}).items()}
    sources = dict(old.get("sources") or {k: old.get("source") for k in launches})
    for key, entries in new["launches"].items():
        shapes = {tuple(e[:2]) for e in entries}
        kept = [e for e in launches.get(key, []) if tuple(e[:2]) not in shapes]
        launches[key] = sorted(kept + entries)
        where = [str(new["gpu"])] if new.get("gpu") else []
        src = f"{new['source']} ({', '.join(where + [str(new.get('commit'))[:7]])})"
        prev = sources.get(key) if kept else None
        tail = "" if not prev or prev.endswith("for the others") else " for the others"   # (merged before: has one)
        sources[key] = f"{src} for its shapes; {prev}{tail}" if prev else src
    return {**{k: v for k, v in old.items() if k not in ("launches", "sources")}, "sources": sources,
            "launches": launches}


def markdown(res: dict) -> str:
    out = [f"# packed GEMV launch sweep at batch 1 ({res['tag']})", "",
           f"`{res['command']}` at {res['commit']}; {res['machine'].get('gpu')}; copy {res['copy_gbs']:.0f} GB/s; "
           "µs per GEMV: " + res.get("method", "inside a CUDA graph, L2 cleared before each (the clear timed alone "
                                     "and taken off)") + "; config = BR rows/program, U super-blocks/step, split, "
           "warps", "",
           "| type | rows x cols | best config | best µs | % copy | default config | default µs | best / default speed |",
           "|---|---|---|---|---|---|---|---|"]
    for b in res["best"]:
        out.append(f"| {b['type']} | {b['rows']}x{b['cols']} | {tuple(b['config'])} | {b['us']:.1f} | "
                   f"{b['pct_copy']:.1f} | {tuple(b['default'])} | {b['default_us']:.1f} | "
                   f"{b['default_us'] / b['us']:.2f}x |")
    return "\n".join(out) + "\n"


def pair_plot(path: Path, labels: list[str], left: tuple[str, list], right: tuple[str, list], gpu) -> None:
    """Two bars per GEMV (its label: type and shape): % of copy bandwidth of two kernels or launches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs = range(len(labels))
    for (name, pcts), dx in ((left, -0.2), (right, 0.2)):
        ax.bar([x + dx for x in xs], pcts, 0.4, label=name)
    ax.set_xticks(list(xs), labels, rotation=90, fontsize=6)
    ax.set_ylabel("% of copy bandwidth")
    ax.set_title(f"packed GEMV at batch 1, CUDA graph, cold L2 ({gpu})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(res: dict, path: Path) -> None:
    pair_plot(path, [f"{b['type']}\n{b['rows']}x{b['cols']}" for b in res["best"]],
              ("best launch", [b["pct_copy"] for b in res["best"]]),
              ("gemv_config", [b["default_pct_copy"] for b in res["best"]]), res["machine"].get("gpu"))


def save(res: dict, stem: Path, t0: float) -> None:
    res["seconds"] = time.perf_counter() - t0
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_name(stem.name.replace("gemv_configs_", "gemv_launches_") + ".json").write_text(
        json.dumps(launch_table(res)) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--procs", type=int, default=14, help="processes that compile the kernels first")
    ap.add_argument("--narrow", action="store_true", help="the word-lane kernels at `NARROW`'s launches only")
    ap.add_argument("--warm-part", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--emit-table", metavar="JSON", help="merge a sweep's best launches into the runtime's launch "
                    "table (twinquant/formats/ggml/gemv_launches.json: its entries for the same type and shape "
                    "replaced) and stop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if a.emit_table:
        from twinquant.formats.ggml.packed import LAUNCH_TABLE

        sweep = json.loads(Path(a.emit_table).read_text())
        table = merge_tables(json.loads(LAUNCH_TABLE.read_text()), launch_table(sweep))
        LAUNCH_TABLE.write_text(json.dumps(table) + "\n")
        return print(f"wrote {LAUNCH_TABLE}")
    if not torch.cuda.is_available():
        raise SystemExit("gemv_configs: needs a CUDA GPU")
    shapes = [s for m in a.models for s in SHAPES[m]]
    if a.warm_part is not None:
        return warm(a.warm_part, a.procs, a.types, shapes, a.narrow)
    if not a.tag:
        raise SystemExit("gemv_configs: --tag is required")
    from kernel_speed import copy_bandwidth
    from provenance import record

    t0 = time.perf_counter()
    base = [sys.executable, __file__, "--procs", str(a.procs), "--types", *a.types, "--models", *a.models,
            *(["--narrow"] if a.narrow else [])]
    ps = [subprocess.Popen(base + ["--warm-part", str(i)]) for i in range(a.procs)]
    for p in ps:
        p.wait()
    print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    copy_gbs = copy_bandwidth()
    res = record(tag=a.tag, copy_gbs=copy_gbs, rows=[], best=[],
                 method=f"GEMVs back to back in one CUDA graph over copies of the weight totalling "
                        f"{COLD_BYTES >> 20} MiB (at most 2048), median of 5 replays")
    stem = Path(a.out) / f"gemv_configs_{a.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for t in a.types:
        for rows, cols in shapes:
            w = weights(t, rows, cols)
            ws = cold_copies(w)
            x = torch.randn(1, cols, device="cuda")
            nbytes = w.data.numel() + cols * 4 + rows * 4
            mine = []
            default = gemv_config(t, rows, cols // QK_K)
            for cfg in {*(c for _, _, _, c in cases([t], [(rows, cols)], a.narrow)), default}:
                try:
                    us = graph_us([lambda wi=wi: _call(t, x, wi, cfg) for wi in ws])
                except Exception as e:
                    res["rows"].append({"type": t, "rows": rows, "cols": cols, "config": list(cfg),
                                        "error": str(e).splitlines()[0][:200]})
                    continue
                r = {"type": t, "rows": rows, "cols": cols, "config": list(cfg), "us": us,
                     "pct_copy": 100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs}
                res["rows"].append(r)
                mine.append(r)
            best = min(mine, key=lambda r: r["us"])
            d = next(r for r in mine if r["config"] == list(default))
            res["best"].append({**best, "default": list(default), "default_us": d["us"],
                                "default_pct_copy": d["pct_copy"]})
            print(f"{t} {rows}x{cols}: best {tuple(best['config'])} {best['us']:.1f} us "
                  f"({best['pct_copy']:.1f}% copy); default {tuple(default)} {d['us']:.1f} us", flush=True)
            del ws
            save(res, stem, t0)                      # a run cut short keeps what it measured
    save(res, stem, t0)
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))


if __name__ == "__main__":
    main()
