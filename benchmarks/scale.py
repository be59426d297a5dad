"""Scale benchmark: the default recipe and `measure` + `--target-bpw` on a random model with Qwen2.5-32B's shapes
(or, `--shape qwen3-30b-a3b`, Qwen3-30B-A3B's: 128 experts of width 768, 8 per token, 48 layers; `--shape
deepseek-v3`: DeepSeek-V3's latent attention and 256 experts of width 2048, 8 per token, 3 dense + 58 MoE blocks;
`--shape deepseek-v2-lite`: 64 experts of width 1408, 6 per token, 1 dense + 26 MoE blocks; quantize only).

Writes a random-weight Hugging Face model (hidden 5120, ffn 27648, 40/8 heads, vocab 152064, qkv bias; N layers,
one safetensors shard per layer) and runs, through the library, with one block in memory:

  quantize   the default recipe (`BUILTIN["default"]`: GPTQ into the `twinquant:Q2_K` mix, no rotation)
  measure    the Fisher-cost measurement of every candidate type (`measure --cost fisher`; `--sample-rows N`: on N
             rows of each tensor)
  target     quantize --target-bpw with that measurement

For each stage: seconds per block (GPTQ vs the rest: calibration forwards, Hessians, rotation, I/O), the embedding
and head, peak resident memory (anonymous and file-backed, sampled every 0.2 s) and peak GPU memory, and the
extrapolation to 64 layers (quantize: embedding + head + 64 x the mean block; measure, whose one-off costs — loading,
the Fisher pass, kernel compilation — sit outside or in the first block: the run's wall time + the blocks not run x
the mean block after the first, from the times `measure` saves its file). Writes
benchmarks/results/scale_TAG.{json,md,png}.

    python benchmarks/scale.py --layers 2 --device cuda --tag h200
    python benchmarks/scale.py --layers 1 --tag cpu --stages quantize
    python benchmarks/scale.py --hidden 256 --ffn 512 --heads 4 --kv-heads 2 --vocab 1024 --tag tiny   # a smoke run
    python benchmarks/scale.py --shape qwen3-30b-a3b --layers 1 --stages quantize --tag cpu-qwen3moe
    python benchmarks/scale.py --shape deepseek-v3 --layers 2 --stages quantize --tag h200-deepseek-v3

A DeepSeek run's first block is dense and the others are MoE; the whole model is extrapolated from the dense
block's time x the real dense count plus the mean MoE block's x the real MoE count.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from provenance import record  # noqa: E402

QWEN32B = {"hidden": 5120, "ffn": 27648, "heads": 40, "kv_heads": 8, "vocab": 152064}
# Qwen3-30B-A3B (config.json of the release): the shapes of a mixture-of-experts block; its real layer count
QWEN3_30B_A3B = {"hidden": 2048, "ffn": 6144, "heads": 32, "kv_heads": 4, "head_dim": 128, "vocab": 151936,
                 "experts": 128, "experts_used": 8, "expert_ffn": 768}
# DeepSeek-V3 / V2-Lite (config.json of the releases; their YaRN RoPE left out: it does not change the work)
DEEPSEEK_V3 = {"hidden": 7168, "ffn": 18432, "heads": 128, "vocab": 129280, "q_lora": 1536, "kv_lora": 512,
               "nope": 128, "rope": 64, "v": 128, "experts": 256, "experts_used": 8, "expert_ffn": 2048, "shared": 1,
               "v3": True}
DEEPSEEK_V2_LITE = {"hidden": 2048, "ffn": 10944, "heads": 16, "vocab": 102400, "q_lora": 0, "kv_lora": 512,
                    "nope": 128, "rope": 64, "v": 128, "experts": 64, "experts_used": 6, "expert_ffn": 1408,
                    "shared": 2, "v3": False}
TOTAL_LAYERS = {"qwen2.5-32b": 64, "qwen3-30b-a3b": 48, "deepseek-v3": 61, "deepseek-v2-lite": 27}
DENSE_LEAD = {"deepseek-v3": 3, "deepseek-v2-lite": 1}     # of TOTAL_LAYERS; the benchmark's model has one
MOE_SHAPES = {"qwen3-30b-a3b": QWEN3_30B_A3B, "deepseek-v3": DEEPSEEK_V3, "deepseek-v2-lite": DEEPSEEK_V2_LITE}


class _ModelWriter:
    """An HF directory being written: config.json, bf16 random tensors, one safetensors shard per call, the index
    and a small BPE tokenizer at the end."""

    def __init__(self, path: Path, cfg: dict, seed: int):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=1))
        self.path, self.index = path, {}
        self.g = torch.Generator().manual_seed(seed)

    def rnd(self, *shape, std=0.02):
        return (torch.randn(*shape, generator=self.g) * std).to(torch.bfloat16)

    @staticmethod
    def ones(n: int):
        return torch.ones(n, dtype=torch.bfloat16)

    def shard(self, name: str, tensors: dict) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(self.path / name), metadata={"format": "pt"})
        self.index.update({k: name for k in tensors})

    def finish(self) -> Path:
        from tests.tiny_models import save_tiny_tokenizer

        (self.path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": self.index}))
        save_tiny_tokenizer(self.path, 512)
        (self.path / "done").write_text("")
        return self.path


def write_moe_model(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, head_dim: int,
                    vocab: int, experts: int, experts_used: int, expert_ffn: int, seed: int = 0) -> Path:
    """A random Qwen3-MoE model as an HF directory (bf16, one shard per layer, one tensor per expert as
    checkpoints ship) with a small BPE tokenizer."""
    if (path / "done").is_file():
        return path
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
           "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "head_dim": head_dim, "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "max_position_embeddings": 32768, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "hidden_act": "silu", "num_experts": experts,
           "num_experts_per_tok": experts_used, "moe_intermediate_size": expert_ffn, "norm_topk_prob": True,
           "bos_token_id": None, "eos_token_id": 2}
    w = _ModelWriter(path, cfg, seed)
    rnd, ones = w.rnd, w.ones
    w.shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
                                  "model.norm.weight": ones(hidden)})
    q, kv = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
             p + "self_attn.q_proj.weight": rnd(q, hidden), p + "self_attn.k_proj.weight": rnd(kv, hidden),
             p + "self_attn.v_proj.weight": rnd(kv, hidden), p + "self_attn.o_proj.weight": rnd(hidden, q),
             p + "self_attn.q_norm.weight": ones(head_dim), p + "self_attn.k_norm.weight": ones(head_dim),
             p + "mlp.gate.weight": rnd(experts, hidden)}
        for e in range(experts):
            x = f"{p}mlp.experts.{e}."
            t.update({x + "gate_proj.weight": rnd(expert_ffn, hidden), x + "up_proj.weight": rnd(expert_ffn, hidden),
                      x + "down_proj.weight": rnd(hidden, expert_ffn, std=0.02 / math.sqrt(expert_ffn / hidden))})
        w.shard(f"layer{i:03d}.safetensors", t)
    return w.finish()


def write_deepseek_model(path: Path, layers: int, hidden: int, ffn: int, heads: int, vocab: int, q_lora: int,
                         kv_lora: int, nope: int, rope: int, v: int, experts: int, experts_used: int,
                         expert_ffn: int, shared: int, v3: bool, seed: int = 0, dense: int = 1) -> Path:
    """A random DeepSeek-V3 (or V2) model as an HF directory: the first `dense` blocks dense, the others MoE (bf16,
    one shard per layer, one tensor per expert as checkpoints ship) with a small BPE tokenizer."""
    if (path / "done").is_file():
        return path
    cfg = {"architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
           "model_type": "deepseek_v3" if v3 else "deepseek_v2", "hidden_size": hidden, "intermediate_size": ffn,
           "num_attention_heads": heads, "num_key_value_heads": heads, "num_hidden_layers": layers,
           "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
           "q_lora_rank": q_lora or None, "kv_lora_rank": kv_lora, "qk_nope_head_dim": nope,
           "qk_rope_head_dim": rope, "v_head_dim": v, "n_routed_experts": experts,
           "num_experts_per_tok": experts_used, "moe_intermediate_size": expert_ffn, "n_shared_experts": shared,
           "first_k_dense_replace": dense, "norm_topk_prob": v3, "routed_scaling_factor": 2.5 if v3 else 1.0,
           "scoring_func": "sigmoid" if v3 else "softmax", "topk_method": "noaux_tc" if v3 else "greedy",
           "n_group": 8 if v3 else 1, "topk_group": 4 if v3 else 1, "bos_token_id": None, "eos_token_id": 2}
    w = _ModelWriter(path, cfg, seed)
    rnd, ones = w.rnd, w.ones
    w.shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden), "lm_head.weight": rnd(vocab, hidden),
                                  "model.norm.weight": ones(hidden)})
    down_std = lambda f: 0.02 / math.sqrt(f / hidden)   # noqa: E731
    for i in range(layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        t = {p + "input_layernorm.weight": ones(hidden), p + "post_attention_layernorm.weight": ones(hidden),
             a + "kv_a_proj_with_mqa.weight": rnd(kv_lora + rope, hidden), a + "kv_a_layernorm.weight": ones(kv_lora),
             a + "kv_b_proj.weight": rnd(heads * (nope + v), kv_lora), a + "o_proj.weight": rnd(hidden, heads * v)}
        if q_lora:
            t.update({a + "q_a_proj.weight": rnd(q_lora, hidden), a + "q_a_layernorm.weight": ones(q_lora),
                      a + "q_b_proj.weight": rnd(heads * (nope + rope), q_lora)})
        else:
            t[a + "q_proj.weight"] = rnd(heads * (nope + rope), hidden)
        if i < dense:
            t.update({p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                      p + "mlp.down_proj.weight": rnd(hidden, ffn, std=down_std(ffn))})
        else:
            t[p + "mlp.gate.weight"] = rnd(experts, hidden)
            if v3:
                t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(experts, dtype=torch.float32)
            sf = shared * expert_ffn
            t.update({p + "mlp.shared_experts.gate_proj.weight": rnd(sf, hidden),
                      p + "mlp.shared_experts.up_proj.weight": rnd(sf, hidden),
                      p + "mlp.shared_experts.down_proj.weight": rnd(hidden, sf, std=down_std(sf))})
            for e in range(experts):
                x = f"{p}mlp.experts.{e}."
                t.update({x + "gate_proj.weight": rnd(expert_ffn, hidden), x + "up_proj.weight": rnd(expert_ffn, hidden),
                          x + "down_proj.weight": rnd(hidden, expert_ffn, std=down_std(expert_ffn))})
        w.shard(f"layer{i:03d}.safetensors", t)
        del t
    return w.finish()


def write_model(path: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int,
                seed: int = 0) -> Path:
    """A random Qwen2 model as an HF directory (bf16 shards, one per layer) with a small BPE tokenizer."""
    if (path / "done").is_file():
        return path
    head_dim = hidden // heads
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
           "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
           "max_position_embeddings": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "hidden_act": "silu", "bos_token_id": None, "eos_token_id": 2}
    w = _ModelWriter(path, cfg, seed)
    rnd = w.rnd
    w.shard("embed.safetensors", {"model.embed_tokens.weight": rnd(vocab, hidden),
                                  "lm_head.weight": rnd(vocab, hidden),
                                  "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    kv = kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        w.shard(f"layer{i:03d}.safetensors", {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rnd(hidden, hidden), p + "self_attn.q_proj.bias": rnd(hidden),
            p + "self_attn.k_proj.weight": rnd(kv, hidden), p + "self_attn.k_proj.bias": rnd(kv),
            p + "self_attn.v_proj.weight": rnd(kv, hidden), p + "self_attn.v_proj.bias": rnd(kv),
            p + "self_attn.o_proj.weight": rnd(hidden, hidden),
            p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, ffn, std=0.02 / math.sqrt(ffn / hidden))})
    return w.finish()


class Sampler:
    """Peak resident memory of this process (anonymous / file-backed, from /proc) and of the GPU."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_anon, self.peak_file, self._stop = every, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            anon = file = 0
            for ln in Path("/proc/self/status").read_text().splitlines():
                if ln.startswith("RssAnon:"):
                    anon = int(ln.split()[1]) * 1024
                elif ln.startswith(("RssFile:", "RssShmem:")):
                    file += int(ln.split()[1]) * 1024
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)
            self._stop.wait(self.every)

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


class _TimedCandidates:
    """Seconds of every candidate quantization `measure` makes (backends.quantize_to_format), by type, synchronised
    on the GPU; `fixed`: those of the embedding (the first tensor, no Hessian) and of the output head (the last
    tensor priced), which a deeper model does not repeat."""

    def __init__(self):
        self.calls: list[tuple[int | None, str, float]] = []     # (id of the Hessian, type, seconds)

    def __enter__(self):
        from twinquant.algorithms import backends

        self._mod, self._real = backends, backends.quantize_to_format

        def timed(quant, W, codec, **kw):
            sync = torch.cuda.synchronize if W.is_cuda else (lambda: None)
            sync()
            t = time.perf_counter()
            out = self._real(quant, W, codec, **kw)
            sync()
            H = kw.get("H")
            self.calls.append((None if H is None else id(H), codec.name, time.perf_counter() - t))
            return out

        backends.quantize_to_format = timed
        return self

    def __exit__(self, *exc):
        self._mod.quantize_to_format = self._real

    @property
    def fixed(self) -> float:
        if not self.calls:
            return 0.0
        first = sum(sec for h, _, sec in self.calls if h is None)
        last_h = self.calls[-1][0]
        last = 0.0
        for h, _, sec in reversed(self.calls):
            if h != last_h or h is None:
                break
            last += sec
        return first + last

    def by_type(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, ty, sec in self.calls:
            out[ty] = out.get(ty, 0.0) + sec
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


class _TimedSaves:
    """When `measure` saves its file: after the embedding, after every block, at the end (block seconds are the
    gaps between the saves after the embedding and after each block)."""

    def __enter__(self):
        from twinquant.allocation.measure import Measurement

        self.times: list[float] = []
        self._cls, self._real = Measurement, Measurement.save

        def save(meas, path):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return self._real(meas, path)

        Measurement.save = save
        return self

    def __exit__(self, *exc):
        self._cls.save = self._real

    def blocks(self, layers: int) -> list[float]:
        return [round(b - a, 2) for a, b in zip(self.times[:layers], self.times[1:layers + 1])]


class _TimedExperts:
    """Seconds spent reading single experts from the source (`Model.expert`), by block."""

    def __enter__(self):
        from twinquant.model.model import Model

        self.seconds: dict[int, float] = {}
        self._cls, self._real = Model, getattr(Model, "expert", None)
        if self._real is None:      # a tree from before per-expert reads (a side-by-side run of an older commit)
            return self

        def expert(model, name, e):
            t = time.perf_counter()
            out = self._real(model, name, e)
            b = int(name.split(".")[1])
            self.seconds[b] = self.seconds.get(b, 0.0) + time.perf_counter() - t
            return out

        Model.expert = expert
        return self

    def __exit__(self, *exc):
        if self._real is not None:
            self._cls.expert = self._real


def _gib(b: float) -> float:
    return round(b / 2**30, 2)


def _per_block(report: dict, layers: int) -> list[dict]:
    """Seconds per block from a quantize report: GPTQ (sum of the block's tensors) and the rest."""
    out = []
    for i, total in enumerate(report["seconds_per_block"][:layers]):
        gptq = sum(t["seconds"] for t in report["tensors"] if t["name"].startswith(f"blk.{i}."))
        out.append({"block": i, "seconds": round(total, 2), "gptq": round(gptq, 2), "other": round(total - gptq, 2)})
    return out


def _tensor_seconds(report: dict, name: str) -> float:
    return round(sum(t["seconds"] for t in report["tensors"] if t["name"] == name), 2)


def run_stage(stage: str, src: Path, work: Path, args) -> dict:
    """One stage; `quantize@N` is the default recipe calibrated on N tokens instead of its own count."""
    import twinquant
    from twinquant.pipeline import Options
    from twinquant.pipeline.recipe import BUILTIN

    label = stage
    stage, _, tokens = stage.partition("@")
    recipe = BUILTIN["default"].replace(calib_tokens=int(tokens) if tokens else None)
    out = work / f"{stage}.gguf"
    mpath = work / "measurement.json"
    opts = dict(dtype=torch.float32, device=args.device, quiet=False, work_dir=str(work / f"{stage}.work"))
    t0 = time.perf_counter()
    with Sampler() as mem:
        if stage == "measure":
            mpath.unlink(missing_ok=True)
            with _TimedCandidates() as cand, _TimedSaves() as saves:
                m = twinquant.measure(str(src), mpath, recipe, Options(cost="fisher", sample_rows=args.sample_rows,
                                                                       **opts))
            result = {"tensors": len(m.tensors), "sample_rows": args.sample_rows,
                      "candidates": sum(len(t["candidates"]) for t in m.tensors.values()),
                      "candidate_seconds_by_type": cand.by_type(), "fixed_seconds": round(cand.fixed, 1),
                      "block_seconds": saves.blocks(args.layers)}
            label += f" ({args.sample_rows} rows)" if args.sample_rows else ""
        else:
            extra = {"target_bpw": args.target_bpw, "measurement": str(mpath)} if stage == "target" else {}
            rep = work / f"{stage}.report.json"
            with _TimedExperts() as reads:
                res = twinquant.quantize(str(src), out, recipe, Options(report=str(rep), **opts, **extra))
            report = json.loads(rep.read_text())
            blocks = _per_block(report, args.layers)
            real = MOE_SHAPES.get(args.shape, {}).get("experts")
            for b in blocks:
                stacks = sum(t["seconds"] for t in report["tensors"]
                             if t["name"].startswith(f"blk.{b['block']}.") and "_exps." in t["name"])
                b["expert_seconds"] = round(stacks + reads.seconds.get(b["block"], 0.0), 2)
                b["expert_read_seconds"] = round(reads.seconds.get(b["block"], 0.0), 2)
                if args.experts and real and args.experts != real:
                    # what grows with the number of experts: their GPTQ and reading their weights (the forwards'
                    # and Hessians' work is per routed token, the same for any count)
                    b["measured_seconds"] = b["seconds"]
                    b["seconds"] = round(b["seconds"] + b["expert_seconds"] * (real / args.experts - 1), 2)
            mean = sum(b["seconds"] for b in blocks) / len(blocks)
            fixed = _tensor_seconds(report, "token_embd.weight") + _tensor_seconds(report, "output.weight")
            total = TOTAL_LAYERS[args.shape]
            lead = DENSE_LEAD.get(args.shape, 0) if args.dense else 0
            if lead and len(blocks) > 1:    # block 0 dense, the rest MoE: each kind at its real count
                moe = blocks[1:]
                mean = (lead * blocks[0]["seconds"]
                        + (total - lead) * sum(b["seconds"] for b in moe) / len(moe)) / total
            result = {"file_bytes": out.stat().st_size, "file_bpw": round(8 * res.file_bytes / res.n_params, 4),
                      "blocks": blocks, "embedding_seconds": _tensor_seconds(report, "token_embd.weight"),
                      "head_seconds": _tensor_seconds(report, "output.weight"),
                      "mean_block_seconds": round(mean, 2),
                      "calib_tokens": (report.get("calibration") or {}).get("tokens"),
                      "extrapolated_layers": total, "extrapolated_min": round((fixed + total * mean) / 60, 1)}
            if lead and len(blocks) > 1:
                result.update(dense_block_seconds=blocks[0]["seconds"], dense_blocks=lead,
                              moe_block_seconds=round(sum(b["seconds"] for b in blocks[1:]) / (len(blocks) - 1), 2))
            if total == 64:     # the key earlier results files have
                result["extrapolated_64_layers_min"] = result["extrapolated_min"]
            out.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    result.update({"stage": label, "wall_seconds": round(wall, 1), "peak_rss_anon_gib": _gib(mem.peak_anon),
                   "peak_rss_file_gib": _gib(mem.peak_file), "peak_gpu_gib": _gib(mem.gpu_peak)})
    if stage == "measure":
        # the whole run as measured (loading, the Fisher pass, embedding, head, every block run) plus the blocks not
        # run at the rate of those after the first (the first also pays one-off costs: kernel compilation, warm-up)
        total = TOTAL_LAYERS[args.shape]
        b = result["block_seconds"]
        steady = sum(b[1:]) / len(b[1:]) if len(b) > 1 else b[0]
        result.update(extrapolated_layers=total, mean_block_seconds=round(steady, 2),
                      extrapolated_min=round((wall + (total - args.layers) * steady) / 60, 1))
        if total == 64:
            result["extrapolated_64_layers_min"] = result["extrapolated_min"]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shape", choices=list(TOTAL_LAYERS), default="qwen2.5-32b",
                    help="qwen3-30b-a3b, deepseek-*: a mixture-of-experts model (its own dims; --hidden etc. "
                         "ignored)")
    for k, v in QWEN32B.items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stages", default="quantize,measure,target",
                    help="comma-separated; quantize@N: the default recipe on N calibration tokens (e.g. "
                         "quantize@8192,quantize compares a fixed count with the recipe's own)")
    ap.add_argument("--experts", type=int, help="MoE shapes: this many routed experts instead of the model's (the "
                    "experts' GPTQ and reads are scaled to the real count in the extrapolation)")
    ap.add_argument("--dense", type=int, default=1, help="DeepSeek shapes: dense leading blocks in the benchmark's "
                    "model (0: every block MoE; the whole model is then extrapolated at the MoE block's time)")
    ap.add_argument("--target-bpw", type=float, default=2.5)
    ap.add_argument("--sample-rows", type=int, help="the measure stage prices candidates on this many rows a tensor "
                    "(measure --sample-rows)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "twinquant" / "scale"))
    ap.add_argument("--tag", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--render", metavar="JSON", help="only write the table and plot of an existing results file "
                    "(e.g. one brought back from a GPU machine) as scale_TAG.{json,md,png}")
    ap.add_argument("--from-log", metavar="LOG", help="a run cut off before its stage ended: the per-tensor seconds "
                    "of its quantize log (with --command, --commit: the run's own) as a partial results file")
    ap.add_argument("--command", help="with --from-log: the command that wrote the log")
    ap.add_argument("--commit", help="with --from-log: the commit that ran")
    ap.add_argument("--machine-of", metavar="JSON", help="with --from-log: a results file written on the machine "
                    "that ran it (its `machine` record)")
    args = ap.parse_args(argv)
    if args.render:
        print(write_results(json.loads(Path(args.render).read_text()), Path(args.out), args.tag))
        return 0
    if args.from_log:
        print(write_results(partial_from_log(Path(args.from_log), args), Path(args.out), args.tag))
        return 0
    work = Path(args.work) / args.tag
    moe = args.shape in MOE_SHAPES
    shape = dict(MOE_SHAPES[args.shape]) if moe else {k: getattr(args, k) for k in QWEN32B}
    if moe and set(args.stages.split(",")) - {"quantize"} - {x for x in args.stages.split(",") if "@" in x}:
        ap.error(f"--shape {args.shape} runs the quantize stage only (measure has no MoE path yet)")
    t0 = time.perf_counter()
    writer = write_deepseek_model if args.shape.startswith("deepseek") else write_moe_model if moe else write_model
    if args.experts:
        if not moe or args.experts % 8 or args.experts < 2 * shape["experts_used"]:
            ap.error("--experts: a MoE shape, a multiple of 8, at least twice the experts used per token")
        shape["experts"] = args.experts
    if args.shape.startswith("deepseek"):
        shape["dense"] = args.dense
    src = writer(work / "model", args.layers, **shape)
    t_model = time.perf_counter() - t0
    print(f"model: {args.layers} layers of {shape} in {t_model:.0f} s", file=sys.stderr)
    stages = []
    out = Path(args.out)
    for stage in args.stages.split(","):      # written after every stage: a cut-off run keeps its part
        stages.append(run_stage(stage, src, work, args))
        print(json.dumps(stages[-1]), file=sys.stderr)
        res = record(benchmark="scale", tag=args.tag, layers=args.layers, shape=shape, model=args.shape,
                     device=args.device,
                     model_seconds=round(t_model, 1), stages=stages)
        table = write_results(res, out, args.tag)
    print(table)
    return 0


_LOG_LINE = re.compile(r"^\[\s*\d+/\d+\]\s+(?P<name>\S+)\s+\[[^\]]*\]\s+->\s+(?P<type>\S+)\s+(?P<bpw>[\d.]+) bpw"
                       r".*?\s(?P<s>[\d.]+)s(?:\s|$)")


def partial_from_log(log: Path, args) -> dict:
    """A cut-off quantize run's record from its log: each finished tensor's seconds (GPTQ, including a chunked
    stack's Hessian rebuilds), summed per block; the blocks' calibration forwards are not in the log."""
    tensors = []
    for line in log.read_text().splitlines():
        m = _LOG_LINE.match(line)
        if m:
            tensors.append({"name": m["name"], "type": m["type"], "bpw": float(m["bpw"]), "seconds": float(m["s"])})
    blocks: dict[int, float] = {}
    for t in tensors:
        if t["name"].startswith("blk."):
            b = int(t["name"].split(".")[1])
            blocks[b] = blocks.get(b, 0.0) + t["seconds"]
    last = tensors[-1]["name"] if tensors else "nothing"
    total, lead = TOTAL_LAYERS[args.shape], DENSE_LEAD.get(args.shape, 0)
    per = [blocks[b] for b in sorted(blocks)]
    # a lower bound: the finished tensors only (the cut-off block's missing ones and every calibration forward not)
    lower = (sum(t["seconds"] for t in tensors if not t["name"].startswith("blk."))
             + (lead * per[0] + (total - lead) * max(per[1:]) if lead and len(per) > 1 else total * max(per))) / 60
    stage = {"stage": "quantize (cut off)", "wall_seconds": sum(t["seconds"] for t in tensors),
             "blocks": [{"block": b, "seconds": round(v, 1), "gptq": round(v, 1), "other": 0.0}
                        for b, v in sorted(blocks.items())],
             "embedding_seconds": _tensor_seconds({"tensors": tensors}, "token_embd.weight"),
             "tensors": tensors, "peak_rss_anon_gib": None, "peak_gpu_gib": None,
             "extrapolated_layers": total, "extrapolated_min": round(lower, 1), "extrapolated_is_lower_bound": True}
    res = record(benchmark="scale", tag=args.tag, layers=args.layers, shape=dict(MOE_SHAPES.get(args.shape, {})),
                 model=args.shape, device=args.device, stages=[stage],
                 cut_off=f"the run ended (device time limit) after {last}: the blocks' seconds are the finished "
                         "tensors' only; no peak memory was sampled")
    res.update(command=args.command or res["command"], commit=args.commit or res["commit"], log=str(log.name))
    if args.machine_of:
        res["machine"] = json.loads(Path(args.machine_of).read_text())["machine"]
    return res


def _experts_note(res: dict) -> list[str]:
    """The line a run of fewer routed experts than the model has (`--experts`) gets."""
    real = MOE_SHAPES.get(res.get("model"), {}).get("experts")
    run = (res.get("shape") or {}).get("experts")
    if not real or not run or run == real:
        return []
    return [f"{run} of the model's {real} routed experts were run; each MoE block's seconds are its measured ones "
            f"plus its experts' GPTQ and reads x {real / run - 1:g} (`measured_seconds`, `expert_seconds` in the "
            "JSON): the whole model at all {real} experts.".replace("{real}", str(real)), ""]


def write_results(res: dict, out: Path, tag: str) -> str:
    """scale_TAG.json, .md and .png from a results record; returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"scale_{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# scale: {res['layers']} layers of {res.get('model', 'qwen2.5-32b')} shapes {res['shape']}, device "
             f"{res['device']}", "",
             f"command: `{res['command']}`  ", f"commit: {res['commit']}  ",
             *([f"({res['commit_note']})  "] if res.get("commit_note") else []), f"machine: {res['machine']}", "",
             *_experts_note(res),
             "| stage | calibration tokens | wall s | mean block s | GPTQ s/block | other s/block | embedding s | head s "
             "| peak RSS anon GiB | peak GPU GiB | whole model (min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["stages"]:
        b = s.get("blocks") or []
        g = sum(x["gptq"] for x in b) / len(b) if b else None
        o = sum(x["other"] for x in b) / len(b) if b else None
        f = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {s['stage']} | {s.get('calib_tokens') or ''} | {s['wall_seconds']:.0f} "
                     f"| {f(s.get('mean_block_seconds'))} | {f(g)} | {f(o)} "
                     f"| {f(s.get('embedding_seconds'))} | {f(s.get('head_seconds'))} | {s['peak_rss_anon_gib'] or ''} "
                     f"| {s['peak_gpu_gib'] or ''} | {'≥ ' if s.get('extrapolated_is_lower_bound') else ''}"
                     f"{s.get('extrapolated_min', s.get('extrapolated_64_layers_min'))} "
                     f"({s.get('extrapolated_layers', 64)} layers) |")
    if res.get("cut_off"):
        lines += ["", f"cut off: {res['cut_off']}"]
    for s in res["stages"]:
        if s.get("candidate_seconds_by_type"):
            per = (f"; seconds per block {s['block_seconds']}: the whole model is the run's wall time plus the "
                   f"blocks not run at the mean of those after the first" if s.get("block_seconds") else
                   ", counted once in the whole-model figure")
            lines += ["", f"{s['stage']}: seconds of the candidate quantizations by type (embedding and head: "
                      f"{s['fixed_seconds']:.1f} s of them{per})", "",
                      "| type | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in s["candidate_seconds_by_type"].items()]
        if isinstance(s.get("tensors"), list):
            lines += ["", f"{s['stage']}: seconds per tensor", "", "| tensor | type | seconds |", "|---|---|---|"]
            lines += [f"| {t['name']} | {t['type']} | {t['seconds']:.1f} |" for t in s["tensors"]]
    table = "\n".join(lines) + "\n"
    (out / f"scale_{tag}.md").write_text(table)
    _plot(res["stages"], out / f"scale_{tag}.png", res["device"], res.get("model", "qwen2.5-32b"))
    return table


def _plot(stages, path: Path, device: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names, gptq, other = [], [], []
    for s in stages:
        if s.get("blocks"):
            names.append(s["stage"])
            gptq.append(sum(x["gptq"] for x in s["blocks"]) / len(s["blocks"]))
            other.append(sum(x["other"] for x in s["blocks"]) / len(s["blocks"]))
    ax.bar(names, gptq, label="GPTQ (codec fits, column sweep)")
    ax.bar(names, other, bottom=gptq, label="calibration forwards, Hessians, rotation, I/O")
    ax.set_ylabel("seconds per block")
    ax.set_title(f"{model} shapes, {device}: per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
