"""Perplexity and KL divergence to a reference, under two named protocols.

- `llama.cpp` (as `llama-perplexity`): the whole text is tokenized once (BOS first where the model uses it), cut
  into windows of `ctx` tokens; where the model uses BOS, each window's first token is replaced by BOS; only the
  second half of each window is scored (logits at positions ctx/2 … ctx-2 predict the next token).
- `sliding` (as the GPTQ / QuaRot papers report): non-overlapping windows of `ctx` tokens, every next-token
  prediction in the window scored (ctx - 1 per window), no BOS inserted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.eval.logits_file import LogitsFile, LogitsWriter, bytes_needed, tokens_hash
from twinquant.eval.stats import Accumulator
from twinquant.model.forward import forward
from twinquant.progress import Progress

if TYPE_CHECKING:
    from twinquant.model.model import Model

PROTOCOLS = ("llama.cpp", "sliding")


@dataclass(frozen=True)
class Windows:
    tokens: torch.Tensor     # int64 [chunks, ctx]
    first: int               # logits rows first … ctx-2 are scored
    protocol: str

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def scored(self) -> int:
        return self.ctx - 1 - self.first

    def targets(self, i: int) -> torch.Tensor:
        return self.tokens[i, self.first + 1:]

    def describe(self) -> str:
        which = "second half" if self.protocol == "llama.cpp" else "all"
        return (f"protocol {self.protocol}: {self.tokens.shape[0]} windows of {self.ctx} tokens, "
                f"{self.scored} scored per window ({which})")


def make_windows(ids: list[int], ctx: int, chunks: int | None, protocol: str,
                 bos_id: int | None = None, add_bos: bool = False, skip: int = 0) -> Windows:
    """Cut a tokenized text (already carrying BOS first if the model adds one) into evaluation windows, after the
    first `skip` windows (the same cut as `calibration.windows.load_calibration`: window k is tokens
    k·ctx..(k+1)·ctx, so `skip` = a measurement's calibration windows scores its held-out ones)."""
    if protocol not in PROTOCOLS:
        raise TwinquantError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if ctx < 8:
        raise TwinquantError(f"context {ctx} is too small (at least 8)")
    if chunks is not None and chunks < 1:
        raise TwinquantError(f"--chunks must be positive, got {chunks}")
    if skip < 0:
        raise TwinquantError(f"--skip-chunks must not be negative, got {skip}")
    need = 2 * ctx if protocol == "llama.cpp" else ctx  # llama-perplexity asks for two windows' worth
    if len(ids) < need:
        raise TwinquantError(f"the text has {len(ids)} tokens; protocol {protocol} with ctx {ctx} needs at "
                             f"least {need}")
    n = len(ids) // ctx - skip
    if n < 1:
        raise TwinquantError(f"the text has {len(ids) // ctx} windows of {ctx} tokens; none is left after "
                             f"skipping {skip}")
    n = min(n, chunks) if chunks else n
    tokens = torch.tensor(ids[skip * ctx: (skip + n) * ctx], dtype=torch.long).view(n, ctx).clone()
    if protocol == "llama.cpp":
        if add_bos and bos_id is not None:
            tokens[:, 0] = bos_id
        return Windows(tokens, ctx // 2, protocol)
    return Windows(tokens, 0, protocol)


def windows_for_text(model: "Model", text: str, ctx: int, chunks: int | None, protocol: str,
                     skip: int = 0) -> Windows:
    tok = model.tokenizer
    if tok is None:
        raise TwinquantError("the model has no tokenizer; cannot tokenize the text")
    ids = tok.encode(text)  # BOS first where the model's tokenizer adds it
    return make_windows(ids, ctx, chunks, protocol, tok.bos_id, tok.add_bos, skip)


def window_logprobs(model: "Model", windows: Windows, i: int) -> torch.Tensor:
    """log-softmax of the scored positions of window i: float32 [scored, vocab]."""
    logits = forward(model, windows.tokens[i: i + 1], logits_for=slice(windows.first, windows.ctx - 1))[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()



def compute_logprobs(model: "Model", windows: Windows) -> LogitsFile:
    """A model's log-probs on `windows`, held in memory (float16): a reference without a file."""
    lp = np.stack([window_logprobs(model, windows, i).half().numpy() for i in range(windows.tokens.shape[0])])
    header = {"protocol": windows.protocol, "ctx": windows.ctx, "first": windows.first,
              "chunks": windows.tokens.shape[0], "scored": windows.scored, "vocab": model.spec.vocab,
              "tokens_sha256": tokens_hash(windows.tokens)}
    return LogitsFile(header, windows.tokens, lp)

def streamable(model: "Model") -> bool:
    """A lazily loaded model with the plain layout: it can be evaluated one block at a time."""
    return (model.source is not None and model.layout.is_sequential
            and (model.dup_params is None or model.dup_params.empty))


def blocks_streamed(model: "Model", tokens: torch.Tensor, hook=None, after_window=None,
                    progress: bool = False) -> list[torch.Tensor]:
    """The hidden states after the last block of every window of `tokens` [n, ctx], computed block by block: all
    windows pass block 0 (window after window, `hook` on each linear, `after_window()` after each), then block 1 …,
    each block released after use, the embedding as soon as the windows are embedded (unless tied to the head)."""
    from twinquant.model import roles
    from twinquant.model.forward import block_forward, embed

    x = [embed(model, tokens[i: i + 1]) for i in range(tokens.shape[0])]
    if not model.spec.tied_embeddings:
        model.release(roles.name(roles.T.TOKEN_EMBD))
    with Progress(model.spec.n_layers, "blocks", enabled=progress) as bar:
        for layer in range(model.spec.n_layers):
            for i in range(len(x)):
                x[i] = block_forward(model, layer, x[i], hook=hook)
                if after_window is not None:
                    after_window()
            model.release_block(layer)
            bar.update(layer + 1)
    return x


class StreamedLogprobs:
    """The scored positions' log-probs of every window, computed block by block: all windows pass block 0, then
    block 1 … (each block released after use), so a model larger than memory is evaluated with one block plus
    the windows' hidden states ([n, ctx, hidden]) in memory. The arithmetic per window is the forward's."""

    def __init__(self, model: "Model", windows: Windows, progress: bool = False):
        self.model, self.windows = model, windows
        self.hidden = blocks_streamed(model, windows.tokens, progress=progress)

    def __call__(self, i: int) -> torch.Tensor:
        from twinquant.model.forward import head

        w = self.windows
        logits = head(self.model, self.hidden[i][:, w.first: w.ctx - 1])[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def evaluate(model: "Model", windows: Windows, ref: "Model | LogitsFile | None" = None,
             save_logprobs: str | None = None, progress: bool = True, stream: bool | None = None) -> dict:
    """Perplexity of `model` on `windows`; with `ref`, also KLD / Δp / same-top against the reference.

    `ref` is a second model (run window by window alongside) or saved reference log-probs. With
    `save_logprobs`, this model's log-probs are written for later use as a reference. `stream` (default: when
    the model is lazily loaded with the plain layout) evaluates block by block (`StreamedLogprobs`).
    """
    if isinstance(ref, LogitsFile):
        h = ref.header
        if (h["protocol"], h["ctx"], h["first"]) != (windows.protocol, windows.ctx, windows.first):
            raise TwinquantError(f"reference log-probs were saved with protocol {h['protocol']} ctx {h['ctx']}; "
                                 f"this run uses {windows.protocol} ctx {windows.ctx}")
        if h["chunks"] < windows.tokens.shape[0]:
            windows = Windows(windows.tokens[: h["chunks"]], windows.first, windows.protocol)
        if tokens_hash(windows.tokens) != tokens_hash(ref.windows[: windows.tokens.shape[0]]):
            raise TwinquantError("reference log-probs were computed on different tokens (text or tokenizer)")
        if h["vocab"] != model.spec.vocab:
            raise TwinquantError(f"reference vocab {h['vocab']} != model vocab {model.spec.vocab}")
    n = windows.tokens.shape[0]
    if stream is None:
        stream = streamable(model)
    logprobs = StreamedLogprobs(model, windows, progress) if stream else (
        lambda i: window_logprobs(model, windows, i))
    ref_logprobs = None
    if isinstance(ref, LogitsFile):
        ref_logprobs = ref.chunk
    elif ref is not None:
        ref_logprobs = StreamedLogprobs(ref, windows, progress) if stream and streamable(ref) else (
            lambda i: window_logprobs(ref, windows, i))
    writer = None
    if save_logprobs:
        writer = LogitsWriter(save_logprobs, {"protocol": windows.protocol, "ctx": windows.ctx, "chunks": n,
                                              "first": windows.first, "scored": windows.scored,
                                              "vocab": model.spec.vocab}, windows.tokens)
    nll_sum = nll2_sum = 0.0
    ref_nll_sum = 0.0
    count = 0
    acc = Accumulator() if ref is not None else None
    t0 = time.perf_counter()
    try:
        with Progress(n, "perplexity", enabled=progress) as bar:
            for i in range(n):
                lp = logprobs(i)
                tgt = windows.targets(i)
                nll = -lp.gather(1, tgt[:, None])[:, 0].double()
                nll_sum += nll.sum().item()
                nll2_sum += nll.pow(2).sum().item()
                count += nll.numel()
                if writer is not None:
                    writer.add(lp)
                if acc is not None:
                    rlp = ref_logprobs(i)
                    ref_nll_sum -= rlp.gather(1, tgt[:, None]).double().sum().item()
                    acc.add(lp, rlp, tgt)
                bar.update(i + 1, f"PPL {math.exp(nll_sum / count):.4f}")
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    mean = nll_sum / count
    var = max(nll2_sum / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    result = {
        "protocol": windows.protocol, "ctx": windows.ctx, "chunks": n, "tokens_scored": count,
        "nll": mean, "ppl": ppl, "ppl_err": ppl * math.sqrt(var / max(count - 1, 1)),
        "seconds": time.perf_counter() - t0,
    }
    if acc is not None:
        result["ref_ppl"] = math.exp(ref_nll_sum / count)
        result.update(acc.summary())
    return result


def logprob_file_size(windows: Windows, vocab: int) -> int:
    return bytes_needed(windows.tokens.shape[0], windows.scored, vocab)
