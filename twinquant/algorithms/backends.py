"""Weight quantizers behind one call: `get_quantizer("gptq", {"act_order": True}).quantize_weight(W, codec, H)`.

A quantizer decides integer codes for one weight matrix in a codec's format; the registry is explicit (no
plug-in discovery) and every configuration is a small versioned dataclass that round-trips through a dict (it is
recorded next to the exported model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from twinquant.errors import TwinquantError
from twinquant.algorithms.config import Config
from twinquant.algorithms.gptq import gptq, gptq_many
from twinquant.algorithms.gptq_blocks import gptq_blocks
from twinquant.algorithms.hqq_backend import HQQQuantizer       # hqq itself is imported only when used
from twinquant.algorithms.rtn import has_clip_hook, rtn
from twinquant.formats.ggml import libggml


@dataclass(frozen=True)
class RTNConfig(Config):
    clip_search: bool = True         # MSE-optimal clipping per group (integer grids; GGML codecs search themselves)


@dataclass(frozen=True)
class GPTQConfig(Config):
    block_size: int = 128            # columns per lazy batch update
    damp: float = 0.01               # fraction of mean(diag H) added to the diagonal
    act_order: bool = False          # columns by descending H_ii (needs static_groups for grouped formats)
    static_groups: bool = False      # fit every block's parameters up front on the original W
    clip_search: bool = True         # fit each block with RTN's clip search (far better at 2-3 bits)

    def __post_init__(self):
        if self.block_size < 1 or self.damp < 0:
            raise TwinquantError("GPTQConfig: block_size must be >= 1 and damp >= 0")


class Quantizer(Protocol):
    name: str
    needs_hessian: bool
    config: object

    def quantize_weight(self, W: torch.Tensor, codec, H: torch.Tensor | None = None,
                        importance: torch.Tensor | None = None) -> tuple[torch.Tensor, list, torch.Tensor]:
        """(codes [rows, cols] for codec.pack, per-block params, dequantized float32 W_hat)."""


class RTNQuantizer:
    name = "rtn"
    needs_hessian = False
    Config = RTNConfig

    def __init__(self, config: RTNConfig | None = None):
        self.config = config or RTNConfig()

    def quantize_weight(self, W, codec, H=None, importance=None):
        return rtn(W, codec, importance=importance, clip_search=self.config.clip_search)


class GPTQQuantizer:
    name = "gptq"
    needs_hessian = True
    Config = GPTQConfig

    def __init__(self, config: GPTQConfig | None = None):
        self.config = config or GPTQConfig()

    def quantize_weight(self, W, codec, H=None, importance=None):
        if H is None:
            raise TwinquantError("gptq needs the layer's input Hessian (calibration data)")
        r = gptq(W, H, codec, importance=importance, **asdict(self.config))
        return r.codes, r.params, r.dequantized


QUANTIZERS = {"rtn": RTNQuantizer, "gptq": GPTQQuantizer, "hqq": HQQQuantizer}


def get_quantizer(name: str, config=None) -> Quantizer:
    """The quantizer `name` with `config` (its Config dataclass, a dict of its settings, or None for defaults)."""
    cls = QUANTIZERS.get(name)
    if cls is None:
        raise TwinquantError(f"unknown quantizer {name!r} (known: {', '.join(QUANTIZERS)})")
    if config is None or isinstance(config, dict):
        config = cls.Config.from_dict(config)
    elif not isinstance(config, cls.Config):
        raise TwinquantError(f"{name}: expected a {cls.Config.__name__}, got {type(config).__name__}")
    return cls(config)


def quantize_to_format(quantizer: Quantizer, W: torch.Tensor, codec, H: torch.Tensor | None = None,
                       importance: torch.Tensor | None = None):
    """(GGML bytes uint8 [rows, bytes_per_row], or None for integer grids; dequantized float32 W) of W in `codec`.

    Codecs decided a block at a time (the i-quants, `codec.blockwise`) have no per-weight codes: RTN is their
    own llama.cpp search, GPTQ is block LDLQ (`gptq_blocks`). A type llama.cpp quantizes only with an imatrix
    gets uniform weights where there is no importance at all (a tensor no calibration input reaches)."""
    if getattr(codec, "blockwise", False):
        if importance is None and codec.needs_imatrix:
            importance = torch.ones(W.shape[1], device=W.device)
        if quantizer.name == "gptq":
            if H is None:
                raise TwinquantError("gptq needs the layer's input Hessian (calibration data)")
            r = gptq_blocks(W, H, codec, damp=quantizer.config.damp, importance=importance)
            return r.data, r.dequantized
        if quantizer.name == "rtn":
            data = codec.quantize_bytes(W, importance)
            # dequantized where W lives (iq_dequant): the bytes go to the device, not the values to the host
            return data, codec.dequantize_bytes(torch.from_numpy(data).to(W.device), W.shape[1])
        raise TwinquantError(f"{quantizer.name} cannot quantize into {codec.name} (use gptq or rtn)")
    ggml_type = getattr(codec, "ggml_type", None)
    if (quantizer.name == "rtn" and ggml_type is not None and libggml.usable(W) and not has_clip_hook(codec)
            and (importance is None or getattr(codec, "libggml_imatrix", True))):
        # RTN into a GGML type is llama.cpp's own search: on a CPU, libggml computes the same bytes much faster
        # (the 151936x1536 embedding of a 1.5B model in Q2_K: minutes in the torch codec)
        from twinquant.formats.ggml import dequantize_bytes

        data = libggml.quantize_rows(ggml_type, W, importance)
        hat = torch.from_numpy(dequantize_bytes(data, ggml_type)).reshape(W.shape)
        return data, hat
    codes, params, hat = quantizer.quantize_weight(W, codec, H=H, importance=importance)
    data = codec.pack(codes, params) if ggml_type is not None else None
    return data, hat


# experts swept together by gptq_many: their Hessians, factors and working copies, ~ (2·cols² + 6·rows·cols) float32
# each (measured: 64 experts of 1408 x 2048 on the CPU, 105 MB each; DeepSeek-V3's 2048 x 7168 on an H200, 800 MB)
EXPERT_BATCH_BYTES = 4 * 2**30
# on a GPU the sweep is launch-bound: DeepSeek-V3's 2048 x 7168 Q2_K experts took 0.132 s each 32 at a time and
# 0.474 s 8 at a time on an H200 (benchmarks/results/gptq_many_speed_h200-v3-gate.md), so batches take up to a
# quarter of the free memory (at most 32 GiB)
GPU_EXPERT_BATCH_MAX = 32 * 2**30


def expert_batch_bytes(device) -> int:
    """Bytes one gptq_many batch of experts may use on `device`."""
    if torch.device(device).type != "cuda":
        return EXPERT_BATCH_BYTES
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(EXPERT_BATCH_BYTES, min(GPU_EXPERT_BATCH_MAX, free // 4))


def experts_per_batch(rows: int, cols: int, device) -> int:
    """Experts of [rows, cols] one gptq_many batch takes on `device` (its temporaries: about 2·cols² + 6·rows·cols
    floats an expert, measured on the CPU)."""
    return max(1, expert_batch_bytes(device) // (4 * (2 * cols * cols + 6 * rows * cols)))


def quantize_experts_to_format(quantizer: Quantizer, W: torch.Tensor, codec, hessians, importance=None):
    """Yields (bytes or None, dequantized float32) of each expert of a stacked W [experts, rows, cols] in order,
    each with its own Hessian (`hessians[e]`: a list, or `calibration.blocks.ExpertHessians`, which may build them
    a chunk at a time as they are asked for) and importance (`importance` [experts, cols], e.g. an imatrix file's
    per-expert data; by default the Hessian's diagonal), as `quantize_to_format` gives them one by one. GPTQ into
    a format with per-weight codes sweeps many experts at once (`gptq_many`: the same codes, one launch per column
    for all of them)."""
    n, rows, cols = W.shape
    Hs = hessians if hessians is not None else [None] * n

    def imp(e):
        if importance is not None:
            return importance[e].to(W.device, torch.float32)
        if hessians is None:
            return None
        diag = getattr(Hs, "diagonal", None)
        return diag(e).to(W.device) if diag is not None else torch.diagonal(Hs[e]).clone()

    cfg = getattr(quantizer, "config", None)
    if not (quantizer.name == "gptq" and hessians is not None and not getattr(codec, "blockwise", False)
            and not cfg.act_order and not cfg.static_groups):
        for e in range(n):
            yield quantize_to_format(quantizer, W[e], codec, H=Hs[e], importance=imp(e))
        return
    ggml_type = getattr(codec, "ggml_type", None)
    step = experts_per_batch(rows, cols, W.device)
    bound = getattr(Hs, "chunk", 0) or n       # a batch stays within one chunk of lazily built Hessians
    e0 = 0
    while e0 < n:
        e1 = min(n, e0 + step, (e0 // bound + 1) * bound)
        res = gptq_many(W[e0:e1], torch.stack([H.to(W.device) for H in Hs[e0:e1]]), codec,
                        block_size=cfg.block_size, damp=cfg.damp,
                        importance=torch.stack([imp(e) for e in range(e0, e1)]).to(W.device),
                        clip_search=cfg.clip_search)
        for r in res:
            yield codec.pack(r.codes, r.params) if ggml_type is not None else None, r.dequantized
        e0 = e1
