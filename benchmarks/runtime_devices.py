"""The twinquant runtime on every device torch offers here: same logits, and speed, with and without duplicates.

A random model with SmolLM2-135M's shape (llama, 30 blocks, hidden 576, vocab 49152; weights random, so no model
file has to travel) runs three ways: plain; +10% compute of serial duplicates; and a W·A8 setting with a parallel
group whose copies use stochastic rounding with different seeds. On each device (cpu, and cuda / mps when present)
it reports tokens/s of a 4×512 forward and the largest logit difference to the cpu result (float32).

    python benchmarks/runtime_devices.py [--layers 30] [--reps 3]

Writes benchmarks/results/runtime_devices.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from twinquant.model.copies import ParamStore  # noqa: E402
from twinquant.model.topology import parse_topology  # noqa: E402
from twinquant.io.hf import load_hf_dir  # noqa: E402
from twinquant.model.forward import forward  # noqa: E402
from twinquant.model.layout import Layout  # noqa: E402


def smol_shaped(path: Path, layers: int) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                   rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
    return path


def configure(model, setting: str) -> None:
    n = model.spec.n_layers
    if setting == "plain":
        model.layout, model.dup_params = Layout.sequential(n), None
    elif setting == "serial +10%":
        picks = {f"layer_{b}": {"type": "serial", "copies": 2, "alpha": [0.5]} for b in (n // 3, n // 2, 2 * n // 3)}
        model.layout, model.dup_params = parse_topology(picks, n)
    elif setting == "A8 parallel stochastic":
        params = ParamStore(base={"act_bits": 8}, copies={(n // 2, 1): {"rounding": "stochastic", "seed": 1},
                                                          (n // 2, 2): {"rounding": "stochastic", "seed": 2}})
        model.layout, model.dup_params = parse_topology({f"layer_{n // 2}": {"type": "parallel", "copies": 3}}, n,
                                                        params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + \
        (["mps"] if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else [])
    tmp = Path(tempfile.mkdtemp())
    model = load_hf_dir(smol_shaped(tmp / "m", args.layers)).materialize()
    tokens = torch.randint(3, 49152, (4, 512), generator=torch.Generator().manual_seed(0))
    rows, cpu_logits = [], {}
    for dev in devices:
        model.to(device=dev)
        for setting in ("plain", "serial +10%", "A8 parallel stochastic"):
            configure(model, setting)
            logits = forward(model, tokens[:1, :128]).float().cpu()
            if dev == "cpu":
                cpu_logits[setting] = logits
            diff = float((logits - cpu_logits[setting]).abs().max() / cpu_logits[setting].abs().max())
            forward(model, tokens[:1])                                    # warm-up
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                for i in range(tokens.shape[0]):
                    forward(model, tokens[i: i + 1])
            if dev == "cuda":
                torch.cuda.synchronize()
            tps = args.reps * tokens.numel() / (time.perf_counter() - t0)
            rows.append({"device": dev, "setting": setting, "tokens_per_s": tps, "max_rel_diff_vs_cpu": diff,
                         "executions": len(model.layout.executions())})
            print(f"{dev:<5} {setting:<24} {tps:>10.0f} tok/s   max |Δlogits| / max|logits| vs cpu {diff:.2e}",
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_devices.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['device']}: {r['setting']}" for r in rows]
    ax.barh(labels, [r["tokens_per_s"] for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (4 x 512-token forward, float32)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "runtime_devices.png", dpi=110)
    print(f"wrote {out / 'runtime_devices.json'} and {out / 'runtime_devices.png'}")


if __name__ == "__main__":
    main()
