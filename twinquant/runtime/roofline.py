"""How fast a model file decodes on a device, from the bytes it reads per generated token (`twinquant roofline`).

Generating one token at batch 1 reads every weight the token passes once: each block's tensors per execution of
the block (a duplicated block is read again: its weights do not stay in any cache between its passes), only the
experts a token is routed to (`n_experts_used / n_experts` of a stacked expert tensor), one row of the token
embedding, the whole output head (the embedding itself when they are tied), and the KV cache of every execution
of attention at the current context (F16, llama.cpp's default; DeepSeek's latent attention caches
`kv_lora_rank + rope` values per position and layer). The arithmetic per byte is small, so the time is

    t = Σ_type bytes_type / (bandwidth × efficiency_type) + KV bytes / (bandwidth × efficiency_kv)
        [+ per_token + blocks × per_block on a GPU]

and tokens/s = 1 / t. `bandwidth` is the device's memory bandwidth (the vendor's figure, or a copy measured now
for `this-cpu`); `efficiency_type` is the fraction of it a decoder reaches on weights of that type: measured with
stock llama.cpp where we could (this CPU, an H100), cited with its source otherwise (Metal). On a GPU a token also
pays fixed costs (kernel latencies: per token, and per executed block), and a type's efficiency depends on the
model's width (narrow GEMVs reach less of the bandwidth). With efficiency 1
the same sum is the bandwidth bound. `DEVICES` holds the figures and where each comes from.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles

GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    bandwidth: float | None          # GB/s; None: measured when asked (this-cpu)
    efficiency: dict[str, float]     # GGML type -> fraction of bandwidth reached in decode; "*" for the others
    kv_efficiency: float
    source: str
    per_token: float = 0.0           # seconds a token costs besides its bytes (launches, synchronisation) …
    per_block: float = 0.0           # … and per executed block (its kernels' fixed latencies); GPUs only
    # GGML type -> ((hidden size, efficiency), …) ascending: measured at several model widths (a GPU's GEMV
    # reaches less of the bandwidth on narrow matrices); interpolated in log(hidden), held at the ends
    by_hidden: dict = field(default_factory=dict)

    def eff(self, ggml_type: str, hidden: int = 0) -> float:
        pts = self.by_hidden.get(ggml_type)
        if pts and hidden:
            if hidden <= pts[0][0]:
                return pts[0][1]
            for (h0, e0), (h1, e1) in zip(pts, pts[1:]):
                if hidden <= h1:
                    f = math.log(hidden / h0) / math.log(h1 / h0)
                    return e0 + f * (e1 - e0)
            return pts[-1][1]
        return self.efficiency.get(ggml_type, self.efficiency["*"])


# Efficiencies of stock llama.cpp decode on this project's 2-core x86 machine (AVX2, llama.cpp 0.3.36 via
# llama-cpp-python, 2 threads, relative to the copy bandwidth measured in the same run): benchmarks/decode_speed.py
# on files of one type each (benchmarks/results/decode_speed_cpu.json; tests/test_roofline.py checks this table
# against that file; "*", the median, for types not measured there: the IQ2 / IQ1 families). A read-only stream can
# beat a copy's read+write rate, so F16 comes out near 1; on two cores the i-quants are compute-bound (IQ3: 0.2).
CPU_EFFICIENCY = {"F16": 0.9551, "Q8_0": 0.7525, "Q6_K": 0.6294, "Q5_K": 0.6299, "Q4_K": 0.6818, "Q3_K": 0.4645,
                  "Q2_K": 0.5258, "IQ4_XS": 0.5637, "IQ3_S": 0.2016, "IQ3_XXS": 0.2180, "*": 0.5966}

# Apple GPUs, llama.cpp Metal (docs/ROOFLINE.md has the sources). Anchors: tg128 of LLaMA-2-7B per chip in llama.cpp
# discussion #4167 (F16, Q8_0, Q4_0 t/s); a type's efficiency = bytes read per token (our byte count of that
# llama-quantize mix, at the mean context 64) × tokens/s / bandwidth. Other types relative to Q4_0 on the same GPU,
# from the tg128 figures in the PRs that brought them to Metal (30-core M2 Max): IQ4_XS #5747, IQ3_S #5829,
# IQ2_XXS #4773, Q2_K #1762, Q4_K #1733, Q3_K #2307 (one family's i-quants share their decoder's cost: IQ2_XS,
# IQ2_S, IQ1_* as IQ2_XXS; IQ3_XXS as IQ3_S); K-quants from Q4_K up as Q4_0.
TG128_4167 = {"m1-pro": ("Apple M1 Pro 16-core GPU (200 GB/s), llama.cpp Metal", 200.0, 12.75, 22.34, 36.41),
              "m2-max": ("Apple M2 Max 30-core GPU (400 GB/s), llama.cpp Metal", 400.0, 24.16, 39.97, 60.99),
              "m3-max": ("Apple M3 Max 40-core GPU (400 GB/s), llama.cpp Metal", 400.0, 25.09, 42.75, 66.31)}
METAL_VS_Q4_0 = {"IQ4_XS": 0.81, "IQ4_NL": 0.81, "IQ3_S": 0.61, "IQ3_XXS": 0.61, "IQ2_S": 0.40, "IQ2_XS": 0.40,
                 "IQ2_XXS": 0.40, "IQ1_M": 0.40, "IQ1_S": 0.40, "Q2_K": 0.74, "Q3_K": 0.60}
ANCHOR_CTX = 64                       # tg128 from an empty context: the mean context of its tokens


@functools.cache
def _anchor_bytes(ftype: str) -> int:
    """Bytes a LLaMA-2-7B file of llama-quantize's `ftype` reads per token at tg128's mean context."""
    spec = shape_spec("llama-2-7b")
    mix = ftype if ftype == "F16" else f"llama.cpp:{ftype}"
    return plan_token_bytes(spec, mix_types(spec, mix, imatrix=False), ANCHOR_CTX).total


def anchor_efficiency(ftype: str, tokens_per_s: float, bandwidth: float) -> float:
    """The fraction of `bandwidth` a LLaMA-2-7B file of llama-quantize's `ftype` moved at `tokens_per_s`."""
    return _anchor_bytes(ftype) * tokens_per_s / (bandwidth * GB)


def _metal(name: str) -> Device:
    description, bw, f16, q8, q4 = TG128_4167[name]
    e16, e8, e4 = (anchor_efficiency(t, v, bw) for t, v in (("F16", f16), ("Q8_0", q8), ("Q4_0", q4)))
    eff = {"*": e4, "F32": e16, "F16": e16, "BF16": e16, "Q8_0": e8, "Q4_0": e4,
           **{t: e4 * f for t, f in METAL_VS_Q4_0.items()}}
    return Device(name, description, bw, eff, e16, f"cited: llama.cpp discussion #4167 (LLaMA-2-7B tg128 F16 / "
                  f"Q8_0 / Q4_0 {f16} / {q8} / {q4} t/s) and each type's Metal PR (docs/ROOFLINE.md)")


# llama.cpp CUDA decode on one H100 80GB HBM3 (llama-cpp-python 0.3.36's llama.cpp, llama-bench tg128, FlashAttention
# kernels not built): `benchmarks/decode_gpu.py --roofline` (benchmarks/results/decode_gpu_s15-h100-roofline-b.json;
# tests/test_roofline.py checks these against it). Fixed costs from 256-wide models of 4 and 28 blocks; each type's
# fraction of the 3.35 TB/s from synthetic files of that type alone at the 1.5B / 7B / 32B widths: a GPU's GEMV
# reaches less on narrow matrices. Types not measured (F16, the i-quants) take Q4_K's fraction at the 7B width.
H100_FIXED = (9.3790e-05, 3.1408e-05)           # seconds per token, seconds per executed block
H100_BY_HIDDEN = {
    "Q2_K": ((1536, 0.1621), (3584, 0.2486), (5120, 0.2756)),
    "Q3_K": ((1536, 0.1326), (3584, 0.1959), (5120, 0.2263)),
    "Q4_K": ((1536, 0.3112), (3584, 0.4242), (5120, 0.4847)),
    "Q5_K": ((1536, 0.3262), (3584, 0.4586), (5120, 0.4978)),
    "Q6_K": ((1536, 0.2926), (3584, 0.3928), (5120, 0.4752)),
    "Q8_0": ((1536, 0.3453), (3584, 0.5866), (5120, 0.6590)),
}


def cuda_device(name: str, description: str, bandwidth: float, source: str, fixed=H100_FIXED,
                by_hidden=H100_BY_HIDDEN) -> Device:
    """A GPU entry from fixed costs (per token, per block) and efficiencies by width; its flat table (used when no
    width is known, and for the types not measured: "*" = Q4_K) is the 7B width's (hidden 3584)."""
    flat = {t: dict(v)[3584] for t, v in by_hidden.items() if 3584 in dict(v)}
    flat["*"] = flat["Q4_K"]
    return Device(name, description, bandwidth, flat, flat["*"], source, *fixed, by_hidden=by_hidden)


DEVICES: dict[str, Device] = {
    "this-cpu": Device(
        "this-cpu", "this machine's CPU, llama.cpp CPU backend (copy bandwidth measured now)",
        None, CPU_EFFICIENCY, 1.0,
        "measured on the project's 2-core x86 machine: benchmarks/results/decode_speed_cpu.json"),
    "h100": cuda_device("h100", "NVIDIA H100 SXM (3.35 TB/s HBM3), llama.cpp CUDA", 3350.0,
                  "measured on one H100 80GB HBM3: benchmarks/results/decode_gpu_s15-h100-roofline-b.json"),
    # not measured on an H200 with this method: the H100's fixed costs and fractions at the H200's bandwidth (same
    # Hopper kernels); the one H200 decode on record (decode_gpu_h200.json, 1.5B-shaped Q2_K file, 477.7 t/s) is
    # 0.85 of what this entry predicts
    "h200": cuda_device("h200", "NVIDIA H200 (4.8 TB/s HBM3e), llama.cpp CUDA", 4800.0,
                  "the H100's measured figures at the H200's bandwidth (decode_gpu_s15-h100-roofline-b.json); "
                  "one H200 decode on record: 0.85 of the prediction"),
}


@dataclass
class TokenBytes:
    """What one generated token reads."""
    weights: dict[str, int] = field(default_factory=dict)    # GGML type -> weight bytes read per token
    kv: int = 0                                               # KV cache bytes read at the context
    stored: int = 0                                           # weight bytes in the file (each tensor once)
    repeated: int = 0                                         # of `weights`: the extra passes of duplicated blocks
    ctx: int = 0
    blocks: int = 0                                           # block executions per token
    hidden: int = 0                                           # the model's width (for Device.by_hidden)

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.kv


def token_bytes(spec, layout, info, ctx: int) -> TokenBytes:
    """Bytes read per token at context `ctx` for a model of `spec` run in `layout`; `info(name)` -> (GGML type
    name, bytes of that tensor in the file)."""
    if ctx < 0:
        raise TwinquantError(f"roofline: the context must be 0 or more, got {ctx}")
    tb = TokenBytes(ctx=ctx, hidden=spec.hidden)

    def add(name: str, fraction: float = 1.0, repeat: bool = False) -> None:
        t, n = info(name)
        b = int(round(n * fraction))
        tb.weights[t] = tb.weights.get(t, 0) + b
        if repeat:
            tb.repeated += b

    for name in roles.global_tensor_names(spec):
        tb.stored += info(name)[1]
    for layer in range(spec.n_layers):
        for name in roles.block_tensor_names(spec, layer):
            tb.stored += info(name)[1]
    embd = roles.name(roles.T.TOKEN_EMBD)
    add(embd, 1.0 / spec.vocab)                                  # one row per token
    add(roles.name(roles.T.OUTPUT_NORM))
    add(embd if spec.tied_embeddings else roles.name(roles.T.OUTPUT))
    executed: set[int] = set()
    kv_per_position = (2 * (spec.kv_lora_rank + spec.rope_dim) if spec.mla
                       else 2 * spec.n_kv_heads * (spec.head_dim + (spec.v_head_dim or spec.head_dim)))
    for slot in layout.slots:
        for _ in slot.copies():
            repeat = slot.block in executed
            executed.add(slot.block)
            for name in roles.block_tensor_names(spec, slot.block):
                share = spec.n_experts_used / spec.n_experts if roles.is_expert_stack(name) else 1.0
                add(name, share, repeat)
            tb.kv += kv_per_position * ctx
            tb.blocks += 1
    return tb


def file_token_bytes(model, ctx: int) -> TokenBytes:
    """`token_bytes` of a loaded (lazy) model: the types and sizes its file holds."""
    if model.source is None:
        raise TwinquantError("roofline: the model has no file behind it")

    def info(name: str) -> tuple[str, int]:
        i = model.source.info(name)
        return i.source_type, i.nbytes

    return token_bytes(model.spec, model.layout, info, ctx)


def plan_token_bytes(spec, types: dict[str, str], ctx: int) -> TokenBytes:
    """`token_bytes` of a model not made yet: each tensor's bytes from its shape and planned GGML type."""
    import gguf

    from twinquant.model.layout import Layout

    def info(name: str) -> tuple[str, int]:
        t = types[name]
        shape = roles.expected_shape(spec, name)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
        if shape[-1] % block:
            raise TwinquantError(f"roofline: {name} has rows of {shape[-1]}, not whole {t} blocks of {block}")
        return t, math.prod(shape) // block * size

    return token_bytes(spec, Layout.sequential(spec.n_layers), info, ctx)


def copy_bandwidth(seconds: float = 1.0, mib: int = 512) -> float:
    """GB/s of a large copy on this CPU (read + write counted, as STREAM's copy does), the best of repeats."""
    a = torch.ones(mib * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best, t_end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / GB


@dataclass
class Prediction:
    device: Device
    bandwidth: float                  # GB/s used
    tb: TokenBytes
    seconds: dict[str, float]         # per GGML type (and "KV"): expected seconds per token

    @property
    def bound_tps(self) -> float:
        """Tokens/s if every byte moved at the full bandwidth."""
        return self.bandwidth * GB / self.tb.total

    @property
    def expected_tps(self) -> float:
        return 1.0 / sum(self.seconds.values())

    def rows(self) -> list[tuple[str, float, float, float]]:
        """(type, MB read per token, efficiency, ms per token), largest first."""
        out = [(t, b / 1e6, self.device.eff(t, self.tb.hidden), 1e3 * self.seconds[t])
               for t, b in self.tb.weights.items()]
        out.sort(key=lambda r: -r[1])
        if self.tb.kv:
            out.append(("KV cache (F16)", self.tb.kv / 1e6, self.device.kv_efficiency, 1e3 * self.seconds["KV"]))
        if "fixed" in self.seconds:
            out.append((f"fixed costs ({self.tb.blocks} blocks)", 0.0, math.nan, 1e3 * self.seconds["fixed"]))
        return out

    def to_dict(self) -> dict:
        return {"device": self.device.name, "description": self.device.description, "source": self.device.source,
                "bandwidth_gbs": self.bandwidth, "ctx": self.tb.ctx, "blocks": self.tb.blocks,
                "bytes_per_token": self.tb.total,
                "weights_by_type": self.tb.weights, "kv_bytes": self.tb.kv, "stored_weight_bytes": self.tb.stored,
                "repeated_bytes": self.tb.repeated, "bound_tps": self.bound_tps, "expected_tps": self.expected_tps,
                "ms_by_type": {k: 1e3 * v for k, v in self.seconds.items()}}


def predict(tb: TokenBytes, device: str | Device, bandwidth: float | None = None) -> Prediction:
    """Expected decode speed of what `tb` reads on `device` (a name of `DEVICES`); `bandwidth` overrides its
    GB/s (this-cpu measures a copy when none is given)."""
    if isinstance(device, str):
        if device not in DEVICES:
            raise TwinquantError(f"roofline: unknown device {device!r} (known: {', '.join(DEVICES)})")
        device = DEVICES[device]
    bw = bandwidth or device.bandwidth or copy_bandwidth()
    if not bw > 0:
        raise TwinquantError(f"roofline: the bandwidth must be positive, got {bw}")
    sec = {t: b / (bw * GB * device.eff(t, tb.hidden)) for t, b in tb.weights.items()}
    if tb.kv:
        sec["KV"] = tb.kv / (bw * GB * device.kv_efficiency)
    if device.per_token or device.per_block:
        sec["fixed"] = device.per_token + tb.blocks * device.per_block
    return Prediction(device, bw, tb, sec)


# Models by their published shapes (config.json of the releases), for predictions before a file exists
SHAPES: dict[str, dict] = {
    "llama-2-7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
    "qwen2.5-32b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
                    "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                    "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "qwen2.5-coder-1.5b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
                           "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
}


def shape_spec(name: str):
    from twinquant.io.hf import spec_from_hf_config

    if name not in SHAPES:
        raise TwinquantError(f"roofline: unknown shape {name!r} (known: {', '.join(SHAPES)})")
    return spec_from_hf_config({"rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768,
                                "hidden_act": "silu", **SHAPES[name]})


def mix_types(spec, mix: str, imatrix: bool = True) -> dict[str, str]:
    """Each tensor's GGML type name in llama-quantize's mix `mix` (e.g. llama.cpp:IQ2_XS), made with an imatrix
    or without."""
    from twinquant.allocation.mixes import type_name
    from twinquant.allocation.role_mix import assign as assign_types

    names = roles.all_tensor_names(spec)
    if mix.upper() in ("F16", "BF16", "F32"):           # a float file: 1-D tensors stay F32, as the writers do
        return {n: mix.upper() if len(roles.expected_shape(spec, n)) > 1 else "F32" for n in names}
    return {c.name: type_name(c.type) for c in assign_types(spec, names, mix=mix, imatrix=imatrix)}


def n_weights(spec) -> int:
    return sum(math.prod(roles.expected_shape(spec, n)) for n in roles.all_tensor_names(spec))


def format_report(what: str, tb: TokenBytes, n_params: int, predictions: list[Prediction]) -> str:
    """The per-type table (of the first device) and one line per device: what `twinquant roofline` prints."""
    first = predictions[0]
    lines = [f"{what}: {8 * tb.stored / n_params:.3f} bits per weight stored ({tb.stored / 1e9:.2f} GB of "
             f"weights); per generated token at context {tb.ctx}: {tb.total / 1e9:.3f} GB read"
             + (f" (of which {tb.repeated / 1e9:.3f} GB re-read by duplicated blocks)" if tb.repeated else ""), "",
             f"| read per token | MB | efficiency on {first.device.name} | ms on {first.device.name} |",
             "|---|---|---|---|"]
    lines += [f"| {t} | {mb:.1f} | {'-' if math.isnan(e) else f'{e:.2f}'} | {ms:.2f} |"
              for t, mb, e, ms in first.rows()]
    lines += ["", "| device | bandwidth GB/s | bandwidth-bound tokens/s | expected tokens/s | figures from |",
              "|---|---|---|---|---|"]
    lines += [f"| {p.device.description} | {p.bandwidth:.1f} | {p.bound_tps:.1f} | {p.expected_tps:.1f} | "
              f"{p.device.source} |" for p in predictions]
    return "\n".join(lines)


# the Apple entries need the mix rules and shapes above
DEVICES.update({name: _metal(name) for name in TG128_4167})
