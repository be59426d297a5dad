"""Wall time and peak memory of `twinquant quantize` (the streamed pipeline) on a real model.

Runs the command as a subprocess, samples its resident memory every second (anonymous and file-backed apart:
mapped model pages are reclaimable, anonymous ones are what the process really holds) and records the peak,
`ru_maxrss`, wall and CPU time, seconds per block from the `--report` JSON, and whether stock llama-perplexity runs
the file (a few chunks). Writes benchmarks/results/pipeline_memory_TAG.{json,md}.

    python benchmarks/pipeline_memory.py --model qwen2.5-coder-1.5b --tag qwen15 [-- extra quantize options]
    python benchmarks/pipeline_memory.py --model smollm2-135m --tag smol --calib-tokens 2048

A run made by hand under `/usr/bin/time -v` can be recorded instead of re-run: `--record TIME_LOG --report R.json
--gguf OUT.gguf` (the command line is taken from the time log).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_commit, machine, plot_option, plotted, versions  # noqa: E402


def _rss(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of a process and its children, from /proc."""
    import psutil

    anon = file = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    for p in procs:
        try:
            for ln in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if ln.startswith("RssAnon:"):
                    anon += int(ln.split()[1])
                elif ln.startswith("RssFile:") or ln.startswith("RssShmem:"):
                    file += int(ln.split()[1])
        except OSError:
            pass
    return anon, file


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_anon = peak_total = 0
    lines: list[str] = []
    import threading

    def reader():
        for ln in proc.stdout:
            lines.append(ln)
            sys.stderr.write(ln)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    while proc.poll() is None:
        a, f = _rss(proc.pid)
        peak_anon, peak_total = max(peak_anon, a), max(peak_total, a + f)
        time.sleep(1.0)
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_gib": ru.ru_maxrss / 2**20,
            "peak_anon_sampled_gib": peak_anon / 2**20, "peak_total_sampled_gib": peak_total / 2**20,
            "tail": "".join(lines[-5:])}


def record(time_log: Path) -> tuple[list[str], dict]:
    text = time_log.read_text(errors="replace")
    m = re.search(r'Command being timed: "(.*)"', text)
    val = lambda k: re.search(rf"{k}: (.*)", text).group(1).strip()  # noqa: E731
    wall = val(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)")
    parts = [float(p) for p in wall.split(":")]
    wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    res = {"returncode": int(val("Exit status")), "wall_s": wall_s,
           "cpu_s": float(val(r"User time \(seconds\)")) + float(val(r"System time \(seconds\)")),
           "peak_rss_gib": int(val(r"Maximum resident set size \(kbytes\)")) / 2**20,
           "peak_anon_sampled_gib": None, "peak_total_sampled_gib": None, "recorded_from": time_log.name}
    return (m.group(1).split() if m else []), res


def stock_perplexity(gguf_path: Path, chunks: int) -> dict:
    """Stock llama-perplexity runs the file (wiki.test.raw, ctx 512, a few chunks): PPL, or the error."""
    from benchmarks.quality import llamacpp_bin

    text = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    p = subprocess.run([str(llamacpp_bin() / "llama-perplexity"), "-m", str(gguf_path), "-f", str(text), "-c",
                        "512", "--chunks", str(chunks), "-t", str(os.cpu_count())], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
    return {"chunks": chunks, "ppl": float(m.group(1)) if m else None, "returncode": p.returncode}


def plot(res: dict, path: Path) -> None:
    """Seconds of each block of the run, with its wall time, peak memory and the file it wrote in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, blocks = res["run"], res["seconds_per_block"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(blocks)), blocks, color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("seconds")
    bpw = res.get("bits_per_weight_file") or 0
    ax.set_title(f"quantize {res['model']} ({res['tag']}): {r['wall_s'] / 60:.1f} min, peak RSS "
                 f"{r['peak_rss_gib']:.2f} GiB, {bpw:.3f} bpw", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="the model to quantize (required unless --plot)")
    ap.add_argument("--tag", help="names the results files (required unless --plot)")
    plot_option(ap)
    ap.add_argument("--out-dir", default=str(Path.home() / ".cache" / "twinquant" / "pipeline_memory"))
    ap.add_argument("--record", help="a /usr/bin/time -v log of a finished run (recorded, not re-run)")
    ap.add_argument("--report", help="with --record: the run's --report JSON")
    ap.add_argument("--gguf", help="with --record: the file it wrote")
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("extra", nargs="*", help="more quantize options (after --)")
    args = ap.parse_args()
    if plotted(ap, args, plot, required=("model", "tag")):
        return
    from twinquant.zoo import resolve, sha256_of

    src = resolve(args.model)
    commit = git_commit()     # the code that runs (HEAD may move while it does)
    if args.record:
        cmd, res = record(Path(args.record))
        report, gguf_path = Path(args.report), Path(args.gguf)
    else:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        gguf_path, report = out_dir / f"{args.tag}.gguf", out_dir / f"{args.tag}.report.json"
        cmd = [sys.executable, "-m", "twinquant", "quantize", args.model, "-o", str(gguf_path), "--report",
               str(report), *args.extra]
        res = run(cmd)
    rep = json.loads(report.read_text()) if report.is_file() else {}
    blocks = rep.get("seconds_per_block", [])
    result = {
        "benchmark": "pipeline_memory", "tag": args.tag, "command": " ".join(cmd), "commit": commit,
        "versions": versions(), "machine": machine(), "model": args.model,
        "model_sha256": sha256_of([src]) if src.is_file() else None,
        "calibration": rep.get("calibration"), "recipe": rep.get("recipe"), "rotation": rep.get("rotation"),
        "file_bytes": rep.get("file_bytes"), "n_params": rep.get("n_params"),
        "bits_per_weight_file": 8 * rep["file_bytes"] / rep["n_params"] if rep.get("file_bytes") else None,
        "gguf_sha256": sha256_of([gguf_path]) if gguf_path.is_file() else None,
        "run": res, "seconds_per_block": blocks,
        "stock_llama_perplexity": stock_perplexity(gguf_path, args.ppl_chunks) if gguf_path.is_file() else None,
    }
    dest = ROOT / "benchmarks" / "results"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"pipeline_memory_{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    r = res
    ppl = result["stock_llama_perplexity"] or {}
    md = [f"# twinquant quantize: time and memory ({args.model})", "",
          f"command: `{result['command']}`  ", f"commit {result['commit'][:12]}; {result['machine']['cpu']}, "
          f"{result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB; torch "
          f"{result['versions']['torch']}", "",
          "| model | recipe | rotation | file MiB | bpw (file) | wall min | CPU min | peak RSS GiB | mean s/block | "
          "stock llama-perplexity |", "|---|---|---|---|---|---|---|---|---|---|",
          f"| {args.model} | {(result['recipe'] or {}).get('name')} | {result['rotation']} | "
          f"{(result['file_bytes'] or 0) / 2**20:.1f} | {result['bits_per_weight_file'] or 0:.3f} | "
          f"{r['wall_s'] / 60:.1f} | {r['cpu_s'] / 60:.1f} | {r['peak_rss_gib']:.2f} | "
          f"{sum(blocks) / max(len(blocks), 1):.1f} | "
          f"PPL {ppl.get('ppl')} on {ppl.get('chunks')} chunks (rc {ppl.get('returncode')}) |", ""]
    (dest / f"pipeline_memory_{args.tag}.md").write_text("\n".join(md))
    plot(result, dest / f"pipeline_memory_{args.tag}.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
