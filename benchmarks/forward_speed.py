"""Forward speed: twinquant's forward vs `transformers` on the same weights (default SmolLM2-135M), fp32, CPU.

Both run the same 512-token windows of the evaluation text, interleaved (ours, theirs, ours, …) so machine
noise hits both alike; the table reports tokens/s and the ratio. Writes JSON and a PNG to benchmarks/results/.

    python benchmarks/forward_speed.py [--model smollm2-135m] [--ctx 512] [--windows 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from twinquant.io.hf import hf_config, hf_state_dict
from twinquant.io.load import load_model
from twinquant.model.forward import forward

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def transformers_twin(model):
    """The same weights in the matching `transformers` class."""
    import transformers

    cfg = hf_config(model.spec)
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if model.spec.tied_embeddings:
        hf.tie_weights()
    return hf.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model, materialize=True)
    ids = model.tokenizer.encode(TEXT.read_text(encoding="utf-8")[: 40 * args.ctx * args.windows])
    windows = torch.tensor(ids[: args.ctx * args.windows]).view(args.windows, args.ctx)
    hf = transformers_twin(model)

    with torch.inference_mode():   # warm-up, and a check that both compute the same function
        a, b = forward(model, windows[:1]), hf(windows[:1]).logits
        max_diff = (a - b).abs().max().item()

    runners = {"twinquant": lambda w: forward(model, w), "transformers": lambda w: hf(w).logits}
    times: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, run in runners.items():
                t0 = time.perf_counter()
                for i in range(args.windows):
                    run(windows[i: i + 1])
                times[name].append(time.perf_counter() - t0)
    n_tok = args.ctx * args.windows
    rows = {k: {"tokens_per_s": n_tok / statistics.median(v), "seconds_median": statistics.median(v),
                "seconds_all": v} for k, v in times.items()}
    ratio = rows["twinquant"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]

    print(f"model {args.model}, fp32, CPU ({args.threads} threads), {args.windows} windows x {args.ctx} tokens, "
          f"median of {args.repeats}; max |logit diff| {max_diff:.2e}")
    print(f"{'runtime':<14} {'tokens/s':>10} {'s / pass':>10}")
    for k, r in rows.items():
        print(f"{k:<14} {r['tokens_per_s']:>10.1f} {r['seconds_median']:>10.3f}")
    print(f"ratio twinquant / transformers: {ratio:.2f}x")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "ctx": args.ctx, "windows": args.windows, "threads": args.threads,
              "max_logit_diff": max_diff, "rows": rows, "ratio": ratio}
    (out / "forward_speed.json").write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(rows), [r["tokens_per_s"] for r in rows.values()], color=["tab:blue", "tab:gray"])
    ax.set_ylabel("tokens / s (higher is better)")
    ax.set_title(f"{args.model} forward, fp32 CPU, ctx {args.ctx}")
    fig.tight_layout()
    fig.savefig(out / "forward_speed.png", dpi=120)
    print(f"wrote {out / 'forward_speed.json'} and {out / 'forward_speed.png'}")


if __name__ == "__main__":
    main()
