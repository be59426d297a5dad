"""Massive activations: a few tokens (often the first, or delimiters) whose residual-stream values are orders of
magnitude above the rest, in a few channels (Sun et al. 2024, arXiv 2402.17762). DFRot weights them up when
optimizing rotations; activation quantization must keep them apart.

Detection, per layer (the residual stream entering each slot, and the final one): the threshold is
`factor × the 99.9th percentile of |x|` (percentile configurable); a token is flagged where its largest |x|
exceeds the threshold, and the channel holding that value is recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twinquant.model.forward import forward
from twinquant.progress import Progress


@dataclass
class LayerStats:
    layer: int
    threshold: float
    p_value: float            # the percentile of |x| (median over windows)
    rms: float
    max: float
    flagged: list[dict] = field(default_factory=list)   # {window, position, token, channel, value}


@dataclass
class MassiveReport:
    percentile: float
    factor: float
    layers: list[LayerStats]

    def flagged_tokens(self, layer: int) -> torch.Tensor:
        """Bool mask over (window, position) pairs flagged in `layer`, as a list of (w, p) tuples."""
        return [(f["window"], f["position"]) for f in self.layers[layer].flagged]

    @property
    def any(self) -> bool:
        return any(s.flagged for s in self.layers)

    def channels(self) -> list[int]:
        return sorted({f["channel"] for s in self.layers for f in s.flagged})

    def positions(self) -> dict[int, int]:
        """How often each token position is flagged (over layers and windows)."""
        out: dict[int, int] = {}
        for s in self.layers:
            for f in s.flagged:
                out[f["position"]] = out.get(f["position"], 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"percentile": self.percentile, "factor": self.factor,
                "channels": self.channels(), "positions": self.positions(),
                "layers": [s.__dict__ for s in self.layers]}

    def write_json(self, path: str | os.PathLike) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, p)

    def table(self) -> str:
        lines = [f"{'layer':>5} {'rms':>9} {'p' + str(self.percentile):>9} {'max':>10} {'max/rms':>8} {'flagged':>7}"
                 "  top (position:channel=value)"]
        for s in self.layers:
            top = sorted(s.flagged, key=lambda f: -abs(f["value"]))[:3]
            desc = ", ".join(f"{f['position']}:{f['channel']}={f['value']:.0f}" for f in top)
            lines.append(f"{s.layer:>5} {s.rms:>9.3f} {s.p_value:>9.3f} {s.max:>10.2f} {s.max / s.rms:>8.1f} "
                         f"{len(s.flagged):>7}  {desc}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
        xs = [s.layer for s in self.layers]
        a.semilogy(xs, [s.max for s in self.layers], "o-", label="max |x|")
        a.semilogy(xs, [s.threshold for s in self.layers], "--", label=f"threshold ({self.factor}× p{self.percentile})")
        a.semilogy(xs, [s.rms for s in self.layers], label="rms")
        a.set_xlabel("layer (residual stream entering it)")
        a.set_ylabel("magnitude")
        a.legend(fontsize=8)
        pos = self.positions()
        b.bar([str(k) for k in pos][:30], list(pos.values())[:30])
        b.set_xlabel("token position")
        b.set_ylabel("flagged (layers × windows)")
        b.set_title("flagged tokens")
        fig.tight_layout()
        p = Path(path)
        fig.savefig(p, dpi=110)
        plt.close(fig)


def detect_massive(model, windows: torch.Tensor, percentile: float = 99.9, factor: float = 10.0,
                   progress: bool = True) -> MassiveReport:
    """Run the calibration windows [n, ctx] and flag massive activations per layer."""
    n_layers = len(model.layout) + 1
    tok_max: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]     # [ctx] per window
    tok_arg: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    pvals: list[list[float]] = [[] for _ in range(n_layers)]
    sq: list[float] = [0.0] * n_layers
    count = windows.shape[1] * model.spec.hidden

    def hook(slot: int, x: torch.Tensor) -> None:
        a = x[0].abs().float()                                            # [ctx, hidden]
        m, arg = a.max(-1)
        tok_max[slot].append(m.cpu())
        tok_arg[slot].append(arg.cpu())
        k = max(1, int(round(a.numel() * percentile / 100)))
        pvals[slot].append(a.flatten().kthvalue(k).values.item())
        sq[slot] += a.pow(2).sum().item()

    with Progress(windows.shape[0], "activations", enabled=progress) as bar:
        for i in range(windows.shape[0]):
            forward(model, windows[i: i + 1], residual_hook=hook, logits_for=slice(0, 0))
            bar.update(i + 1)
    layers = []
    for li in range(n_layers):
        p = float(torch.tensor(pvals[li]).median())
        thr = factor * p
        m = torch.stack(tok_max[li])                                      # [n, ctx]
        arg = torch.stack(tok_arg[li])
        flagged = []
        for w, pos in (m > thr).nonzero().tolist():
            flagged.append({"window": w, "position": pos, "token": int(windows[w, pos]),
                            "channel": int(arg[w, pos]), "value": float(m[w, pos])})
        rms = (sq[li] / (count * windows.shape[0])) ** 0.5
        layers.append(LayerStats(li, thr, p, rms, float(m.max()), flagged))
    return MassiveReport(percentile, factor, layers)


def massive_token_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool [tokens]: rows of x [tokens, channels] whose largest |x| exceeds the threshold."""
    return x.abs().amax(-1) > threshold


def quantize_keeping_massive(x: torch.Tensor, quantize, threshold: float, mode: str = "keep") -> torch.Tensor:
    """Activation fake-quant that treats massive tokens apart: `keep` leaves them in full precision,
    `own_scale` quantizes them on their own (so they do not set the scale of the rest, e.g. per-tensor)."""
    flat = x.reshape(-1, x.shape[-1])
    mask = massive_token_mask(flat, threshold)
    out = flat.clone()
    if (~mask).any():
        out[~mask] = quantize(flat[~mask])
    if mask.any() and mode == "own_scale":
        out[mask] = quantize(flat[mask])
    elif mode not in ("keep", "own_scale"):
        raise ValueError(f"unknown massive-activation mode {mode!r}")
    return out.reshape(x.shape)
