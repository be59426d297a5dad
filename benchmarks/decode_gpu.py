"""Decode speed on a GPU: twinquant's runtime with packed K-quant weights (Triton GEMV) against the same runtime on
dequantized bfloat16 weights and against llama.cpp's CUDA backend, on the same file; and `twinquant roofline
--device h200` against both.

No model file travels to the GPU machine: a random-weight model with a real model's shapes (default
Qwen2.5-1.5B: hidden 1536, ffn 8960, 12/2 heads, vocab 151936, 28 layers; `--shape qwen2.5-1.5b qwen2.5-7b` for both) is written as an
HF directory (benchmarks/scale.write_model) and quantized by RTN into llama.cpp's Q2_K mix on the GPU (every
linear a K-quant the kernels read: Q2_K, Q3_K, Q4_K, Q6_K head).

Timed: tokens/s of generating --tokens tokens after an 8-token prompt (the first 4 not counted), greedy, batch 1,
KV cache on; llama.cpp: `llama-bench -p 0 -n TOKENS -ngl 99` (mean of 3). Writes
benchmarks/results/decode_gpu_TAG.{json,md}.

    python benchmarks/decode_gpu.py --tag h200 --llama-bench BUILD/bin/llama-bench
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

import torch  # noqa: E402

from provenance import record  # noqa: E402

SHAPES = {"qwen2.5-1.5b": dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936),
          "qwen2.5-7b": dict(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064),
          "tiny": dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=1024)}     # a smoke run
WARM = 4


def quantized_file(work: Path, shape: str, device: str) -> Path:
    import twinquant
    from scale import write_model
    from twinquant.pipeline import Options
    from twinquant.pipeline.recipe import BUILTIN

    out = work / f"{shape}-Q2_K-rtn.gguf"
    if out.is_file():
        return out
    src = write_model(work / f"{shape}-hf", **SHAPES[shape])
    recipe = BUILTIN["default"].replace(method="rtn", mix="llama.cpp:Q2_K", rotation="none")
    twinquant.quantize(str(src), out, recipe, Options(dtype=torch.float32, device=device, quiet=True,
                                                      work_dir=str(work / "q.work")))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def twinquant_decode(path: Path, tokens: int, packed: bool, device: str) -> dict:
    from twinquant.model.forward import KVCache, forward
    from twinquant.runtime.packed_weights import load_for_decode

    # what `twinquant run --device cuda` does (packed), or with --dtype bf16 --no-kernels
    model, counts = load_for_decode(path, torch.float32 if packed else torch.bfloat16, device, kernels=packed)
    _sync(device)
    mem = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
    cache = KVCache.empty(model, 1, 8 + tokens + 1)
    tok = torch.arange(8)[None] + 100
    with torch.inference_mode():
        logits = forward(model, tok, cache=cache, logits_for=slice(-1, None))
        times = []
        for i in range(tokens):
            nxt = logits[0, -1].argmax().view(1, 1)
            _sync(device)
            t0 = time.perf_counter()
            logits = forward(model, nxt, cache=cache, logits_for=slice(-1, None))
            _sync(device)
            if i >= WARM:
                times.append(time.perf_counter() - t0)
    del model, cache
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"tokens_per_s": len(times) / sum(times), "gpu_memory_gib": mem and round(mem, 2),
            "packed": dict(counts), "weights": "packed K-quant bytes (Triton GEMV)" if packed else "bfloat16 (cuBLAS)"}


def llama_bench(binary: str, path: Path, tokens: int) -> dict:
    cmd = [binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-ngl", "99", "-r", "3", "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode:
        return {"error": (p.stderr or p.stdout)[-800:], "command": " ".join(cmd)}
    r = json.loads(p.stdout)[0]
    return {"tokens_per_s": r["avg_ts"], "stddev": r.get("stddev_ts"), "command": " ".join(cmd),
            "build_commit": r.get("build_commit"), "gpu": r.get("gpu_info")}


def markdown(res: dict) -> str:
    lines = [f"# decode_gpu {res['tag']}", "", f"Random weights, llama.cpp Q2_K mix by RTN; {res['tokens']} tokens, batch 1; "
             "roofline: `twinquant roofline FILE --device h200`", "",
             "| shape | file MB | bpw | runtime | tokens/s | vs llama.cpp CUDA | measured / roofline expected |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in res["runs"]:
        ll = run["llamacpp"].get("tokens_per_s")
        exp = run["roofline"]["expected_tps"]
        for k, label in (("twinquant_packed", "twinquant, packed K-quants (Triton)"),
                         ("twinquant_bf16", "twinquant, bfloat16 weights"), ("llamacpp", "llama.cpp CUDA")):
            tps = run[k].get("tokens_per_s")
            head = f"| {run['shape']} | {run['file_bytes'] / 1e6:.0f} | {run['file_bpw']:.3f} | {label} |"
            if tps is None:
                lines.append(f"{head} failed | | |")
            else:
                lines.append(f"{head} {tps:.1f} | {f'{tps / ll:.2f}x' if ll else '-'} | {tps / exp:.2f} |")
    return "\n".join(lines) + "\n"


def one_shape(a, shape: str, work: Path) -> dict:
    from twinquant.io.load import load_model
    from twinquant.runtime import roofline as rf

    t0 = time.perf_counter()
    path = quantized_file(work, shape, a.device)
    run = {"shape": shape, "file_bytes": path.stat().st_size, "prepare_seconds": round(time.perf_counter() - t0, 1)}
    m = load_model(path, load_tokenizer=False)
    run["file_bpw"] = 8 * sum(m.source.info(n).nbytes for n in m.tensor_names()) / rf.n_weights(m.spec)
    run["roofline"] = rf.predict(rf.file_token_bytes(m, a.tokens), "h200").to_dict()
    for k, packed in (("twinquant_packed", True), ("twinquant_bf16", False)):
        try:
            run[k] = twinquant_decode(path, a.tokens, packed, a.device)
        except Exception as e:
            run[k] = {"error": str(e).splitlines()[0][:300]}
        print(shape, k, run[k], flush=True)
    run["llamacpp"] = llama_bench(a.llama_bench, path, a.tokens) if a.llama_bench else {"error": "not run"}
    print(shape, "llama.cpp", run["llamacpp"], flush=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tag", required=True)
    ap.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["qwen2.5-1.5b"])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--llama-bench")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run (TRITON_INTERPRET=1 "
                    "TWINQUANT_TRITON_CPU=1)")
    ap.add_argument("--work", default="/tmp/decode_gpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("decode_gpu: needs a CUDA GPU")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res = record(tag=a.tag, tokens=a.tokens, runs=[])
    stem = Path(a.out) / f"decode_gpu_{a.tag}"
    for shape in a.shape:
        res["runs"].append(one_shape(a, shape, work))
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
        stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
