"""Token-level statistics for comparing a model with a reference: KL divergence, Δp, same top-1.

The report follows llama-perplexity's KL-divergence block (mean ± error, max, 99.9/99/95/90 %, median,
10/5/1/0.1 %, min; mean and RMS Δp; "same top p"), because people compare these numbers across tools.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def token_stats(logp: torch.Tensor, ref_logp: torch.Tensor, targets: torch.Tensor):
    """Per-token KLD(ref || model), Δp of the target token and same-top flags. logp: [N, V] log-softmax."""
    p_ref = ref_logp.exp()
    kld = (p_ref * (ref_logp - logp)).sum(-1).clamp_min(0)
    idx = targets[:, None]
    dp = logp.gather(1, idx).exp()[:, 0] - ref_logp.gather(1, idx).exp()[:, 0]
    same = logp.argmax(-1) == ref_logp.argmax(-1)
    return kld, dp, same


@dataclass
class Accumulator:
    kld: list[torch.Tensor] = field(default_factory=list)
    dp: list[torch.Tensor] = field(default_factory=list)
    same: list[torch.Tensor] = field(default_factory=list)

    def add(self, logp, ref_logp, targets) -> None:
        k, d, s = token_stats(logp.float(), ref_logp.float(), targets)
        self.kld.append(k.double().cpu())
        self.dp.append(d.double().cpu())
        self.same.append(s.cpu())

    def summary(self) -> dict[str, float]:
        kld, dp = torch.cat(self.kld), torch.cat(self.dp)
        same = torch.cat(self.same).double()
        n = kld.numel()
        q = lambda t, p: torch.quantile(t.float(), p).item()  # noqa: E731
        st = same.mean().item()
        out = {
            "kld_mean": kld.mean().item(),
            "kld_err": (kld.std().item() / math.sqrt(n)) if n > 1 else 0.0,
            "kld_max": kld.max().item(),
            "kld_p999": q(kld, 0.999), "kld_p99": q(kld, 0.99), "kld_p95": q(kld, 0.95), "kld_p90": q(kld, 0.90),
            "kld_median": q(kld, 0.5),
            "kld_p10": q(kld, 0.10), "kld_p5": q(kld, 0.05), "kld_p1": q(kld, 0.01), "kld_p01": q(kld, 0.001),
            "kld_min": kld.min().item(),
            "dp_mean": dp.mean().item(),
            "dp_err": (dp.std().item() / math.sqrt(n)) if n > 1 else 0.0,
            "dp_rms": dp.pow(2).mean().sqrt().item(),
            "dp_max": dp.max().item(), "dp_p99": q(dp, 0.99), "dp_median": q(dp, 0.5), "dp_p1": q(dp, 0.01),
            "dp_min": dp.min().item(),
            "same_top": st,
            "same_top_err": math.sqrt(st * (1 - st) / max(n - 1, 1)),
        }
        return out


def format_kld(s: dict[str, float]) -> str:
    """The statistics block in llama-perplexity's shape."""
    lines = [
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_err']:10.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
        f"99.9%   KLD: {s['kld_p999']:10.6f}",
        f"99.0%   KLD: {s['kld_p99']:10.6f}",
        f"95.0%   KLD: {s['kld_p95']:10.6f}",
        f"90.0%   KLD: {s['kld_p90']:10.6f}",
        f"Median  KLD: {s['kld_median']:10.6f}",
        f"10.0%   KLD: {s['kld_p10']:10.6f}",
        f" 5.0%   KLD: {s['kld_p5']:10.6f}",
        f" 1.0%   KLD: {s['kld_p1']:10.6f}",
        f" 0.1%   KLD: {s['kld_p01']:10.6f}",
        f"Minimum KLD: {s['kld_min']:10.6f}",
        "====== Token probability statistics ======",
        f"Mean    Δp: {100 * s['dp_mean']:6.3f} ± {100 * s['dp_err']:5.3f} %",
        f"Maximum Δp: {100 * s['dp_max']:6.3f}%",
        f"99.0%   Δp: {100 * s['dp_p99']:6.3f}%",
        f"Median  Δp: {100 * s['dp_median']:6.3f}%",
        f" 1.0%   Δp: {100 * s['dp_p1']:6.3f}%",
        f"Minimum Δp: {100 * s['dp_min']:6.3f}%",
        f"RMS Δp    : {100 * s['dp_rms']:6.3f} %",
        f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_err']:5.3f} %",
    ]
    return "\n".join(lines)
