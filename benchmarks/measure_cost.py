"""Does the Fisher cost rank and scale like the measured KL? Both from one measurement of a real model.

Runs `measure --cost anchor` (a KL forward per tensor for its cheapest type; the embedding and the head measured
exactly for every type), which records every candidate's Fisher estimate beside it, and compares the two where the
KL was really measured: per candidate type, the rank correlation across tensors (what the allocation trades) and
the ratio fisher / KL (median and spread); per role, the median ratio. Also times the Fisher pass alone (the whole
cost of `--cost fisher` beyond the quantizations both modes share) against the anchor run's wall time.
Writes benchmarks/results/measure_cost_TAG.{json,md}.

    python benchmarks/measure_cost.py --model smollm2-135m --tag smol
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

from provenance import record  # noqa: E402


def _rank(v):
    return np.argsort(np.argsort(v))


def compare(meas: dict) -> dict:
    """Fisher vs measured KL over every candidate that has a measured `kld`."""
    per_type: dict[str, list[tuple[float, float]]] = {}
    per_role: dict[str, list[float]] = {}
    for name, t in meas["tensors"].items():
        role = re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")
        for ty, c in t["candidates"].items():
            if "kld" in c and c["kld"] > 0:
                per_type.setdefault(ty, []).append((c["fisher"], c["kld"]))
                per_role.setdefault(role, []).append(c["fisher"] / c["kld"])
    types = {}
    for ty, pairs in per_type.items():
        f, k = np.array(pairs).T
        r = f / k
        types[ty] = {"n": len(pairs), "rank_correlation": round(float(np.corrcoef(_rank(f), _rank(k))[0, 1]), 3)
                     if len(pairs) > 2 else None, "ratio_median": round(float(np.median(r)), 3),
                     "ratio_p10": round(float(np.quantile(r, 0.1)), 3), "ratio_p90": round(float(np.quantile(r, 0.9)), 3)}
    roles = {k: {"n": len(v), "ratio_median": round(float(np.median(v)), 3)} for k, v in sorted(per_role.items())}
    return {"per_type": types, "per_role": roles}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "twinquant" / "measure_cost"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import twinquant
    from twinquant.allocation.fisher import output_fisher
    from twinquant.model import roles
    from twinquant.pipeline import Options
    from twinquant.pipeline.run import Session, _recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    mpath = work / f"{args.tag}.anchor.json"
    t0 = time.perf_counter()
    meas = twinquant.measure(args.model, mpath, args.recipe, Options(cost="anchor"))
    anchor_wall = time.perf_counter() - t0

    # the Fisher pass alone, on the same prepared model and KL windows
    sess = Session(args.model, _recipe(args.recipe), Options(quiet=True))
    kw = sess.calibration().windows[: meas.header["kld_windows"]]
    names = {n for n in roles.all_tensor_names(sess.model.spec) if n in meas.tensors}
    t0 = time.perf_counter()
    output_fisher(sess.model, kw, names, stream=True, progress=False)
    fisher_wall = time.perf_counter() - t0

    res = record(benchmark="measure_cost", tag=args.tag, model=args.model, recipe=args.recipe,
                 measurement_sha256=meas.sha256(), header=meas.header, anchor_measure_seconds=round(anchor_wall, 1),
                 measurement_seconds_total=round(meas.seconds, 1), fisher_pass_seconds=round(fisher_wall, 1),
                 **compare(meas.to_dict()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"measure_cost_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Fisher cost vs measured KL: {args.model}, recipe {args.recipe}", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ",
             f"anchor measurement {meas.seconds:.0f} s (this run {anchor_wall:.0f} s); the Fisher pass alone "
             f"{fisher_wall:.0f} s", "",
             "| type | candidates with measured KL | rank correlation | fisher/KL median | p10 | p90 |",
             "|---|---|---|---|---|---|"]
    for ty, v in res["per_type"].items():
        lines.append(f"| {ty} | {v['n']} | {v['rank_correlation']} | {v['ratio_median']} | {v['ratio_p10']} "
                     f"| {v['ratio_p90']} |")
    lines += ["", "| role | n | fisher/KL median |", "|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['ratio_median']} |" for k, v in res["per_role"].items()]
    text = "\n".join(lines) + "\n"
    (out / f"measure_cost_{args.tag}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
