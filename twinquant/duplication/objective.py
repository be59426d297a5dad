"""The quantity every duplication decision minimises: KL divergence to the reference on calibration windows.

Calibration windows only (never the evaluation text). The reference's log-probabilities are computed once and
kept in float16 ([windows, ctx, vocab]); each candidate configuration costs one forward over the windows.
"""

from __future__ import annotations

import torch

from twinquant.model.forward import forward


def log_probs(model, windows: torch.Tensor) -> torch.Tensor:
    """float16 log-probs of every position of every window: [n, ctx, vocab]."""
    out = [torch.log_softmax(forward(model, windows[i: i + 1])[0].float(), -1).half() for i in range(len(windows))]
    return torch.stack(out)


class KLDObjective:
    """`objective(model)` = mean KL(reference ‖ model) over all positions of the calibration windows."""

    def __init__(self, reference, windows: torch.Tensor):
        self.windows = windows
        self.ref = log_probs(reference, windows) if not isinstance(reference, torch.Tensor) else reference
        self.calls = 0

    def __call__(self, model) -> float:
        self.calls += 1
        total, n = 0.0, 0
        for i in range(len(self.windows)):
            lp = torch.log_softmax(forward(model, self.windows[i: i + 1])[0].float(), -1)
            ref = self.ref[i].float()
            total += float((ref.exp() * (ref - lp)).sum(-1).sum())
            n += lp.shape[0]
        return total / n
