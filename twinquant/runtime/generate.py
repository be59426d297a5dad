"""Text generation with the KV cache: greedy or sampled (temperature, top-k, top-p, seed), streamed."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from twinquant.model.forward import KVCache, forward
from twinquant.model.model import Model
from twinquant.runtime import graph_decode


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0      # 0 -> greedy
    top_k: int = 0                # 0 -> off
    top_p: float = 1.0            # 1 -> off
    seed: int = 0


def pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    """Next token from a [vocab] float32 logit vector."""
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if s.top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = sp.cumsum(-1) - sp < s.top_p          # smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def generate(model: Model, prompt: list[int], max_new: int, sampling: Sampling = Sampling(),
             use_cache: bool = True, stop: frozenset[int] = frozenset(), graphs: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time; stops after `max_new` or at a token in `stop`. With the cache on a CUDA
    device (`graphs`), the steps after the prompt replay one CUDA graph (`graph_decode.GraphStep`)."""
    gen = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt)
    cache = KVCache.empty(model, 1, len(ids) + max_new) if use_cache else None
    feed = ids
    step = None
    for i in range(max_new):
        if step is not None:
            logits = step(feed[0])
        else:
            logits = forward(model, torch.tensor([feed]), cache=cache, logits_for=slice(-1, None))[0, -1]
        if i == 0 and use_cache and graphs and max_new > 2 and graph_decode.graph_ready(model) is None:
            try:
                step = graph_decode.GraphStep(model, cache)
            except Exception as e:      # a step that cannot be captured still decodes, eagerly, and says so
                warnings.warn(f"decoding without a CUDA graph: the step could not be captured "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
        nxt = pick(logits, sampling, gen)
        yield nxt
        if nxt in stop:
            return
        ids.append(nxt)
        feed = [nxt] if use_cache else ids


def stream_text(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Decoded text pieces as tokens arrive; holds back an incomplete UTF-8 sequence until it completes."""
    seen: list[int] = []
    printed = ""
    for i in ids:
        seen.append(i)
        text = tokenizer.decode(seen)
        if text.endswith("\ufffd"):
            continue
        yield text[len(printed):]
        printed = text
