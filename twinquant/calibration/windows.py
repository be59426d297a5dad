"""Calibration data: token windows from a calibration text (never the evaluation text).

The default is `../shared/data/calibration/groups_merged.txt` (the text llama.cpp users feed llama-imatrix).
Windows are non-overlapping, `ctx` tokens each, BOS first where the model uses it; the text's sha256 and the
token count are returned so the result can be recorded (e.g. in GGUF metadata).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from twinquant.errors import TwinquantError

DEFAULT_CALIB = Path(__file__).resolve().parents[3] / "shared" / "data" / "calibration" / "groups_merged.txt"


@dataclass(frozen=True)
class Calibration:
    windows: torch.Tensor     # int64 [n, ctx]
    text_sha256: str
    path: str
    # int64 [h, ctx]: the windows right after `windows` in the same text, never in a Hessian (measure prices
    # candidates by KL on them); fewer than asked, or None, where the text ends first
    heldout: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.windows.numel()


def load_calibration(model, path: str | Path | None = None, n_tokens: int = 8192, ctx: int = 512,
                     heldout: int = 0) -> Calibration:
    """`n_tokens` worth of windows of `ctx` tokens from the calibration text (fewer if the text is short), and up to
    `heldout` more windows after them (`Calibration.heldout`)."""
    p = Path(path) if path else DEFAULT_CALIB
    if not p.is_file():
        raise TwinquantError(f"{p}: calibration text not found")
    if model.tokenizer is None:
        raise TwinquantError("the model has no tokenizer; cannot tokenize the calibration text")
    raw = p.read_bytes()
    ids = model.tokenizer.encode(raw.decode("utf-8", errors="replace"))
    n = min(max(n_tokens // ctx, 1), len(ids) // ctx)
    if n < 1:
        raise TwinquantError(f"{p}: {len(ids)} tokens, fewer than one window of {ctx}")
    h = min(max(heldout, 0), len(ids) // ctx - n)
    both = torch.tensor(ids[: (n + h) * ctx], dtype=torch.long).view(n + h, ctx).clone()
    tok = model.tokenizer
    if tok.add_bos and tok.bos_id is not None:
        both[:, 0] = tok.bos_id
    return Calibration(both[:n], hashlib.sha256(raw).hexdigest(), str(p), both[n:] if h else None)


def auto_tokens(spec, ctx: int = 512, per_input: int = 2, floor: int = 8192) -> int:
    """Calibration tokens for a model: `per_input` per input of its widest linear (at least `floor`), whole windows.

    A Hessian of n inputs from fewer than n tokens is singular, and GPTQ fitted to it does not carry to other
    text: on Qwen2.5-Coder-1.5B (ffn_down: 8960 inputs) the IQ2_XS fit with damp 0.01 had 1.91x llama.cpp's error
    on held-out tokens when fitted on 8192 tokens, 1.18x on 16384, 0.79x on 32768 (benchmarks/results/
    iquant_gptq_qwen15-heldout*.md, iquant_gptq_qwen15-damping-16k.md; damp 0.5 on 16384: 0.83x)."""
    # a MoE model's linears: attention, the experts (the config's dense intermediate size is no linear's width);
    # each expert sees about used/experts of the tokens, and its Hessian is completed from the pooled one
    # (calibration/blocks.py) where that is too few
    # (DeepSeek: plus its dense leading blocks' FFN and latent attention's widths)
    dense = spec.intermediate if not spec.moe or spec.n_dense_lead else 0
    widest = max(spec.hidden, spec.attn_out_dim, spec.q_lora_rank, spec.kv_lora_rank, spec.expert_ffn,
                 spec.shared_ffn, dense)
    n = max(floor, per_input * widest)
    return -(-n // ctx) * ctx


def calibration_for(cfg, model, heldout: int = 0) -> Calibration:
    """The calibration a recipe (or any object with `calib`, `calib_tokens`, `calib_ctx`) names; `calib_tokens`
    None grows with the model's widest input (`auto_tokens`). `heldout`: see `load_calibration`."""
    return load_calibration(model, cfg.calib, tokens_for(cfg, model.spec), cfg.calib_ctx, heldout)


def tokens_for(cfg, spec) -> int:
    """The token count `cfg` asks for: its `calib_tokens`, or `auto_tokens` of the model when that is None."""
    return cfg.calib_tokens if cfg.calib_tokens is not None else auto_tokens(spec, cfg.calib_ctx)
