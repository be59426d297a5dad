"""Decode speed on a GPU: twinquant's runtime with packed K-quant weights (Triton GEMV) against the same runtime on
dequantized bfloat16 weights and against llama.cpp's CUDA backend, on the same file; with `--roofline`, how well
`twinquant roofline` predicts llama.cpp CUDA decode on this GPU.

No model file travels to the GPU machine: `synthetic_file` writes a GGUF with a real model's shapes (default
Qwen2.5-1.5B: hidden 1536, ffn 8960, 12/2 heads, vocab 151936, 28 layers) in a llama-quantize mix (every matrix
8 random rows quantized by twinquant's codecs, repeated; decode speed does not depend on the values).

Timed: tokens/s of generating --tokens tokens after an 8-token prompt (the first 4 not counted), greedy, batch 1,
KV cache on; llama.cpp: `llama-bench -p 0 -n TOKENS -ngl 99` (mean of 3). Writes
benchmarks/results/decode_gpu_TAG.{json,md}.

`--roofline` (llama.cpp only): the fixed costs per token and per block from 256-wide models of 4 and 28 blocks, each
type's efficiency from files of that type alone at the 1.5B / 7B / 32B widths, then whole 1.5B / 7B / 32B files in
llama-quantize's mixes predicted with those figures and measured (`--refit` redoes the fit from a results file).

    python benchmarks/decode_gpu.py --tag h200 --llama-bench BUILD/bin/llama-bench
    python benchmarks/decode_gpu.py --tag h100-kernels --variants twinquant_packed_graph \
        --settings TWINQUANT_WORDS=Q2_K,Q3_K,Q6_K 'TWINQUANT_WORDS=Q3_K,Q6_K TWINQUANT_Q8=Q2_K' --llama-bench ...
    python benchmarks/decode_gpu.py --tag h100-roofline --roofline --llama-bench BUILD/bin/llama-bench
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from provenance import plot_option, plotted, record, results_stem, write_results  # noqa: E402

SHAPES = {"qwen2.5-1.5b": dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936),
          "qwen2.5-7b": dict(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064),
          "qwen2.5-32b": dict(layers=64, hidden=5120, ffn=27648, heads=40, kv_heads=8, vocab=152064),
          "tiny": dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1024)}     # a smoke run
# `--roofline`: fixed costs from 256-wide models of 4 and 28 blocks (their bytes are negligible); each type's
# efficiency from files of that type alone with the 1.5B, 7B and 32B widths (8, 8 and 4 blocks); then whole files
# in llama-quantize's mixes, predicted with those figures and measured
FIXED = [("tiny", 4, "pure:Q4_K"), ("tiny", 28, "pure:Q4_K")]
PURE_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
PURE = [(shape, n, f"pure:{t}") for shape, n in (("qwen2.5-1.5b", 8), ("qwen2.5-7b", 8), ("qwen2.5-32b", 4))
        for t in PURE_TYPES]
WHOLE = ([("qwen2.5-1.5b", None, f"llama.cpp:{m}") for m in ("Q2_K", "Q3_K_M", "Q4_K_M")]
         + [("qwen2.5-7b", None, f"llama.cpp:{m}") for m in ("Q2_K", "Q3_K_M", "Q4_K_M")]
         + [("qwen2.5-32b", None, "llama.cpp:Q2_K")])
WARM = 4
# twinquant's decode runs: (key, packed K-quant weights, one CUDA graph per step)
VARIANTS = (("twinquant_packed_graph", True, True), ("twinquant_packed", True, False),
            ("twinquant_bf16_graph", False, True), ("twinquant_bf16", False, False))
LABELS = {"twinquant_packed_graph": "twinquant, packed GGML bytes (Triton), CUDA graph",
          "twinquant_packed": "twinquant, packed GGML bytes (Triton), no graph",
          "twinquant_bf16_graph": "twinquant, bfloat16 weights, CUDA graph",
          "twinquant_bf16": "twinquant, bfloat16 weights, no graph"}


def hf_config(shape: str, layers: int | None = None) -> dict:
    d = SHAPES[shape]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": d["hidden"],
            "intermediate_size": d["ffn"], "num_attention_heads": d["heads"], "num_key_value_heads": d["kv_heads"],
            "num_hidden_layers": layers or d["layers"], "vocab_size": d["vocab"], "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"}


def file_types(spec, mix: str) -> dict[str, str]:
    """name -> GGML type: llama-quantize's mix ("llama.cpp:Q4_K_M", without an imatrix) or one type for every
    matrix ("pure:Q4_K", llama-quantize --pure)."""
    from twinquant.allocation.mixes import type_name
    from twinquant.allocation.role_mix import assign
    from twinquant.model import roles
    from twinquant.runtime.roofline import mix_types

    if not mix.startswith("pure:"):
        return mix_types(spec, mix, imatrix=False)
    names = roles.all_tensor_names(spec)
    return {c.name: type_name(c.type) for c in assign(spec, names, mix=None, default=mix[5:], pure=True)}


@functools.cache
def _packed_rows(ggml_type: str, cols: int) -> "np.ndarray":
    """8 random rows (std 0.02) quantized by the codec (llama.cpp's bytes): the pattern a synthetic tensor repeats."""
    from twinquant.formats.ggml import get_codec

    codec = get_codec(ggml_type)
    w = torch.randn(8, cols, generator=torch.Generator().manual_seed(cols)) * 0.02
    if hasattr(codec, "quantize_bytes"):       # a flat importance: the i-quants need one, values do not matter
        return np.asarray(codec.quantize_bytes(w, torch.ones(cols) if ggml_type.startswith("IQ") else None))
    return np.asarray(codec.pack(*codec.quantize(w)))


def synthetic_file(work: Path, shape: str, mix: str, layers: int | None = None) -> Path:
    """A GGUF of a real model's shapes in a mix, its matrices filled with 8 quantized random rows repeated (decode
    speed does not depend on the values; no float model is written or quantized), through twinquant's writer (a
    small BPE tokenizer padded to the vocabulary)."""
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.hf import spec_from_hf_config
    from twinquant.io.tokenizer import Tokenizer
    from twinquant.model import roles
    from twinquant.model.model import Model, QuantizedWeight

    out = work / f"{shape}-{layers or SHAPES[shape]['layers']}-{mix.replace(':', '_')}.gguf"
    if out.is_file():
        return out
    tok_dir = work / f"tokenizer-{SHAPES[shape]['vocab']}"       # padded to the vocabulary by config.json
    if not (tok_dir / "tokenizer.json").is_file():
        from tests.tiny_models import save_tiny_tokenizer

        tok_dir.mkdir(parents=True, exist_ok=True)
        save_tiny_tokenizer(tok_dir, 512)
        (tok_dir / "config.json").write_text(json.dumps({"vocab_size": SHAPES[shape]["vocab"]}))
    spec = spec_from_hf_config(hf_config(shape, layers))
    types = file_types(spec, mix)
    model = Model(spec, tokenizer=Tokenizer.from_hf_dir(tok_dir))
    for name in roles.all_tensor_names(spec):
        shp = roles.expected_shape(spec, name)
        if len(shp) == 1 or types[name] in ("F32", "F16", "BF16"):
            model.tensors[name] = (torch.ones(shp) if name.endswith("norm.weight") else
                                   torch.randn(shp, generator=torch.Generator().manual_seed(len(name))) * 0.02)
            continue
        rows = _packed_rows(types[name], shp[-1])
        data = np.tile(rows, (-(-shp[0] // 8), 1))[: shp[0]]
        model.quantized[name] = QuantizedWeight(gguf.GGMLQuantizationType[types[name]], data)
    return write_gguf(model, out)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def twinquant_decode(path: Path, tokens: int, packed: bool, device: str, graphs: bool = False) -> dict:
    from twinquant.model.forward import KVCache, forward
    from twinquant.runtime.graph_decode import GraphStep
    from twinquant.runtime.packed_weights import load_for_decode

    # what `twinquant run --device cuda --iq-kernels` does (packed, graphs), or with --no-graphs, or --dtype bf16
    # --no-kernels
    model, counts = load_for_decode(path, torch.float32 if packed else torch.bfloat16, device, kernels=packed,
                                    iquants=packed)
    _sync(device)
    mem = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
    cache = KVCache.empty(model, 1, 8 + tokens + 1)
    tok = torch.arange(8)[None] + 100
    with torch.inference_mode():
        logits = forward(model, tok, cache=cache, logits_for=slice(-1, None))
        step = GraphStep(model, cache) if graphs else None
        times = []
        for i in range(tokens):
            nxt = logits[0, -1].argmax().view(1, 1)
            _sync(device)
            t0 = time.perf_counter()
            if step is not None:
                logits = step(int(nxt))[None, None]
            else:
                logits = forward(model, nxt, cache=cache, logits_for=slice(-1, None))
            _sync(device)
            if i >= WARM:
                times.append(time.perf_counter() - t0)
    del model, cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"tokens_per_s": len(times) / sum(times), "gpu_memory_gib": mem and round(mem, 2),
            "packed": dict(counts), "graphs": graphs,
            "weights": "packed K-quant bytes (Triton GEMV)" if packed else "bfloat16 (cuBLAS)"}


def llama_bench(binary: str, path: Path, tokens: int) -> dict:
    cmd = [binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-ngl", "99", "-r", "3", "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode:
        return {"error": (p.stderr or p.stdout)[-800:], "command": " ".join(cmd)}
    r = json.loads(p.stdout)[0]
    return {"tokens_per_s": r["avg_ts"], "stddev": r.get("stddev_ts"), "command": " ".join(cmd),
            "build_commit": r.get("build_commit"), "gpu": r.get("gpu_info")}


def roofline_measure(a, work: Path, groups=("fixed", "efficiency", "validation"), partial: Path | None = None) -> dict:
    """llama.cpp CUDA decode of the FIXED, PURE and WHOLE files on this GPU: bytes each reads per token by type,
    its blocks and width, the measured seconds per token (`--roofline`; `roofline_fit` turns them into figures;
    `--validate` measures the WHOLE files alone and checks the shipped table with `roofline_check`)."""
    from twinquant.io.load import load_model
    from twinquant.runtime import roofline as rf

    gpu = torch.cuda.get_device_name(0)
    name = next((k for k in ("h100", "h200") if k.upper() in gpu), None)
    if name is None:
        raise SystemExit(f"decode_gpu: no roofline entry (vendor bandwidth) for {gpu}")
    bw = rf.DEVICES[name].bandwidth
    rows = []
    for group, files in (("fixed", FIXED), ("efficiency", PURE), ("validation", WHOLE)):
        if group not in groups:
            continue
        for shape, layers, mix in files:
            path = synthetic_file(work, shape, mix, layers)
            m = load_model(path, load_tokenizer=False)
            tb = rf.file_token_bytes(m, rf.ANCHOR_CTX)           # tg128 from an empty context: mean context 64
            ll = llama_bench(a.llama_bench, path, a.tokens)
            rows.append({"kind": group, "shape": shape, "blocks": tb.blocks, "hidden": tb.hidden, "mix": mix,
                         "file_bytes": path.stat().st_size, "bytes_per_token": tb.total,
                         "weights_by_type": tb.weights, "kv_bytes": tb.kv, "llamacpp": ll,
                         "measured_s": 1 / ll["tokens_per_s"] if "tokens_per_s" in ll else None})
            print(group, shape, tb.blocks, mix, f"{tb.total / 1e6:.0f} MB", ll.get("tokens_per_s", ll), flush=True)
            if partial is not None:                               # what a run cut short still leaves
                partial.write_text(json.dumps({"gpu": gpu, "device": name, "bandwidth_gbs": bw, "rows": rows}))
            if shape != "tiny":
                path.unlink()                                     # the disk holds one large file at a time
    return {"gpu": gpu, "device": name, "bandwidth_gbs": bw, "rows": rows}


def _token_bytes(r: dict):
    from twinquant.runtime import roofline as rf

    return rf.TokenBytes(weights=r["weights_by_type"], kv=r["kv_bytes"], blocks=r["blocks"], ctx=rf.ANCHOR_CTX,
                         hidden=r["hidden"])


def roofline_check(meas: dict) -> list[dict]:
    """The validation files predicted by the runtime's own table entry for this GPU (`twinquant roofline --device
    h100|h200`), beside what llama.cpp measured: the shipped figures checked, nothing refitted."""
    from twinquant.runtime import roofline as rf

    dev = rf.DEVICES[meas["device"]]
    out = []
    for r in meas["rows"]:
        if r["kind"] == "validation":
            pred = 1 / rf.predict(_token_bytes(r), dev).expected_tps
            out.append({"shape": r["shape"], "mix": r["mix"], "blocks": r["blocks"],
                        "bytes_per_token": r["bytes_per_token"], "measured_s": r["measured_s"], "predicted_s": pred,
                        "measured_over_predicted": r["measured_s"] / pred if r["measured_s"] else None})
    return out


def check_markdown(res: dict) -> str:
    meas = res["measurements"]
    lines = [f"# decode_gpu {res['tag']}: the shipped `twinquant roofline --device {meas['device']}` checked on "
             f"{meas['gpu']}", "", f"command: `{res['command']}`  ", f"commit: {res['commit']}  ",
             f"machine: {res['machine']}  ",
             f"llama.cpp CUDA (llama-bench, tg{res['tokens']}, mean of 3), synthetic files of real shapes; predicted "
             f"with the runtime's table entry `{meas['device']}` ({meas['bandwidth_gbs']:.0f} GB/s), not refitted", "",
             "| file | blocks | MB read / token | measured ms / token | predicted ms / token | measured ÷ predicted |",
             "|---|---|---|---|---|---|"]
    for c in res["checks"]:
        ms = f"{1e3 * c['measured_s']:.3f}" if c["measured_s"] else "failed"
        ratio = f"{c['measured_over_predicted']:.3f}" if c["measured_over_predicted"] else "-"
        lines.append(f"| {c['shape']} {c['mix']} | {c['blocks']} | {c['bytes_per_token'] / 1e6:.1f} | {ms} | "
                     f"{1e3 * c['predicted_s']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def roofline_fit(meas: dict) -> dict:
    """Fixed costs (the two tiny files: per token + per block), each type's efficiency per width (its pure files:
    bytes / (bandwidth × (time − fixed costs))), then every validation file predicted two ways: with the 7B width's
    efficiencies for every model (`flat`) and interpolated by the model's width (`by_hidden`)."""
    from twinquant.runtime import roofline as rf

    bw, rows = meas["bandwidth_gbs"], meas["rows"]
    (s0, n0), (s1, n1) = ((r["measured_s"], r["blocks"]) for r in rows if r["kind"] == "fixed")
    per_block = (s1 - s0) / (n1 - n0)
    per_token = s0 - n0 * per_block
    by_hidden: dict[str, list] = {}
    for r in rows:
        if r["kind"] == "efficiency" and r["measured_s"]:
            t = r["mix"][5:]
            left = r["measured_s"] - per_token - r["blocks"] * per_block
            by_hidden.setdefault(t, []).append((r["hidden"], r["weights_by_type"][t] / (bw * rf.GB * left)))
    by_hidden = {t: tuple(sorted(v)) for t, v in by_hidden.items()}
    dev = rf.cuda_device("this-gpu", meas["gpu"], bw, "this run", (per_token, per_block), by_hidden)
    devs = {"flat": dataclasses.replace(dev, by_hidden={}), "by_hidden": dev}
    checks = []
    for r in rows:
        if r["kind"] != "validation":
            continue
        tb = _token_bytes(r)
        c = {"shape": r["shape"], "mix": r["mix"], "blocks": r["blocks"], "bytes_per_token": r["bytes_per_token"],
             "measured_s": r["measured_s"]}
        for k, d in devs.items():
            c[f"predicted_s_{k}"] = 1 / rf.predict(tb, d).expected_tps
            c[f"measured_over_predicted_{k}"] = r["measured_s"] / c[f"predicted_s_{k}"] if r["measured_s"] else None
        checks.append(c)
    return {"per_token_s": per_token, "per_block_s": per_block, "efficiency": dev.efficiency,
            "efficiency_by_hidden": {t: [list(p) for p in v] for t, v in by_hidden.items()}, "checks": checks}


def roofline_markdown(res: dict) -> str:
    meas, f = res["measurements"], res["fit"]
    widths = sorted({h for v in f["efficiency_by_hidden"].values() for h, _ in v})
    lines = [f"# decode_gpu {res['tag']}: `twinquant roofline` on {meas['gpu']}", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ", f"machine: {res['machine']}  ",
             f"llama.cpp CUDA (llama-bench, tg{res['tokens']}, mean of 3), synthetic files of real shapes; "
             f"bandwidth {meas['bandwidth_gbs']:.0f} GB/s (vendor figure)", "",
             f"Fixed costs (256-wide models of 4 and 28 blocks): {1e3 * f['per_token_s']:.3f} ms per token + "
             f"{1e6 * f['per_block_s']:.1f} µs per block", "",
             "Efficiency (fraction of the bandwidth) of each type, from files of that type alone, by model width:", "",
             "| type | " + " | ".join(f"hidden {h}" for h in widths) + " |", "|---|" + "---|" * len(widths)]
    for t, v in f["efficiency_by_hidden"].items():
        e = dict(v)
        lines.append(f"| {t} | " + " | ".join(f"{e[h]:.4f}" if h in e else "-" for h in widths) + " |")
    lines += ["", "Whole files: predicted with the 7B width's efficiencies for every model (flat) and interpolated by "
              "the model's width (by width)", "",
              "| file | blocks | MB read / token | measured ms / token | predicted, flat | measured ÷ predicted, flat "
              "| predicted, by width | measured ÷ predicted, by width |", "|---|---|---|---|---|---|---|---|"]
    for c in f["checks"]:
        ms = f"{1e3 * c['measured_s']:.3f}" if c["measured_s"] else "failed"
        cells = []
        for k in ("flat", "by_hidden"):
            ratio = c[f"measured_over_predicted_{k}"]
            cells += [f"{1e3 * c[f'predicted_s_{k}']:.3f}", f"{ratio:.3f}" if ratio else "-"]
        lines.append(f"| {c['shape']} {c['mix']} | {c['blocks']} | {c['bytes_per_token'] / 1e6:.1f} | {ms} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runtimes(run: dict) -> list[tuple[str, str]]:
    """(key, label) of every runtime a decode run measured: twinquant's variants, the settings' runs, llama.cpp."""
    keys = [*LABELS, *(k for k in run if k.startswith("twinquant_packed") and ":" in k), "llamacpp"]
    return [(k, "llama.cpp CUDA" if k == "llamacpp" else LABELS.get(k) or
             f"{LABELS[k.split(':')[0]]}, {k.split(':', 1)[1]}") for k in keys if k in run]


def check_points(res: dict) -> dict[str, list[dict]]:
    """Measured against predicted seconds per token of the whole files of a --validate or --roofline run, by
    prediction: the shipped table entry, the fit by width, the flat fit (or the first sessions' one fit)."""
    if "checks" in res:
        return {f"shipped `{res['measurements']['device']}` entry": res["checks"]}
    fit = res["fit"]
    if "checks" in fit:
        return {f"fit, {k.replace('_', ' ')}": [{**c, "predicted_s": c[f"predicted_s_{k}"]} for c in fit["checks"]]
                for k in ("by_hidden", "flat")}
    return {"fit, one efficiency per type": [r for r in fit["rows"] if r["kind"] == "validation"]}


def plot(res: dict, path: Path) -> None:
    """A decode run: tokens/s of each runtime beside llama.cpp, one panel a shape. A --roofline or --validate run:
    measured against predicted ms per token of the whole files, with the issue's ±25% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = res.get("machine", {}).get("gpu") or res.get("measurements", res.get("fit", {})).get("gpu", "GPU")
    if "runs" in res:
        runs = res["runs"]
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 0.7 * sum(len(runtimes(r)) for r in runs)),
                                 squeeze=False)
        for ax, run in zip(axes[:, 0], runs):
            rts = runtimes(run)
            tps = [run[k].get("tokens_per_s") or 0 for k, _ in rts]
            ax.barh(range(len(rts)), tps, color=["tab:gray" if k == "llamacpp" else "tab:blue" for k, _ in rts])
            ax.axvline(run["roofline"]["expected_tps"], color="tab:red", ls="--", label="roofline expected")
            ax.set_yticks(range(len(rts)), [textwrap.fill(lab, 48) for _, lab in rts], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{run['shape']}, {run['file_bpw']:.3f} bpw", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
        axes[-1, 0].set_xlabel("tokens / s (batch 1, failed runs at 0)")
        fig.suptitle(f"decode_gpu {res['tag']}: {res.get('mix', 'llama.cpp:Q2_K')}, {gpu}", fontsize=10)
    else:
        fig, ax = plt.subplots(figsize=(7, 6))
        points = check_points(res)
        lo = min(1e3 * c["predicted_s"] for cs in points.values() for c in cs) / 1.5
        hi = max(1e3 * max(c["predicted_s"], c["measured_s"] or 0) for cs in points.values() for c in cs) * 1.5
        xs = np.geomspace(lo, hi, 50)
        ax.plot(xs, xs, color="k", lw=0.8, label="measured = predicted")
        ax.fill_between(xs, 0.75 * xs, 1.25 * xs, color="tab:green", alpha=0.15, label="±25% (issue 19)")
        for (name, cs), m in zip(points.items(), "os^"):
            ok = [c for c in cs if c["measured_s"]]
            ax.scatter([1e3 * c["predicted_s"] for c in ok], [1e3 * c["measured_s"] for c in ok], marker=m,
                       label=name)
        for c in next(iter(points.values())):
            if c["measured_s"]:
                ax.annotate(f"{c['shape'].split('-', 1)[-1]} {c['mix'].split(':')[-1]}", (1e3 * c["predicted_s"],
                            1e3 * c["measured_s"]), fontsize=7, xytext=(4, -8), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="predicted ms / token", ylabel="measured ms / token (llama.cpp CUDA)")
        ax.set_title(f"decode_gpu {res['tag']}: twinquant roofline vs llama.cpp, {gpu}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict) -> str:
    lines = [f"# decode_gpu {res['tag']}", "", f"Synthetic weights, {res.get('mix', 'llama.cpp:Q2_K')}; {res['tokens']} tokens, batch 1; "
             f"roofline: `twinquant roofline FILE --device {res['runs'][0]['roofline']['device'] if res['runs'] else 'h100'}`", "",
             "| shape | file MB | bpw | runtime | tokens/s | vs llama.cpp CUDA | measured / roofline expected |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in res["runs"]:
        ll = run["llamacpp"].get("tokens_per_s")
        exp = run["roofline"]["expected_tps"]
        for k, label in runtimes(run):
            tps = run[k].get("tokens_per_s")
            head = f"| {run['shape']} | {run['file_bytes'] / 1e6:.0f} | {run['file_bpw']:.3f} | {label} |"
            if tps is None:
                lines.append(f"{head} failed | | |")
            else:
                lines.append(f"{head} {tps:.1f} | {f'{tps / ll:.2f}x' if ll else '-'} | {tps / exp:.2f} |")
    return "\n".join(lines) + "\n"


def settings(spec: str):
    """The environment with the settings "K=V K=V" (e.g. TWINQUANT_WORDS=Q2_K,Q3_K TWINQUANT_Q8=Q2_K: which GEMV
    kernels the runtime takes) for the length of a with-block."""
    from unittest import mock

    return mock.patch.dict(os.environ, dict(p.split("=", 1) for p in spec.split()))


def one_shape(a, shape: str, work: Path) -> dict:
    from twinquant.io.load import load_model
    from twinquant.runtime import roofline as rf

    t0 = time.perf_counter()
    path = synthetic_file(work, shape, a.mix)
    run = {"shape": shape, "file_bytes": path.stat().st_size, "prepare_seconds": round(time.perf_counter() - t0, 1)}
    m = load_model(path, load_tokenizer=False)
    run["file_bpw"] = 8 * sum(m.source.info(n).nbytes for n in m.tensor_names()) / rf.n_weights(m.spec)
    gpu = "h200" if torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(0) else "h100"
    run["roofline"] = rf.predict(rf.file_token_bytes(m, a.tokens), gpu).to_dict()
    runs = [(k, packed, graphs, "") for k, packed, graphs in VARIANTS if k in a.variants]
    cuda = a.device.startswith("cuda")          # the settings' runs take CUDA graphs where there are any
    runs += [(f"twinquant_packed{'_graph' if cuda else ''}:{st}", True, cuda, st) for st in a.settings]
    for k, packed, graphs, setting in runs:
        if graphs and not a.device.startswith("cuda"):
            continue
        try:
            with settings(setting):
                run[k] = twinquant_decode(path, a.tokens, packed, a.device, graphs)
        except Exception as e:
            run[k] = {"error": str(e).splitlines()[0][:300]}
        print(shape, k, run[k], flush=True)
    run["llamacpp"] = llama_bench(a.llama_bench, path, a.tokens) if a.llama_bench else {"error": "not run"}
    print(shape, "llama.cpp", run["llamacpp"], flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", help="names the results files (required unless --plot)")
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["qwen2.5-1.5b"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--mix", default="llama.cpp:Q2_K", help="the decode files' mix: llama.cpp:MIX or pure:TYPE")
    ap.add_argument("--llama-bench")
    ap.add_argument("--variants", nargs="+", choices=[v[0] for v in VARIANTS], default=[v[0] for v in VARIANTS],
                    help="twinquant's runs (default all four)")
    ap.add_argument("--settings", nargs="*", default=[], metavar="'K=V ...'",
                    help="more packed CUDA-graph runs, each with these TWINQUANT_* settings (e.g. "
                    "'TWINQUANT_WORDS=Q2_K,Q3_K,Q6_K', 'TWINQUANT_Q8=Q2_K'): kernels side by side in one run")
    ap.add_argument("--roofline", action="store_true", help="fit and check `twinquant roofline` for this GPU "
                    "(llama.cpp only; needs --llama-bench)")
    ap.add_argument("--validate", action="store_true", help="measure the whole files only and check the runtime's "
                    "shipped table entry for this GPU (needs --llama-bench)")
    ap.add_argument("--refit", metavar="JSON", help="recompute the fit of a --roofline run's results file in place")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run (TRITON_INTERPRET=1 "
                    "TWINQUANT_TRITON_CPU=1)")
    ap.add_argument("--work", default="/tmp/decode_gpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    plot_option(ap)
    a = ap.parse_args()
    if plotted(ap, a, plot):
        return
    if a.device.startswith("cuda") and not torch.cuda.is_available() and not a.refit:
        raise SystemExit("decode_gpu: needs a CUDA GPU")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    stem = results_stem(a.out, "decode_gpu", a.tag)
    if a.refit:                   # the fit again from a run's measurements (no GPU needed)
        res = json.loads(Path(a.refit).read_text())
        res["fit"] = roofline_fit(res["measurements"])
        return write_results(Path(a.refit).with_suffix(""), res, roofline_markdown(res), plot)
    if (a.validate or a.roofline) and not a.llama_bench:
        raise SystemExit(f"decode_gpu: --{'validate' if a.validate else 'roofline'} needs --llama-bench")
    if a.validate:                # the shipped table entry checked on this GPU
        meas = roofline_measure(a, work, groups=("validation",), partial=stem.with_suffix(".partial.json"))
        res = record(tag=a.tag, tokens=a.tokens, measurements=meas, checks=roofline_check(meas))
        return write_results(stem, res, check_markdown(res), plot)
    if a.roofline:
        meas = roofline_measure(a, work)
        res = record(tag=a.tag, tokens=a.tokens, measurements=meas, fit=roofline_fit(meas))
        return write_results(stem, res, roofline_markdown(res), plot)
    res = record(tag=a.tag, tokens=a.tokens, mix=a.mix, runs=[])
    for shape in a.shape:
        res["runs"].append(one_shape(a, shape, work))
        write_results(stem, res)
    write_results(stem, res, markdown(res), plot)


if __name__ == "__main__":
    main()
