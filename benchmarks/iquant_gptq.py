"""Error feedback into llama.cpp's low-bit formats on real Hessians: output error of llama.cpp's own quantizer
(RTN with the imatrix) vs twinquant's GPTQ (column GPTQ for the K-quants, block LDLQ for the i-quants).

For the chosen blocks of a real model (calibration text through the float model, block by block, one block in
memory), every linear is quantized into every type both ways; the figure is the relative output error
e = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the block's real inputs (H = 2XᵀX/n). llama.cpp's imatrix is the mean square of
each input, i.e. diag(H)/2: the RTN rows are what `llama-quantize --imatrix` writes for these weights (the codecs
are byte-identical to it). Writes benchmarks/results/iquant_gptq_TAG.{json,md,png}.

    python benchmarks/iquant_gptq.py --model qwen2.5-coder-1.5b --layers 13 --tag qwen15
    python benchmarks/iquant_gptq.py --model qwen2.5-coder-1.5b --layers 2 13 25 --device cuda --tag qwen15-h200

Note: the packaged models are themselves Q4_K_M files; types of 4 bits and more can re-create parts of the source's
grid, the 1–3-bit types cannot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import record  # noqa: E402

TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "Q2_0", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_K"]


def rel_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    d = (W - W_hat).double()
    Hd = H.double()
    return float(torch.einsum("ij,jk,ik->", d, Hd, d) / torch.einsum("ij,jk,ik->", W.double(), Hd, W.double()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--layers", type=int, nargs="+", default=[13])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--roles", nargs="+", default=None, help="e.g. attn_v ffn_down (default: every linear)")
    ap.add_argument("--rows", type=int, default=None, help="quantize only the first ROWS rows of each tensor (rows "
                    "are independent given H: an unbiased, cheaper estimate of the relative error)")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--heldout-tokens", type=int, default=0,
                    help="also report each error on this many further tokens of the text, not used to quantize")
    ap.add_argument("--damp", type=float, nargs="+", default=None,
                    help="GPTQ damping(s) to compare (default: the `default` recipe's); a row per value")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render", help="write the table and plot of a results JSON (e.g. of a stopped run) and exit")
    args = ap.parse_args(argv)
    if args.damp is None:
        from twinquant.pipeline.recipe import BUILTIN

        args.damp = [BUILTIN["default"].damp]
    if args.render:
        return render(Path(args.render))

    from twinquant.algorithms.backends import get_quantizer
    from twinquant.calibration.blocks import block_hessians, block_pass
    from twinquant.calibration.windows import load_calibration
    from twinquant.formats import codec_for
    from twinquant.io.load import load_model
    from twinquant.model import roles
    from twinquant.model.forward import embed
    from twinquant.zoo import resolve

    dev = torch.device(args.device)
    model = load_model(args.model, device=args.device)
    calib = load_calibration(model, None, args.calib_tokens + args.heldout_tokens, 512)
    n_fit = args.calib_tokens // 512
    xs = torch.cat([embed(model, calib.windows[i: i + 1].to(dev)).float() for i in range(calib.windows.shape[0])])
    x, x_out = xs[:n_fit], (xs[n_fit:] if xs.shape[0] > n_fit else None)      # fitted / held-out windows
    from types import SimpleNamespace

    calib = SimpleNamespace(n_tokens=n_fit * 512, text_sha256=calib.text_sha256,
                            heldout_tokens=(xs.shape[0] - n_fit) * 512)
    rtn = get_quantizer("rtn")
    gptqs = {d: get_quantizer("gptq", {"damp": d}) for d in args.damp}
    model_sha = _sha(resolve(args.model))
    rows = []
    t_all = time.perf_counter()
    for layer in range(max(args.layers) + 1):
        if layer in args.layers:
            names = [n for n in roles.block_tensor_names(model.spec, layer) if n.endswith(".weight")
                     and len(roles.expected_shape(model.spec, n)) == 2
                     and (args.roles is None or any(f".{r}." in n for r in args.roles))]
            hooks = block_hessians(model, layer, x, set(names))
            hooks_out = block_hessians(model, layer, x_out, set(names)) if x_out is not None else None
            group_of = {n: g[0] for g in roles.shared_input_groups(layer) for n in g}
            for name in names:
                W = model.get(name).float()
                if args.rows:
                    W = W[: args.rows].contiguous()
                H = hooks.hessian(group_of[name]).to(dev)
                H_out = hooks_out.hessian(group_of[name]).to(dev) if hooks_out is not None else None
                imatrix = torch.diagonal(H) / 2                  # llama.cpp's imatrix: mean x² per input
                for ty in args.types:
                    codec = codec_for(ty, W.shape[1])
                    base = {"layer": layer, "tensor": name, "shape": list(W.shape), "type": ty,
                            "bpw": round(codec.bits_per_weight, 4)}
                    # llama-quantize's bytes: Q2_0's quantizer ignores the imatrix (twinquant's codec searches with it)
                    ref = _judge(W, rtn, codec, None, imatrix if getattr(codec, "libggml_imatrix", True) else None,
                                 H, H_out, dev)
                    for damp in args.damp:      # llama.cpp's row is the same for every damping: computed once
                        row = {**base, "damp": damp, **{f"llama.cpp{k}": v for k, v in ref.items()}}
                        got = _judge(W, gptqs[damp], codec, H, imatrix, H, H_out, dev)
                        row.update({f"twinquant{k}": v for k, v in got.items()})
                        row["ratio"] = row["twinquant"] / row["llama.cpp"]
                        if H_out is not None:
                            row["ratio_heldout"] = row["twinquant_heldout"] / row["llama.cpp_heldout"]
                            print(f"{name:28s} {ty:8s} damp {damp:<5g} held out: llama.cpp "
                                  f"{row['llama.cpp_heldout']:.5f}  twinquant {row['twinquant_heldout']:.5f}  "
                                  f"ratio {row['ratio_heldout']:.3f}", flush=True)
                        rows.append(row)
                        write(args, rows, calib, model_sha, time.perf_counter() - t_all)
                        print(f"{name:28s} {ty:8s} damp {damp:<5g} llama.cpp {row['llama.cpp']:.5f}  twinquant "
                              f"{row['twinquant']:.5f}  ratio {row['ratio']:.3f}  ({row['llama.cpp_seconds']} s / "
                              f"{row['twinquant_seconds']} s)", flush=True)
        x = block_pass(model, layer, x)
        if x_out is not None:
            x_out = block_pass(model, layer, x_out)
        model.release_block(layer)

    write(args, rows, calib, model_sha, time.perf_counter() - t_all, final=True)
    return 0


def _judge(W, q, codec, H, imatrix, H_fit, H_out, dev) -> dict:
    """W quantized by `q` (with Hessian H, or none): its error on the fitted inputs (H_fit), on held-out ones
    (H_out, if any), seconds."""
    from twinquant.algorithms.backends import quantize_to_format

    t0 = time.perf_counter()
    _, W_hat = quantize_to_format(q, W, codec, H=H, importance=imatrix)
    out = {"": rel_error(W, W_hat.to(dev), H_fit)}
    if H_out is not None:     # the same weights judged on inputs they were not fitted to
        out["_heldout"] = rel_error(W, W_hat.to(dev), H_out)
    out["_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def render(path: Path) -> int:
    """Table and plot of a results JSON as it stands (a run stopped before its end keeps complete = false)."""
    from types import SimpleNamespace

    res = json.loads(path.read_text())
    done_layers = sorted({r["layer"] for r in res["rows"]})
    args = SimpleNamespace(types=list(dict.fromkeys(r["type"] for r in res["rows"])), tag=res["tag"],
                           model=res["model"], layers=res["layers"], roles=res["roles"], rows=res["rows_per_tensor"],
                           out=str(path.parent))
    calib = SimpleNamespace(n_tokens=res["calib_tokens"], text_sha256=res["calibration_sha256"],
                            heldout_tokens=res.get("heldout_tokens", 0))
    write(args, res["rows"], calib, res["source_sha256"], res["seconds"], final=True, complete=res["complete"],
          provenance={k: res[k] for k in ("command", "commit", "versions", "machine")},
          note=None if res["complete"] else f"stopped before its end: tensors of blocks {done_layers} measured "
                                            f"({len(res['rows'])} rows)")
    return 0


def write(args, rows, calib, model_sha, seconds, final=False, complete=None, provenance=None, note=None):
    """The results so far: JSON, markdown (and the plot when final)."""
    import statistics

    summary = {}
    damps = list(dict.fromkeys(v.get("damp") for v in rows))      # None: a file from before --damp
    for ty, damp in ((t, d) for t in args.types for d in damps):
        r = [v for v in rows if v["type"] == ty and v.get("damp") == damp]
        if not r:
            continue
        key = ty if len(damps) == 1 else f"{ty} damp {damp:g}"
        summary[key] = {"bpw": r[0]["bpw"], "n": len(r), "type": ty, "damp": damp,
                       "llama.cpp_mean": statistics.fmean(v["llama.cpp"] for v in r),
                       "twinquant_mean": statistics.fmean(v["twinquant"] for v in r),
                       "ratio_median": statistics.median(v["ratio"] for v in r),
                       "ratio_worst": max(v["ratio"] for v in r),
                       "llama.cpp_seconds": round(sum(v["llama.cpp_seconds"] for v in r), 1),
                       "twinquant_seconds": round(sum(v["twinquant_seconds"] for v in r), 1)}
        if all("ratio_heldout" in v for v in r):
            summary[key].update({"llama.cpp_heldout_mean": statistics.fmean(v["llama.cpp_heldout"] for v in r),
                                "twinquant_heldout_mean": statistics.fmean(v["twinquant_heldout"] for v in r),
                                "ratio_heldout_median": statistics.median(v["ratio_heldout"] for v in r)})
    fields = dict(benchmark="iquant_gptq", tag=args.tag, model=args.model, source_sha256=model_sha,
                  layers=args.layers, roles=args.roles, rows_per_tensor=args.rows, calib_tokens=calib.n_tokens,
                  heldout_tokens=getattr(calib, "heldout_tokens", 0), calibration_sha256=calib.text_sha256,
                  seconds=round(seconds, 1),
                  complete=final if complete is None else complete, note=note, summary=summary, rows=rows)
    res = {**provenance, **fields} if provenance else record(**fields)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"iquant_gptq_{args.tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# llama.cpp's quantizer vs twinquant's GPTQ: relative output error on real Hessians ({args.model})",
             "", f"command: `{res['command']}`  ", f"commit: {res['commit']}  ",
             f"blocks {args.layers}, roles {args.roles or 'all'}, first {args.rows or 'all'} rows of each tensor"
             f"{'' if final else ' (INCOMPLETE: written while running)'}{'; ' + note if note else ''}; "
             f"{calib.n_tokens} calibration tokens; "
             f"e = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ); llama.cpp = its own quantizer with imatrix = diag(H)/2 "
             f"(byte-identical codecs); twinquant = GPTQ (K-quants) / block LDLQ (i-quants) with the same "
             f"importance", "",
             "| type | bpw | tensors | llama.cpp mean e | twinquant mean e | median ratio | worst ratio | seconds (llama.cpp / twinquant) |",
             "|---|---|---|---|---|---|---|---|"]
    for ty, v in summary.items():
        lines.append(f"| {ty} | {v['bpw']:.4f} | {v['n']} | {v['llama.cpp_mean']:.5f} | {v['twinquant_mean']:.5f} "
                     f"| {v['ratio_median']:.3f} | {v['ratio_worst']:.3f} | {v['llama.cpp_seconds']} / "
                     f"{v['twinquant_seconds']} |")
    held = {ty: v for ty, v in summary.items() if "ratio_heldout_median" in v}
    if held:
        lines += ["", f"Held out: the same quantized weights judged on {getattr(calib, 'heldout_tokens', 0)} further "
                  "tokens of the text (not used to quantize)", "",
                  "| type | llama.cpp mean e (held out) | twinquant mean e (held out) | median ratio (held out) |",
                  "|---|---|---|---|"]
        lines += [f"| {ty} | {v['llama.cpp_heldout_mean']:.5f} | {v['twinquant_heldout_mean']:.5f} | "
                  f"{v['ratio_heldout_median']:.3f} |" for ty, v in held.items()]
    text = "\n".join(lines) + "\n"
    (out / f"iquant_gptq_{args.tag}.md").write_text(text)
    if final:
        _plot(summary, out / f"iquant_gptq_{args.tag}.png", args.model)
        print(text)

def _sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


def _plot(summary: dict, path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    damps = list(dict.fromkeys(v.get("damp") for v in summary.values()))
    held = all("twinquant_heldout_mean" in v for v in summary.values())
    suffix = "_heldout_mean" if held else "_mean"     # the figure that says whether the fit carries to new text
    lines = [("llama.cpp (imatrix)", "llama.cpp" + suffix, "o", damps[0])]
    lines += [("twinquant GPTQ / block LDLQ" + (f", damp {d:g}" if d is not None else ""), "twinquant" + suffix,
               "s", d) for d in damps]
    for label, key, m, damp in lines:
        pts = sorted((v["bpw"], v[key], v.get("type", k)) for k, v in summary.items() if v.get("damp") == damp)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], m + "-", label=label)
        if m == "o":
            for b, e, ty in pts:
                ax.annotate(ty, (b, e), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (type)")
    ax.set_ylabel("mean relative output error" + (" (held-out tokens)" if held else ""))
    ax.set_title(f"{model}: output error by type")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
