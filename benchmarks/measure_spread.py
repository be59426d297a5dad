"""How far two measurements of one model agree when they price on disjoint text: the spread of repeated measurements.

Runs `twinquant measure` twice with everything the same but the held-out windows that price the candidates: the
first `--kld-windows` after the Hessians' windows, then the next ones (`--kld-skip`). Compares every (tensor, type)
price: the ratio b/a (median, 10th and 90th percentiles, share within ±20 %), rank correlations (all prices; within
each type, where the allocation's choices live), and what the disagreement costs: at a few targets the allocation
made from one measurement, priced by the other, against the allocation the other makes itself (the "regret").

    python benchmarks/measure_spread.py --model smollm2-135m --tag smol-fisher --cost fisher
    python benchmarks/measure_spread.py --model qwen2.5-coder-1.5b --tag qwen15 --cost fisher --sample-rows 32 \
        --candidates all --targets 2.6 3.0 3.4

Writes benchmarks/results/measure_spread_TAG.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import git_commit, machine, versions  # noqa: E402


def _measure(model: str, out: Path, skip: int, args) -> tuple[Path, float]:
    if out.exists():
        return out, json.loads(out.read_text()).get("seconds", 0.0)
    cmd = [sys.executable, "-m", "twinquant", "measure", model, "-o", str(out), "--cost", args.cost, "-q",
           "--kld-windows", str(args.kld_windows), "--candidates", args.candidates]
    cmd += ["--kld-skip", str(skip)] if skip else []
    cmd += ["--sample-rows", str(args.sample_rows)] if args.sample_rows else []
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return out, time.perf_counter() - t


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):                         # ties share their mean rank
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den if den else None


def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def compare(a, b, targets: list[float]) -> dict:
    """Price statistics of measurements a, b (twinquant Measurement objects) and the regret of each one's
    allocation priced by the other at `targets` (bits per weight of the quantized tensors' data)."""
    from twinquant.allocation.solve import solve

    pa, pb, by_type = [], [], {}
    for name, t in a.tensors.items():
        for ty, c in t["candidates"].items():
            x, y = c["cost"], b.tensors[name]["candidates"][ty]["cost"]
            pa.append(x)
            pb.append(y)
            by_type.setdefault(ty, ([], []))
            by_type[ty][0].append(x)
            by_type[ty][1].append(y)
    ratios = [y / x for x, y in zip(pa, pb) if x > 0]
    out = {"prices": len(pa), "ratio_median": _quantile(ratios, 0.5), "ratio_p10": _quantile(ratios, 0.1),
           "ratio_p90": _quantile(ratios, 0.9),
           "within_20pct": sum(0.8 <= r <= 1.25 for r in ratios) / len(ratios),
           "spearman_all": spearman(pa, pb),
           "spearman_within_type": {ty: spearman(*v) for ty, v in by_type.items()}}
    weights = sum(math.prod(t["shape"]) for t in a.tensors.values())
    rows = []
    for bpw in targets:
        budget = int(bpw * weights / 8)
        alloc = {}
        for label, m in (("a", a), ("b", b)):
            try:
                alloc[label] = solve(m.groups(), budget).choice
            except Exception as e:  # noqa: BLE001  (a target below the smallest allocation)
                alloc[label] = e
        if any(isinstance(v, Exception) for v in alloc.values()):
            rows.append({"bpw": bpw, "error": str(next(v for v in alloc.values() if isinstance(v, Exception)))})
            continue

        def priced(choice, m):
            return sum(m.tensors[n]["candidates"][c.type]["cost"] for n, c in choice.items())

        same = sum(alloc["a"][n].type == alloc["b"][n].type for n in alloc["a"])
        rows.append({"bpw": bpw, "tensors_same_type": same, "tensors": len(alloc["a"]),
                     "a_by_a": priced(alloc["a"], a), "b_by_a": priced(alloc["b"], a),
                     "b_by_b": priced(alloc["b"], b), "a_by_b": priced(alloc["a"], b)})
        r = rows[-1]
        r["regret_a_on_b"] = r["a_by_b"] / r["b_by_b"] - 1 if r["b_by_b"] > 0 else None
        r["regret_b_on_a"] = r["b_by_a"] / r["a_by_a"] - 1 if r["a_by_a"] > 0 else None
    out["allocations"] = rows
    return out


def _table(res: dict) -> str:
    c = res["comparison"]
    lines = [f"# Spread of repeated measurements: {res['model']} ({res['cost']} cost)", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}  ",
             f"measurements: windows {res['windows'][0]} and {res['windows'][1]} after the Hessians' "
             f"(`--kld-windows {res['kld_windows']}`, second one `--kld-skip {res['kld_windows']}`); "
             f"{res['seconds'][0]:.0f} s and {res['seconds'][1]:.0f} s", "",
             "| prices | ratio b/a median | p10 | p90 | within ±20 % | rank correlation (all) |",
             "|---|---|---|---|---|---|",
             f"| {c['prices']} | {c['ratio_median']:.3f} | {c['ratio_p10']:.3f} | {c['ratio_p90']:.3f} | "
             f"{100 * c['within_20pct']:.1f}% | {c['spearman_all']:.4f} |", "",
             "| type | rank correlation of its prices across tensors |", "|---|---|"]
    lines += [f"| {t} | {'' if v is None else f'{v:.4f}'} |" for t, v in c["spearman_within_type"].items()]
    lines += ["", "| target bpw | tensors of the same type | a's choice priced by b / b's own | b's choice priced by "
              "a / a's own |", "|---|---|---|---|"]
    for r in c["allocations"]:
        if "error" in r:
            lines.append(f"| {r['bpw']} | {r['error'][:80]} | | |")
            continue
        lines.append(f"| {r['bpw']} | {r['tensors_same_type']} of {r['tensors']} | "
                     f"{1 + r['regret_a_on_b']:.4f} | {1 + r['regret_b_on_a']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(a, b, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [], []
    for name, t in a.tensors.items():
        for ty, c in t["candidates"].items():
            y = b.tensors[name]["candidates"][ty]["cost"]
            if c["cost"] > 0 and y > 0:
                xs.append(c["cost"])
                ys.append(y)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.loglog(xs, ys, ".", ms=3, alpha=0.6)
    lo, hi = min(xs + ys), max(xs + ys)
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    ax.set_xlabel("price on held-out windows a")
    ax.set_ylabel("price on held-out windows b")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--cost", choices=["fisher", "anchor", "exact"], default="fisher")
    ap.add_argument("--kld-windows", type=int, default=4)
    ap.add_argument("--sample-rows", type=int)
    ap.add_argument("--candidates", choices=["all", "k"], default="all")
    ap.add_argument("--targets", type=float, nargs="*", default=[])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "twinquant" / "measure_spread"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    from twinquant.allocation.measure import Measurement

    work = Path(args.work) / args.tag
    work.mkdir(parents=True, exist_ok=True)
    k = args.kld_windows
    (pa, sa), (pb, sb) = _measure(args.model, work / "a.json", 0, args), _measure(args.model, work / "b.json", k, args)
    a, b = Measurement.load(pa), Measurement.load(pb)
    res = {"benchmark": "measure_spread", "tag": args.tag, "command": "python " + " ".join(sys.argv),
           "commit": git_commit(), "versions": versions(), "machine": machine(), "model": args.model,
           "source_identity": a.header.get("source"), "cost": args.cost, "kld_windows": k,
           "sample_rows": args.sample_rows, "candidates": args.candidates,
           "windows": [f"0..{k - 1}", f"{k}..{2 * k - 1}"], "seconds": [round(sa, 1), round(sb, 1)],
           "measurement_sha256": [a.sha256(), b.sha256()], "comparison": compare(a, b, args.targets)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"measure_spread_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    table = _table(res)
    (out / f"measure_spread_{args.tag}.md").write_text(table)
    _plot(a, b, out / f"measure_spread_{args.tag}.png", f"{args.model}: prices on two disjoint window sets")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
