"""GGML codec block fit speed: the numpy codecs as they were (frozen in benchmarks/_ggml_numpy_ref/) against the
torch ones (twinquant.formats.ggml) on the CPU and on CUDA, on the linear shapes of Qwen2.5-32B, with a byte check.

    python benchmarks/codec_speed.py --rows 256 --tag cpu                       # quick, this machine's CPU
    python benchmarks/codec_speed.py --device cuda --old-rows 1024 --tag h200   # full rows on the GPU

Timed: `codec.quantize(W, imatrix)` (llama.cpp's block fit and codes of the whole matrix; packing, numpy in both, is
not timed). The old side runs on the first `--old-rows` rows (default: all) and its time is scaled to the full row
count (rows are independent; marked `old_extrapolated`); the bytes of those rows must be identical. Writes
benchmarks/results/codec_speed_TAG.json (command, commit, versions, device, machine, rows) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ggml_numpy_ref as old  # noqa: E402

from twinquant.formats.ggml import get_codec  # noqa: E402

SHAPES = ["5120x5120", "27648x5120", "5120x27648"]         # Qwen2.5-32B: q/o, gate/up, down (rows x cols)
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q4_0", "Q8_0"]
RESULTS = Path(__file__).resolve().parent / "results"


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights with a heavy-tailed part, like trained linears (the searches' work depends on the data)."""
    r = np.random.default_rng(seed)
    w = r.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w += (r.standard_t(3, (rows, cols)) * 0.005).astype(np.float32)
    return w


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> str:
    """TWINQUANT_COMMIT if set (a copy of the tree without its .git), else git's HEAD."""
    if os.environ.get("TWINQUANT_COMMIT"):
        return os.environ["TWINQUANT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _first_rows(p, n: int):
    """BlockParams of the first n rows (the packed GGML fields too)."""
    packed = replace(p.packed, **{f.name: getattr(p.packed, f.name)[:n] for f in fields(p.packed)
                                  if isinstance(getattr(p.packed, f.name), torch.Tensor)})
    return type(p)(p.scale[:n], p.offset[:n], packed)


def bench(shape: str, qtype: str, device: str, rows_cap: int | None, old_rows: int | None, imatrix: bool) -> dict:
    R, C = (int(v) for v in shape.split("x"))
    rows = min(R, rows_cap) if rows_cap else R
    w = _weights(rows, C)
    imp = (np.random.default_rng(1).uniform(0.05, 3.0, C) ** 3).astype(np.float32) if imatrix else None
    new, ref = get_codec(qtype), old.CODECS[qtype]
    n_old = min(rows, old_rows) if old_rows else rows

    t_old, (codes_o, params_o) = _time(lambda: ref.quantize(w[:n_old], imp), "cpu")
    wd = torch.from_numpy(w).to(device)
    impd = None if imp is None else torch.from_numpy(imp).to(device)
    new.quantize(wd[:64], impd)                                       # warm-up (CUDA context, kernels)
    t_new, (codes_n, params_n) = _time(lambda: new.quantize(wd, impd), device)
    same = bool(np.array_equal(ref.pack(codes_o, params_o),
                               new.pack(codes_n[:n_old], [_first_rows(p, n_old) for p in params_n])))
    s_old = t_old * rows / n_old
    return {"type": qtype, "shape": shape, "rows": rows, "cols": C, "device": device, "imatrix": imatrix,
            "old_rows": n_old, "old_extrapolated": n_old < rows, "seconds_old": s_old, "seconds_new": t_new,
            "speedup": s_old / t_new, "bytes_identical": same}


def _plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["device"]) for r in results}, key=lambda g: (g[1], SHAPES.index(g[0])
                                                                                 if g[0] in SHAPES else 9))
    types = list(dict.fromkeys(r["type"] for r in results))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(types) * max(1, len(groups)) / 3, 4.2))
    width = 0.8 / max(1, len(groups))
    for k, (shape, dev) in enumerate(groups):
        ys = [next((r["speedup"] for r in results if (r["type"], r["shape"], r["device"]) == (t, shape, dev)),
                   np.nan) for t in types]
        ax.bar(np.arange(len(types)) + (k - (len(groups) - 1) / 2) * width, ys, width, label=f"{shape} {dev}")
    ax.set_xticks(np.arange(len(types)), types)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(20.0, color="r", lw=0.8, ls="--", label="20x target")
    ax.set_ylabel("speedup of quantize (old numpy / torch)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or a comma list (default cpu)")
    ap.add_argument("--rows", type=int, default=None, help="use only this many rows of each shape (quick run)")
    ap.add_argument("--old-rows", type=int, default=None, help="time the numpy codecs on this many rows, scaled")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--imatrix", action="store_true", help="with an importance matrix (llama.cpp's imatrix path)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--tag", default="local")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    devices = [d.strip() for d in a.device.split(",")]
    results = []
    print(f"{'type':6} {'shape':>11} {'rows':>6} {'device':6} {'s old':>9} {'s new':>9} {'speedup':>8} bytes")
    for shape in a.shapes.split(","):
        for dev in devices:
            for t in a.types.split(","):
                r = bench(shape, t, dev, a.rows, a.old_rows, a.imatrix)
                results.append(r)
                star = "*" if r["old_extrapolated"] else " "
                print(f"{t:6} {shape:>11} {r['rows']:6d} {dev:6} {r['seconds_old']:8.2f}{star} "
                      f"{r['seconds_new']:9.3f} {r['speedup']:7.1f}x {'same' if r['bytes_identical'] else 'DIFF'}",
                      flush=True)
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "git_commit": _commit(),
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "devices": {d: _device_name(d) for d in devices},
            "machine": {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "timed": "codec.quantize (block fit + codes), packing excluded; old = frozen numpy codecs",
            "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"codec_speed_{a.tag}.json"
    out.write_text(json.dumps(meta, indent=1) + "\n")
    _plot(results, out.with_suffix(".png"), f"{a.tag}: " + ", ".join(meta["devices"].values())
          + f" ({torch.get_num_threads()} CPU threads)")
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0 if all(r["bytes_identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
