"""Outliers before and after rotation: per-layer max/RMS ratio and kurtosis of the linear inputs that R1 rotates
(the norm-fused inputs of attn_q and ffn_gate), on calibration text, for no rotation, RH and RO.

    python benchmarks/rotation_outliers.py [--models smollm2-135m qwen2.5-coder-0.5b] [--windows 4]

Prints a table per model (every few layers + the mean), writes benchmarks/results/rotation_outliers.{json,png}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from twinquant.calibration.windows import load_calibration
from twinquant.io.load import load_model
from twinquant.model import roles
from twinquant.model.forward import LinearInputs, forward
from twinquant.rotation.rotate import fuse_norms, rotate

ROOT = Path(__file__).resolve().parent.parent


def layer_stats(model, windows) -> list[dict]:
    """Per layer: max|x|/rms and kurtosis over the inputs of attn_q and ffn_gate."""
    T = roles.T
    names = {roles.name(t, i): i for i in range(model.spec.n_layers) for t in (T.ATTN_Q, T.FFN_GATE)}
    acc: dict[int, list[torch.Tensor]] = {}
    for w in range(windows.shape[0]):
        hook = LinearInputs(set(names))
        forward(model, windows[w: w + 1], hook=hook, logits_for=slice(0, 0))
        for n, xs in hook.inputs.items():
            acc.setdefault(names[n], []).extend(xs)
    out = []
    for i in sorted(acc):
        x = torch.cat(acc[i]).double()
        rms = x.pow(2).mean().sqrt()
        z = (x - x.mean()) / x.std()
        out.append({"layer": i, "max_over_rms": float(x.abs().max() / rms), "kurtosis": float(z.pow(4).mean())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--ro-iters", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    results = {}
    for name in args.models:
        res = {}
        for kind in ("none", "rh", "ro"):
            model = load_model(name, materialize=True).to(dtype=torch.float64)
            calib = load_calibration(model, None, args.windows * args.ctx, args.ctx)
            if kind == "none":
                fuse_norms(model)
            else:
                rotate(model, kind, seed=0, r2=False, calib_windows=calib.windows, ro_iters=args.ro_iters)
            res[kind] = layer_stats(model.to(dtype=torch.float32), calib.windows)
            print(f"{name}: {kind} done", flush=True)
        results[name] = res
        n = len(res["none"])
        show = sorted(set(list(range(0, n, max(1, n // 6))) + [n - 1]))
        print(f"\n{name}: linear inputs of attn_q / ffn_gate, {args.windows} x {args.ctx} calibration tokens")
        print(f"{'layer':>6} | {'max/rms none':>12} {'RH':>8} {'RO':>8} | {'kurt none':>10} {'RH':>8} {'RO':>8}")
        for i in show + ["mean"]:
            if i == "mean":
                row = {k: {m: sum(r[m] for r in v) / n for m in ("max_over_rms", "kurtosis")} for k, v in res.items()}
            else:
                row = {k: v[i] for k, v in res.items()}
            print(f"{i:>6} | {row['none']['max_over_rms']:>12.1f} {row['rh']['max_over_rms']:>8.1f} "
                  f"{row['ro']['max_over_rms']:>8.1f} | {row['none']['kurtosis']:>10.1f} {row['rh']['kurtosis']:>8.2f} "
                  f"{row['ro']['kurtosis']:>8.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rotation_outliers.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.2 * len(results)), squeeze=False)
    for row, (name, res) in zip(axes, results.items()):
        for ax, metric in zip(row, ("max_over_rms", "kurtosis")):
            for kind, rs in res.items():
                ax.semilogy([r["layer"] for r in rs], [r[metric] for r in rs], label=kind)
            ax.set_title(f"{name}: {metric}")
            ax.set_xlabel("layer")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rotation_outliers.png", dpi=110)
    print(f"wrote {out / 'rotation_outliers.json'} and {out / 'rotation_outliers.png'}")


if __name__ == "__main__":
    main()
