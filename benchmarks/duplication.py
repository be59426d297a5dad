"""Does layer duplication recover 2-bit quality? No duplication vs the best configuration each search finds.

For each model: the 2-bit file is the best recipe of benchmarks/quality.py (GPTQ into llama.cpp's Q2_K mix, made
from the F16 reference; cached there, or made here). Settings: `w2` (weights only) and `w2a4` / `w2a8` (every
linear input fake-quantized per token to 4 / 8 bits, where per-copy activation parameters matter). Layers are
picked by measured sensitivity (`twinquant sensitivity`'s measurement on the calibration windows) within
+10% and +25% compute budgets; serial copies for w2 (a parallel group of identical copies is the block itself),
hybrid (serial or parallel, chosen on calibration KLD) with activation quantization. Each strategy (grid, bayes,
evolution) tunes the copies' parameters with the same trial budget on calibration KLD; the chosen configuration
is then evaluated on wiki.test.raw (ctx 512, --chunks) by twinquant's runtime (stock llama.cpp cannot run
duplicates or activation quantization): PPL, mean KLD vs the F16 reference, same top.

    python benchmarks/duplication.py [--models smollm2-135m] [--settings w2 w2a4] [--budgets 10 25]
        [--strategies grid bayes evolution] [--trials 20] [--chunks 40] [--calib-tokens 2048]
        [--quantized FILE --ref F16 [--control FILE ...]]

`--quantized` takes a given twinquant file (e.g. a `--target-bpw 2.3` allocation) instead of the GPTQ Q2_K mix, with
`--ref` its float reference; each `--control` file is evaluated the same way, as another way of spending what the
duplicates cost (e.g. the same file allocated at +10% bytes, the bytes a decode step re-reads for +10% compute).
Every row records the file's bits per weight (tensor bytes x 8 / parameters, copies sharing weights counted once).

Writes benchmarks/results/duplication[_TAG].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import record as provenance  # noqa: E402
from twinquant.calibration.windows import load_calibration  # noqa: E402
from twinquant.duplication import tune as T  # noqa: E402
from twinquant.duplication.objective import KLDObjective  # noqa: E402
from twinquant.model.copies import ParamStore  # noqa: E402
from twinquant.duplication.sensitivity import Sensitivity, layer_sensitivity  # noqa: E402
from twinquant.model.topology import Budget  # noqa: E402
from twinquant.eval.perplexity import compute_logprobs, evaluate, windows_for_text  # noqa: E402
from twinquant.io.gguf_read import load_gguf  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = ROOT.parent / "shared" / "data" / "calibration" / "groups_merged.txt"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def two_bit_file(model: str, work: Path) -> tuple[Path, Path]:
    """(F16 reference, GPTQ Q2_K-mix file), made by benchmarks/quality.py's cache when missing."""
    ref, q = work / "ref-f16.gguf", work / "twinquant-gptq.gguf"
    if not q.exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--models", model, "--llamacpp",
                        "--twinquant", "gptq", "--tag", f"dup-{model}"], check=True)
    return ref, q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--settings", nargs="+", default=["w2", "w2a4"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[10.0, 25.0], help="extra compute, percent")
    ap.add_argument("--strategies", nargs="+", default=["grid", "bayes", "evolution"])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--ranking", help="layers by sensitivity, most sensitive first (skips the measurement)")
    ap.add_argument("--quantized", help="the quantized file to duplicate (one model; default: the GPTQ Q2_K mix)")
    ap.add_argument("--ref", help="the float reference of --quantized (F16 GGUF)")
    ap.add_argument("--control", nargs="*", default=[], help="other files of the same model, evaluated alike")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    stem = "duplication" + (f"_{args.tag}" if args.tag else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    if args.quantized and (len(args.models) != 1 or not args.ref):
        ap.error("--quantized takes one --models name and its --ref")
    inputs = {}
    for name in args.models:
        work = Path.home() / ".cache" / "twinquant" / "quality" / name
        ref_path, q_path = (Path(args.ref), Path(args.quantized)) if args.quantized else two_bit_file(name, work)
        inputs[name] = {"reference": {"file": ref_path.name, "sha256": sha256(ref_path)},
                        "quantized": {"file": q_path.name, "sha256": sha256(q_path), "bpw": file_bpw(q_path)},
                        "controls": []}
        ref = load_gguf(ref_path).materialize()
        quant = load_gguf(q_path).materialize()
        calib = load_calibration(ref, CALIB, args.calib_tokens, 512)
        windows = windows_for_text(ref, WIKI.read_text(encoding="utf-8"), 512, args.chunks, "llama.cpp")
        t0 = time.perf_counter()
        eval_ref = compute_logprobs(ref, windows)
        objective = KLDObjective(ref, calib.windows)
        log(f"{name}: reference log-probs (eval {args.chunks} chunks, calib {calib.n_tokens} tokens) in "
            f"{time.perf_counter() - t0:.0f}s")
        cached = work / f"sensitivity-gptq-{calib.n_tokens}.json"       # 2·n_layers + 2 forwards: reuse it
        if args.ranking:                   # a ranking measured before (e.g. printed by an earlier run)
            sens = None
        elif cached.exists():
            sens = Sensitivity.from_dict(json.loads(cached.read_text()))
        else:
            sens = layer_sensitivity(ref, quant, calib.windows, progress=False)
            sens.write(cached.with_suffix(""))
        ranking = [int(x) for x in args.ranking.split(",")] if args.ranking else sens.ranking()
        if sens is not None:
            log(f"{name}: sensitivity in {sens.seconds:.0f}s; most sensitive layers {ranking[:8]}")
        del ref
        for setting in args.settings:
            act_bits = {"w2": None, "w2a8": 8, "w2a6": 6, "w2a4": 4}[setting]
            params = ParamStore(base={"act_bits": act_bits} if act_bits else {})
            kind = "serial" if act_bits is None else "hybrid"

            def evaluate_row(label, budget_pct, topo, search=None):
                calib_kld = objective(quant)
                t1 = time.perf_counter()
                r = evaluate(quant, windows, ref=eval_ref, progress=False)
                row = {"model": name, "setting": setting, "config": label, "file": q_path.name,
                       "bpw": inputs[name]["quantized"]["bpw"], "budget_pct": budget_pct,
                       "extra_layers": quant.layout.extra_executions(),
                       "extra_flops_pct": Budget().cost(quant, quant.layout)["extra_flops_pct"],
                       "topology": topo, "params": quant.dup_params.to_dict() if quant.dup_params else {},
                       "calib_kld": calib_kld, "eval_seconds": time.perf_counter() - t1,
                       **{k: r[k] for k in ("ppl", "kld_mean", "kld_p99", "same_top")}}
                if search is not None:
                    row.update(trials=len(search.trials), search_seconds=search.seconds,
                               best_calib_kld=search.best_value, kept_off=getattr(search, "kept_off", False),
                               off_calib_kld=getattr(search, "off_value", None),
                               trial_calib_klds=[t.get("value") for t in search.trials])
                results.append(row)
                log(f"{name} {setting} {label}: calib KLD {calib_kld:.4f}, eval PPL {r['ppl']:.3f}, "
                    f"KLD {r['kld_mean']:.4f}, same top {100 * r['same_top']:.1f}%")
                (out / f"{stem}.json").write_text(json.dumps(results, indent=1))

            T.apply(quant, {}, params)
            evaluate_row("no duplication", 0.0, {})
            for pct in args.budgets:
                budget = Budget(max_extra_flops_pct=pct)
                topo = T.select_by_sensitivity(ranking, budget, quant, "serial")
                if kind == "hybrid":
                    topo = T.resolve_hybrid(quant, {k: {**e, "type": "hybrid"} for k, e in topo.items()},
                                            objective, params)
                T.apply(quant, topo, params)
                evaluate_row(f"+{pct:g}% {len(topo)} layers, untuned", pct, topo)
                for strategy in args.strategies:
                    res = T.tune(quant, topo, objective, strategy, args.trials, params, seed=0, progress=False)
                    evaluate_row(f"+{pct:g}% {strategy}", pct, res.topology, search=res)
            T.apply(quant, {}, None)
            for c in args.control:              # the same budget spent another way: another file, no copies
                wait_for(Path(c))
                inputs[name]["controls"].append({"file": Path(c).name, "sha256": sha256(Path(c)),
                                                 "bpw": file_bpw(Path(c))})
                other = load_gguf(c).materialize()
                T.apply(other, {}, params)
                t1 = time.perf_counter()
                r = evaluate(other, windows, ref=eval_ref, progress=False)
                row = {"model": name, "setting": setting, "config": f"control: {Path(c).name}", "file": Path(c).name,
                       "bpw": file_bpw(Path(c)), "budget_pct": 0.0, "extra_layers": 0, "extra_flops_pct": 0.0,
                       "topology": {}, "params": {}, "calib_kld": objective(other),
                       "eval_seconds": time.perf_counter() - t1,
                       **{k: r[k] for k in ("ppl", "kld_mean", "kld_p99", "same_top")}}
                results.append(row)
                log(f"{name} {setting} control {Path(c).name} ({row['bpw']:.3f} bpw): calib KLD "
                    f"{row['calib_kld']:.4f}, eval PPL {r['ppl']:.3f}, KLD {r['kld_mean']:.4f}")
                del other
    write_outputs(results, out, stem, args, provenance(inputs=inputs, ranking=ranking, chunks=args.chunks,
                                                       calib_tokens=args.calib_tokens, trials=args.trials))


def wait_for(path: Path, poll: float = 30.0) -> None:
    """A control file another run is still making (e.g. benchmarks/frontier.py, which renames it into place when
    complete): wait for it rather than fail after the duplication rows."""
    if not path.exists():
        log(f"waiting for {path} (made by another run)")
    while not path.exists():
        time.sleep(poll)


def file_bpw(path: Path) -> float:
    """Bits per weight of a GGUF's tensors (bytes x 8 / elements; copies share their block's tensors)."""
    from quality import tensor_stats

    nbytes, n = tensor_stats(path)
    return 8 * nbytes / n


def sha256(path: Path) -> str:
    from quality import sha256 as cached

    return cached(path)


def write_outputs(results, out: Path, stem: str, args, prov: dict | None = None) -> None:
    lines = [f"wiki.test.raw, ctx 512, {args.chunks} chunks, twinquant runtime; KLD vs the F16 reference; "
             f"choices on {args.calib_tokens} calibration tokens, {args.trials} trials per search", "",
             "| model | setting | configuration | bpw | extra layers | extra compute | calib KLD | PPL | mean KLD | "
             "99% KLD | same top | trials | search s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        search = (f"{r['trials']} | {r['search_seconds']:.0f}" if "search_seconds" in r else " | ")
        lines.append(f"| {r['model']} | {r['setting']} | {r['config']} | {r.get('bpw', float('nan')):.3f} | "
                     f"{r['extra_layers']} | {r['extra_flops_pct']:.1f}% | {r['calib_kld']:.4f} | {r['ppl']:.3f} | "
                     f"{r['kld_mean']:.4f} | {r['kld_p99']:.3f} | {100 * r['same_top']:.1f}% | {search} |")
    if prov is not None:
        (out / f"{stem}.json").write_text(json.dumps({**prov, "rows": results}, indent=1))
    md = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(md)
    print(md)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["setting"]) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, (m, st) in zip(axes[0], groups):
        rows = [r for r in results if r["model"] == m and r["setting"] == st]
        ax.barh([r["config"] for r in rows], [r["kld_mean"] for r in rows], color="tab:red")
        ax.set_xlabel("mean KLD on wiki.test.raw (lower is better)")
        ax.set_title(f"{m}, {st}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")


if __name__ == "__main__":
    main()
