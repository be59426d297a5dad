"""KL divergence vs size: twinquant's measured allocation against llama.cpp's own types, judged by stock llama.cpp.

For each model (reference = the packaged model as F16, as in benchmarks/quality.py, whose cache this shares):

1. llama.cpp's files: `llama-quantize --imatrix` (imatrix by stock llama-imatrix on groups_merged.txt) for
   Q2_K, Q3_K_S, Q3_K_M, Q4_K_M, IQ2_XS, IQ2_M, IQ3_XXS (any TYPE or TYPE+imatrix).
2. twinquant's measurements (`twinquant measure`, once per variant: `default` = the default recipe's preparation,
   `pad` = the same padded to multiples of 256), timed, peak memory from /usr/bin/time.
3. Targets: the tensor bytes of every llama.cpp file (same size as it, by llama.cpp's count) and `--bpw` values.
   For each target every variant is solved (`quantize --dry-run`, cheap) and the one with the lower predicted KLD
   is built — what a user would pick — from the measurement's kept blocks (`quantize --target-bpw
   --from-measurement`, seconds); `--sequential BPW ...` also builds those targets by a normal quantize run
   (sequential GPTQ) to compare the two.
4. Every file evaluated by stock `llama-perplexity` (wiki.test.raw, ctx 512, 40 chunks, KLD vs the F16 logits).

Writes benchmarks/results/frontier[_TAG].{json,md,png}: the table, KLD ratio to llama.cpp at each llama.cpp size
(goal <= 0.6x), whether twinquant's frontier is below llama.cpp's everywhere, and predicted vs measured KLD
(the additivity check of the allocation's cost model).

    python benchmarks/frontier.py [--models smollm2-135m] [--llamacpp Q2_K+imatrix ...] [--bpw 3.75 4.0 4.5]
        [--variants default pad] [--each-variant] [--imatrix-chunks N] [--tag T]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import record as provenance  # noqa: E402
from quality import CALIB, CODE_COMMIT, ROOT, TIME, TWINQUANT, Bench, eval_text, llamacpp_bin, llamacpp_version, \
    log, results_header, run, tensor_stats, time_facts  # noqa: E402

LLAMACPP = ["Q2_K+imatrix", "Q3_K_S+imatrix", "Q3_K_M+imatrix", "Q4_K_M+imatrix", "IQ2_XS+imatrix",
            "IQ2_M+imatrix", "IQ3_XXS+imatrix"]
# a variant: the recipe options (measure and quantize alike) and how it is measured. The kept-block variants
# assemble each target from the measured blocks; a sampled measurement (`--sample-rows`, the Fisher cost: how a
# 1.5B model is measured on two cores) keeps none, so its targets are built by a normal quantize run.
# `fisher32-nosrc` allocates from fisher32's measurement without the packaged source's own types (Q4_K, Q6_K of a
# Q4_K_M file), the control that cannot profit from re-creating the source's grid.
KEEP = ["--keep-blocks"]
FISHER32 = ["--cost", "fisher", "--sample-rows", "32"]
# fisher32-heldout: fisher32-nosrc measured again with this tree, whose Fisher weights come from windows held out of
# the Hessians (the cached fisher32 measurement predates them: its header has no kld_source)
# fisher32-rh: the rotated control, fisher32-heldout with the randomized Hadamard rotation (its Hessians, importance
# and prices all taken in the rotated basis)
VARIANTS = {"default": ([], KEEP), "pad": (["--pad"], KEEP), "fisher32": (["--rotation", "none"], FISHER32),
            "fisher32-nosrc": (["--rotation", "none"], FISHER32),
            "fisher32-heldout": (["--rotation", "none"], FISHER32),
            "fisher32-rh": (["--rotation", "rh"], FISHER32)}
MEASURED_AS = {"fisher32-nosrc": "fisher32"}
NO_SOURCE_TYPES = ["--exclude-type", "Q4_K", "--exclude-type", "Q6_K"]    # the control: not the source's grid
ALLOCATION = {"fisher32-nosrc": NO_SOURCE_TYPES, "fisher32-heldout": NO_SOURCE_TYPES, "fisher32-rh": NO_SOURCE_TYPES}


def recipe_args(variant: str) -> list[str]:
    return VARIANTS[variant][0]


def kept(variant: str) -> bool:
    return "--keep-blocks" in VARIANTS[variant][1]


class Frontier(Bench):
    variants: list[str] = ["default"]

    def measurement(self, variant: str) -> tuple[Path, dict]:
        """The variant's measurement (made once; resumed if interrupted), with its time and peak memory."""
        name = MEASURED_AS.get(variant, variant)
        path = self.work / f"measure-{name}.json"
        logf = self.work / f"measure-{name}.log"
        done = path.exists() and json.loads(path.read_text()).get("complete")
        if not done:
            log(f"{self.model}: twinquant measure ({variant})")
            run([*TIME, *TWINQUANT, "measure", self.ref, "-o", path, "--calib", CALIB,
                 *VARIANTS[variant][1], *recipe_args(variant)], logf)
        m = json.loads(path.read_text())
        return path, {"seconds": m["seconds"], **time_facts(logf), "tensors": len(m["tensors"])}

    def calib_kld(self, path: Path, variant: str) -> tuple[float, str]:
        """KLD on the windows the variant's measurement priced candidates on (kld_windows x 512 tokens of the
        calibration text, second halves: the held-out windows after the Hessians' where its header says so, else
        the first ones), and which: predicted vs this is the additivity check on the text the prices came from."""
        h = json.loads(self.measurement(variant)[0].read_text())["header"]
        chunks = h.get("kld_windows", 4)
        skip = 0
        if h.get("kld_source") == "held out":
            skip = h["calibration"]["tokens"] // h["calibration"]["ctx"] + h.get("kld_skip", 0)
        out = path.with_suffix(f".calib-kld{f'-skip{skip}' if skip else ''}.json")
        if not out.exists() or out.stat().st_mtime < path.stat().st_mtime:
            run(TWINQUANT + ["perplexity", path, "-f", CALIB, "--ref", self.ref, "-c", 512, "--chunks", chunks,
                             "--skip-chunks", skip, "-q", "--json", out], out.with_suffix(".log"))
        return json.loads(out.read_text())["kld_mean"], f"calibration windows {skip}..{skip + chunks - 1}"

    def predicted(self, variant: str, bpw: float) -> float | None:
        """Predicted KLD of the allocation at `bpw` (dry run); None when the target is below what it can reach."""
        path, _ = self.measurement(variant)
        p = subprocess.run([str(c) for c in TWINQUANT + ["quantize", self.ref, "-o", self.work / "dry.gguf",
                           "--calib", CALIB, "--measurement", path, "--target-bpw", f"{bpw:.6f}", "--dry-run",
                           "-q", *recipe_args(variant), *ALLOCATION.get(variant, [])]], capture_output=True, text=True)
        if p.returncode != 0:
            if "below the smallest" in p.stderr:
                return None
            raise RuntimeError(p.stderr[-2000:])
        return float(re.search(r"predicted KLD ([\d.eE+-]+)", p.stdout).group(1))

    def make(self, row: str) -> tuple[Path, dict]:
        kind, _, spec = row.partition(":")
        if kind != "target":
            return super().make(row)
        bpw_text, *steps = spec.split("+")
        variant = next((v for v in steps if v in VARIANTS), "default")
        # sequential GPTQ (a normal quantize run) instead of the measured blocks
        seq = "seq" in steps or not kept(variant)
        out = self.work / f"target-{bpw_text}-{variant}{'-seq' if seq else ''}.gguf"
        meta = out.with_suffix(".make.json")
        if out.exists() and meta.exists() and not self.force:
            return out, json.loads(meta.read_text())
        path, _ = self.measurement(variant)
        tmp = out.with_name(out.stem + ".tmp.gguf")
        t0 = time.perf_counter()
        text = run(TWINQUANT + ["quantize", self.ref, "-o", tmp, "--calib", CALIB, "--measurement", path,
                                "--target-bpw", bpw_text, *recipe_args(variant), *ALLOCATION.get(variant, []),
                                "--report",
                                out.with_suffix(".report.json"), *([] if seq else ["--from-measurement"])],
                   out.with_suffix(".log"))
        facts = {"make_seconds": time.perf_counter() - t0, "variant": variant, "target_bpw": float(bpw_text),
                 "sequential": seq,
                 "predicted_kld": float(re.search(r"predicted KLD ([\d.eE+-]+)", text).group(1))}
        os.replace(tmp, out)
        meta.write_text(json.dumps(facts))
        return out, facts

    def best_variant(self, bpw: float) -> tuple[str | None, dict]:
        preds = {v: self.predicted(v, bpw) for v in self.variants}
        ok = {v: p for v, p in preds.items() if p is not None}
        return (min(ok, key=ok.get) if ok else None), preds


def type_share(report: Path) -> dict[str, float]:
    """Share of the quantized weights in each type (from a quantize --report), largest first."""
    if not report.exists():
        return {}
    tensors = json.loads(report.read_text())["tensors"]
    total = sum(math.prod(t["shape"]) for t in tensors)
    share: dict[str, float] = {}
    for t in tensors:
        share[t["type"]] = share.get(t["type"], 0.0) + math.prod(t["shape"]) / total
    return dict(sorted(((k, round(v, 6)) for k, v in share.items()), key=lambda kv: -kv[1]))


def role_types(report: Path) -> dict[str, dict[str, int]]:
    """Per role (attn_q, ffn_down, token_embd …): how many tensors got each type (from a quantize --report)."""
    if not report.exists():
        return {}
    out: dict[str, dict[str, int]] = {}
    for t in json.loads(report.read_text())["tensors"]:
        parts = t["name"].split(".")
        role = parts[2] if parts[0] == "blk" else parts[0]
        out.setdefault(role, {})
        out[role][t["type"]] = out[role].get(t["type"], 0) + 1
    return {r: dict(sorted(c.items(), key=lambda kv: -kv[1])) for r, c in out.items()}


def markdown(results: list[dict], measurements: dict, chunks: int, text: str = "wiki.test.raw") -> str:
    lines = [f"{text}, ctx 512, {chunks} chunks, stock llama-perplexity; KLD vs the F16 reference. "
             "bpw = tensor data bits per weight (llama.cpp's count).", "",
             "| model | file | MiB | bpw | PPL | mean KLD | 99% KLD | same top | predicted KLD | calib KLD |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["model"], r["bpw"])):
        pred = f"{r['predicted_kld']:.4f}" if r.get("predicted_kld") is not None else ""
        cal = f"{r['calib_kld']:.4f}" if r.get("calib_kld") is not None else ""
        lines.append(f"| {r['model']} | {r['row']} | {r['file_bytes'] / 2**20:.1f} | {r['bpw']:.3f} | {r['ppl']:.3f} "
                     f"| {r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | {pred} | {cal} |")
    lines.append("")
    for r in results:       # (rows from before calib_kld_windows were on the first 4 calibration windows)
        if r.get("calib_kld_windows"):
            lines.append(f"- {r['model']}: {r['row']}: calib KLD on {r['calib_kld_windows']} (the windows its "
                         "measurement priced on)")
    for m in dict.fromkeys(r["model"] for r in results):
        ours = [r for r in results if r["model"] == m and r["row"].startswith("target:")]
        theirs = [r for r in results if r["model"] == m and r["row"].startswith("llama.cpp:")]
        for v, facts in measurements.get(m, {}).items():
            usage = (f"{facts['cpu_seconds']:.0f} s CPU, peak memory {facts['peak_rss_mib']:.0f} MiB"
                     if facts.get("cpu_seconds") and facts.get("peak_rss_mib") else
                     "CPU time and peak memory not in this cache (the run that made it has them)")
            lines.append(f"- {m}: measurement `{v}`: {facts['tensors']} tensors, {facts['seconds']:.0f} s wall, "
                         + usage)
        below = []
        for t in sorted(theirs, key=lambda r: r["bpw"]):
            fit = [o for o in ours if o["tensor_bytes"] <= t["tensor_bytes"]]
            best = min(fit, key=lambda o: o["kld_mean"]) if fit else None
            if best is None:
                lines.append(f"- {m}: at the size of {t['row']} ({t['bpw']:.3f} bpw, KLD {t['kld_mean']:.4f}): "
                             "no twinquant file that small")
                below.append(False)
                continue
            ratio = best["kld_mean"] / t["kld_mean"]
            below.append(ratio < 1)
            made = best["tensor_bytes"] >= 0.97 * t["tensor_bytes"]     # (else no target of this size was built)
            lines.append(f"- {m}: at <= the size of {t['row']} ({t['bpw']:.3f} bpw, KLD {t['kld_mean']:.4f}): "
                         f"{best['row']} KLD {best['kld_mean']:.4f} = {ratio:.2f}x "
                         + (f"({'meets' if ratio <= 0.6 else 'misses'} the 0.6x goal)" if made else
                            f"(no twinquant file of this size in this run: that one is "
                            f"{best['tensor_bytes'] / t['tensor_bytes']:.2f}x its tensor bytes)"))
        if theirs:
            lines.append(f"- {m}: twinquant below llama.cpp at {sum(below)} of {len(below)} llama.cpp sizes")
        for o in ours:
            if o.get("type_share"):
                lines.append(f"- {m}: {o['row']}: weights by type " + ", ".join(
                    f"{k} {100 * v:.1f}%" for k, v in o["type_share"].items()))
            if o.get("role_types"):
                lines.append(f"- {m}: {o['row']}: tensors per role and type: " + "; ".join(
                    f"{role} " + " ".join(f"{t}×{n}" for t, n in c.items()) for role, c in o["role_types"].items()))
        pairs = [(o["predicted_kld"], o["calib_kld"], o["kld_mean"]) for o in ours
                 if o.get("predicted_kld") and o.get("calib_kld") and not o.get("sequential")]
        if len(pairs) >= 2:
            import numpy as np

            p, c, q = np.array(pairs).T
            lines.append(f"- {m}: additivity on the measurement's own calibration windows: measured / predicted KLD "
                         f"{np.min(c / p):.2f}-{np.max(c / p):.2f} (mean {np.mean(c / p):.2f}); on wiki.test.raw / "
                         f"predicted {np.min(q / p):.2f}-{np.max(q / p):.2f}; rank correlation of predicted and "
                         f"wiki KLD {np.corrcoef(np.argsort(np.argsort(p)), np.argsort(np.argsort(q)))[0, 1]:.2f}")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = sorted((r for r in results if r["model"] == m), key=lambda r: r["bpw"])
        ours = [r for r in rows if r["row"].startswith("target:") and not r.get("sequential")]
        seq = [r for r in rows if r.get("sequential")]
        theirs = [r for r in rows if r["row"].startswith("llama.cpp:")]
        peer = [r for r in rows if r["row"].startswith("autoround:")]
        for i, v in enumerate(dict.fromkeys(r.get("variant") for r in ours)):     # a line per variant
            mine = [r for r in ours if r.get("variant") == v]
            ax.plot([r["bpw"] for r in mine], [r["kld_mean"] for r in mine], "o-s^v"[i % 5] + "-",
                    color=("tab:red", "tab:orange", "tab:purple", "tab:brown")[i % 4],
                    label=f"twinquant --target-bpw ({v})")
        if peer:
            ax.scatter([r["bpw"] for r in peer], [r["kld_mean"] for r in peer], color="tab:green", label="AutoRound")
        if seq:
            ax.scatter([r["bpw"] for r in seq], [r["kld_mean"] for r in seq], marker="x", color="tab:red",
                       label="twinquant, sequential GPTQ")
        ax.scatter([r["bpw"] for r in theirs], [r["kld_mean"] for r in theirs], color="tab:blue",
                   label="llama.cpp + imatrix")
        for r in theirs:
            ax.annotate(r["row"].split(":", 1)[1].replace("+imatrix", ""), (r["bpw"], r["kld_mean"]), fontsize=7,
                        xytext=(3, 2), textcoords="offset points")
        ax.set_title(m)
        ax.set_xlabel("bits per weight (tensor data)")
        ax.xaxis.get_major_formatter().set_useOffset(False)      # plain bpw, even for rows a few 1e-5 apart
        lo, hi = min(r["bpw"] for r in rows), max(r["bpw"] for r in rows)
        if hi - lo < 0.5:
            ax.set_xlim((lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5)
        ax.set_ylabel("mean KLD vs F16 (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def autoround_version() -> str:
    """The AutoRound (and torch) versions of the venv benchmarks/setup_autoround.sh makes."""
    py = subprocess.run(["bash", str(ROOT / "benchmarks" / "setup_autoround.sh")], check=True,
                        stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    return subprocess.run([py, "-c", "import auto_round, torch; print(f'auto-round {auto_round.__version__}, "
                           "torch {torch.__version__}')"], capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--text", default="wiki", help="evaluation text: wiki (wiki.test.raw), code (this repository's "
                    f"source at {CODE_COMMIT}) or a file")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--llamacpp", nargs="*", default=LLAMACPP, help="llama-quantize types, +imatrix")
    ap.add_argument("--autoround", nargs="*", default=[], help="AutoRound GGUF formats (e.g. q2_k_s; its venv: "
                    "benchmarks/setup_autoround.sh): rows, and twinquant targets at their sizes, as --llamacpp")
    ap.add_argument("--autoround-args", default="", help="extra autoround_gguf.py options, e.g. '--iters 0'")
    ap.add_argument("--bpw", nargs="*", type=float, default=[], help="extra twinquant targets (bits per weight)")
    ap.add_argument("--variants", nargs="+", default=["default", "pad"], choices=list(VARIANTS))
    ap.add_argument("--each-variant", action="store_true", help="build every variant at each target, not only "
                    "the one of lowest predicted KLD (controls side by side: rotated and not)")
    ap.add_argument("--no-match", action="store_true", help="no twinquant target at each llama.cpp file's size")
    ap.add_argument("--sequential", nargs="*", type=float, default=[], help="targets (bpw) also built by a normal "
                    "quantize run (sequential GPTQ) beside the measured-block assembly")
    ap.add_argument("--imatrix-chunks", type=int)
    ap.add_argument("--work", help="cache folder (default ~/.cache/twinquant/quality/MODEL)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    stem = "frontier" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bin_dir = llamacpp_bin()
    results, measurements, failures, inputs = [], {}, [], {}
    text = eval_text(args.text)
    prov = provenance(llama_cpp=llamacpp_version(bin_dir), chunks=args.chunks, ctx=512, text=text.name,
                      calibration=CALIB.name, imatrix_chunks=args.imatrix_chunks,
                      variants={v: {"recipe": VARIANTS[v][0], "measure": VARIANTS[v][1],
                                    "allocation": ALLOCATION.get(v, [])} for v in args.variants},
                      **({"autoround": autoround_version(), "autoround_args": args.autoround_args}
                         if args.autoround else {}))

    def write() -> None:     # after every row: an interrupted run keeps what it measured
        (out / f"{stem}.json").write_text(json.dumps({"provenance": prov, "inputs": inputs, "results": results,
                                                      "measurements": measurements}, indent=1))

    def record(b, row):
        try:
            r = b.evaluate(row)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            failures.append((b.model, row, str(e).splitlines()[0]))
            log(f"{b.model}: {row} FAILED: {str(e)[-600:]}")
            return None
        path, facts = b.make(row)          # cached by evaluate: the file and how it was made
        r = {**r, **{k: facts[k] for k in ("predicted_kld", "variant", "sequential", "make_seconds") if k in facts}}
        if row.startswith("target:"):
            r["calib_kld"], r["calib_kld_windows"] = b.calib_kld(path, r["variant"])
            r["type_share"] = type_share(path.with_suffix(".report.json"))
            r["role_types"] = role_types(path.with_suffix(".report.json"))
        results.append(r)
        log(f"{b.model}: {row}: {r['bpw']:.3f} bpw, KLD {r['kld_mean']:.4f}"
            + (f" (predicted {r['predicted_kld']:.4f})" if r.get("predicted_kld") else ""))
        write()
        return r

    for m in args.models:
        work = Path(args.work) / m if args.work else Path.home() / ".cache" / "twinquant" / "quality" / m
        b = Frontier(m, work, bin_dir, args.chunks, args.threads, args.force, text)
        b.imatrix_chunks = args.imatrix_chunks
        b.autoround_args = args.autoround_args.split()
        b.variants = args.variants
        b.prepare()
        measurements[m] = {}
        for v in args.variants:     # the measurement is a result too: any size can be allocated from it
            mpath, measurements[m][v] = b.measurement(v)
            shutil.copyfile(mpath, out / f"measure_{args.tag or 'frontier'}-{MEASURED_AS.get(v, v)}.json")
        targets = list(args.bpw)
        for row in [f"llama.cpp:{t}" for t in args.llamacpp] + [f"autoround:{f}" for f in args.autoround]:
            r = record(b, row)
            if r is not None and not args.no_match:
                targets.append(8 * tensor_stats(b.make(row)[0])[0] / b.n_params)
        for bpw in sorted(set(math.floor(t * 1e6) / 1e6 for t in targets)):   # down: never over the size
            v, preds = b.best_variant(bpw)
            log(f"{m}: {bpw:.4f} bpw: predicted " + ", ".join(f"{k} {p:.4f}" if p is not None else f"{k} -"
                                                              for k, p in preds.items()))
            if v is None:
                failures.append((m, f"target {bpw:.4f}", "below the smallest size every variant can reach"))
                continue
            for each in ([u for u in args.variants if preds.get(u) is not None] if args.each_variant else [v]):
                record(b, f"target:{bpw:.6f}+{each}")
        for bpw in args.sequential:
            v, _ = b.best_variant(bpw)
            if v is not None:
                record(b, f"target:{bpw:.6f}+{v}+seq")
        inputs[m] = b.inputs()
    write()
    md = results_header(f"frontier: {', '.join(args.models)}", prov, inputs) + markdown(results, measurements,
                                                                                       args.chunks, text.name)
    (out / f"{stem}.md").write_text(md)
    plot(results, out / f"{stem}.png")
    print(md)
    for m, row, why in failures:
        print(f"not made: {m} {row}: {why}")
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
