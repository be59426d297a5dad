"""What every results file records about where it came from: the command, the commit, tool versions, the
machine (CPU, memory, GPU and driver) — one helper for all benchmarks."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    if os.environ.get("TWINQUANT_COMMIT"):      # a copy of the tree whose .git is missing or stale (the GPU box)
        return os.environ["TWINQUANT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict:
    import numpy
    import torch

    import twinquant

    out = {"twinquant": twinquant.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        from importlib.metadata import version

        out["gguf"] = version("gguf")
        out["llama_cpp_python"] = version("llama_cpp_python")
    except Exception:
        out.setdefault("gguf", None)
        out.setdefault("llama_cpp_python", None)
    return out


def machine() -> dict:
    import torch

    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["gpu"] = p.name
        out["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            out["driver"] = None
    return out


def record(**fields) -> dict:
    """The provenance block of a results file: the command line (with the TWINQUANT_* settings that change which
    kernels run, e.g. TWINQUANT_WORDS, TWINQUANT_Q8), commit, versions, machine, plus `fields`."""
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("TWINQUANT_") and k != "TWINQUANT_COMMIT"]
    return {"command": " ".join([*env, Path(sys.executable).name, *sys.argv]), "commit": git_commit(),
            "versions": versions(), "machine": machine(), **fields}


def results_stem(out, name: str, tag: str) -> Path:
    """benchmarks/results/NAME_TAG (without a suffix: the .json, .md and .png go beside it); the folder made."""
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out) / f"{name}_{tag}"


def _beside(stem: Path, suffix: str) -> Path:
    return stem.parent / (stem.name + suffix)       # (not with_suffix: a tag may hold a dot, "qwen2.5-7b")


def write_results(stem: Path, res: dict, md: str | None = None, plot=None) -> None:
    """STEM.json; with `md` also STEM.md and the table printed, with `plot` (a function of the results and a path)
    STEM.png. A long run calls it with the results alone after each step, so a killed run keeps what it measured."""
    _beside(stem, ".json").write_text(json.dumps(res, indent=1))
    if plot is not None:
        plot(res, _beside(stem, ".png"))
    if md is not None:
        _beside(stem, ".md").write_text(md)
        print(md)


def plot_again(paths, plot) -> None:
    """`--plot JSON...`: each committed results file's PNG drawn again beside it from its JSON (nothing measured)."""
    for p in paths:
        p = Path(p)
        plot(json.loads(p.read_text()), p.with_suffix(".png"))
        print(f"wrote {p.with_suffix('.png')}")


def plot_option(ap) -> None:
    """A benchmark's `--plot JSON...` (see `plotted`)."""
    ap.add_argument("--plot", nargs="+", metavar="JSON", help="draw the PNG of these results files again and "
                    "measure nothing (no GPU needed)")


def plotted(ap, a, plot, required=("tag",)) -> bool:
    """True once `--plot` has drawn its files again (the benchmark then stops); else the options a measuring run
    needs (--tag unless told otherwise) are insisted on, with argparse's one line."""
    if a.plot:
        plot_again(a.plot, plot)
        return True
    missing = [f"--{r.replace('_', '-')}" for r in required if not getattr(a, r)]
    if missing:
        ap.error(f"{' and '.join(missing)} required (unless --plot)")
    return False


def stacked_barh(ax, labels: list[str], parts: dict[str, list[float]]) -> None:
    """One horizontal bar a label, stacked by part (each part's values in the labels' order), legend at the right."""
    left = [0.0] * len(labels)
    for name, v in parts.items():
        ax.barh(range(len(labels)), v, left=left, label=name)
        left = [a + b for a, b in zip(left, v)]
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
