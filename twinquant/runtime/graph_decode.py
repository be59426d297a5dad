"""A decode step as one CUDA graph: the step's hundreds of torch and Triton launches recorded once and replayed
per token, so the GPU no longer waits on Python between kernels (llama.cpp's CUDA backend does the same).

A graph replays fixed shapes and addresses, so the step reads its token and position from device tensors and
attends over the whole preallocated KV cache under a mask (`KVCache.at`); the host only fills those two tensors,
replays, and reads the logits. Models whose step syncs with the host (routed experts pick their tokens on the
host) run eagerly.
"""

from __future__ import annotations

import torch

from twinquant.model.forward import KVCache, forward
from twinquant.model.model import Model


def graph_ready(model: Model) -> str | None:
    """None when a decode step of `model` can be captured, else why not (one line)."""
    if model.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if any(model.spec.moe_layer(i) for i in range(model.spec.n_layers)):
        return "routed experts choose their tokens on the host"
    return None


class GraphStep:
    """`step(token)` = forward(model, [[token]], cache) logits [vocab] at the cache's position, replayed from one
    CUDA graph; the cache advances as with forward. Capture runs the step a few times on a side stream first (the
    kernels compile, the RoPE table reaches the cache's length), writing only at the position the first real step
    overwrites."""

    def __init__(self, model: Model, cache: KVCache, warmup: int = 2):
        why = graph_ready(model)
        if why:
            raise ValueError(f"graph decode: {why}")
        dev = model.device
        self.cache = cache
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        cache.at = torch.full((), cache.pos, dtype=torch.long, device=dev)
        pos = cache.pos
        try:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    forward(model, self.token, cache=cache, logits_for=slice(-1, None))
                    cache.pos = pos
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = forward(model, self.token, cache=cache, logits_for=slice(-1, None))
        except Exception:
            cache.at = None
            raise
        finally:
            cache.pos = pos

    def __call__(self, token: int) -> torch.Tensor:
        if self.cache.pos >= self.cache.max_len:
            raise ValueError(f"KV cache holds {self.cache.max_len} positions")
        self.token.fill_(token)
        self.cache.at.fill_(self.cache.pos)
        self.graph.replay()
        self.cache.pos += 1
        return self.logits[0, -1]
