"""Per-layer quantization sensitivity: which blocks lose the most to their quantized weights.

Two measurements per block, both as KL divergence to the float reference on calibration windows:

- `alone`: only this block quantized, every other tensor float → the KLD this block's quantization causes;
- `restored`: every block quantized except this one → how much KLD restoring it removes (`gain`).

The float and quantized models must share one basis (the same rotation and padding), because activations pass
from one model's blocks to the other's. Streamed: each block of either model is loaded once (see
`layer_sensitivity`), so a model larger than memory can be measured.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twinquant.calibration.blocks import block_pass
from twinquant.errors import TwinquantError
from twinquant.model import history, roles
from twinquant.model.forward import embed, head
from twinquant.progress import Progress


@dataclass
class Sensitivity:
    kld_float: float                       # float model (≈ 0: the reference itself)
    kld_quantized: float                   # every block quantized (the non-block tensors too)
    alone: list[float]                     # per block: KLD with only this block quantized
    restored: list[float]                  # per block: KLD with every block but this one quantized
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def gain(self) -> list[float]:
        return [self.kld_quantized - r for r in self.restored]

    def score(self, by: str = "both") -> list[float]:
        """A per-block score, higher = more sensitive: `alone`, `gain`, or `both` (their mean)."""
        if by == "alone":
            return list(self.alone)
        if by == "gain":
            return self.gain
        if by == "both":
            return [(a + g) / 2 for a, g in zip(self.alone, self.gain)]
        raise TwinquantError(f"sensitivity score {by!r}: use alone, gain or both")

    def ranking(self, by: str = "both") -> list[int]:
        s = self.score(by)
        return sorted(range(len(s)), key=lambda i: -s[i])

    def to_dict(self) -> dict:
        return {"kld_float": self.kld_float, "kld_quantized": self.kld_quantized, "seconds": self.seconds,
                **self.meta,
                "ranking": [{"layer": i, "kld_alone": self.alone[i], "kld_restored": self.restored[i],
                             "gain_restored": self.gain[i], "score": self.score()[i]} for i in self.ranking()]}

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        rows = sorted(d["ranking"], key=lambda r: r["layer"])
        return cls(d["kld_float"], d["kld_quantized"], [r["kld_alone"] for r in rows],
                   [r["kld_restored"] for r in rows], d.get("seconds", 0.0))

    def write(self, stem: str | Path) -> tuple[Path, Path]:
        stem = Path(stem)
        js, png = stem.with_suffix(".json"), stem.with_suffix(".png")
        js.parent.mkdir(parents=True, exist_ok=True)
        tmp = js.with_name(js.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, js)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.alone)
        fig, ax = plt.subplots(figsize=(max(6, 0.3 * n), 3.8))
        x = list(range(n))
        ax.bar([i - 0.2 for i in x], self.alone, 0.4, label="KLD, only this layer quantized")
        ax.bar([i + 0.2 for i in x], self.gain, 0.4, label="KLD removed by restoring only this layer")
        ax.set_xlabel("layer")
        ax.set_ylabel("KL divergence (calibration)")
        ax.set_title(f"quantization sensitivity per layer (all quantized: {self.kld_quantized:.4f})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        tmp = png.with_name(png.stem + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, png)
        return js, png

    def table(self, top: int = 10) -> str:
        lines = [f"{'rank':>4} {'layer':>5} {'alone':>9} {'restored':>9} {'gain':>9}"]
        for k, i in enumerate(self.ranking()[:top]):
            lines.append(f"{k + 1:>4} {i:>5} {self.alone[i]:>9.5f} {self.restored[i]:>9.5f} {self.gain[i]:>9.5f}")
        return "\n".join(lines)


def layer_sensitivity(float_model, quant_model, windows, progress: bool = True) -> Sensitivity:
    """Measure every block's sensitivity (see module doc) streamed block by block: each block of either model is
    loaded once and released (lazy models stay lazy), while the activations of every experiment advance through
    it together — `alone[i]` enters block i from the float stream and leaves it quantized, `restored[i]` enters
    it from the quantized stream and leaves it float. Memory: one block of each model plus 2·n_layers + 2
    activation streams [windows, ctx, hidden] float32; n_layers² + 3·n_layers block passes (every experiment
    shares the blocks before its own). Both models are left as they were."""
    shape = lambda s: (s.arch, s.n_layers, s.hidden, s.intermediate, s.n_heads, s.n_kv_heads, s.head_dim,  # noqa
                       s.vocab, s.tied_embeddings, s.qkv_bias, s.qk_norm)
    float_model.spec.require_dense("layer sensitivity")
    if shape(float_model.spec) != shape(quant_model.spec):
        raise TwinquantError("sensitivity: the float and quantized models differ in shape (padding? a different "
                             "model?)")
    if history.without_padding(float_model.history) != history.without_padding(quant_model.history):
        raise TwinquantError("sensitivity: the float and quantized models are in different bases (rotation); "
                             "give the float model rotated the same way")
    n = float_model.spec.n_layers
    for m in (float_model, quant_model):
        if not m.layout.is_sequential or len(m.layout.slots) != n:
            raise TwinquantError("sensitivity: a model with duplicated layers; measure the file before `duplicate`")
    t0 = time.perf_counter()
    with torch.inference_mode(), Progress(n + 1, "sensitivity", enabled=progress) as bar:
        x_f, x_q = _embedded(float_model, windows), _embedded(quant_model, windows)
        alone: list[torch.Tensor] = []      # alone[i]: only block i quantized (float embedding and head)
        restored: list[torch.Tensor] = []   # restored[i]: every block but i quantized (quantized globals)
        for j in range(n):
            alone = [block_pass(float_model, j, a) for a in alone] + [block_pass(quant_model, j, x_f)]
            restored = [block_pass(quant_model, j, r) for r in restored] + [block_pass(float_model, j, x_q)]
            x_f, x_q = block_pass(float_model, j, x_f), block_pass(quant_model, j, x_q)
            float_model.release_block(j)
            quant_model.release_block(j)
            bar.update(j + 1)
        kl = _head_klds(float_model, quant_model, x_f, [x_q] + restored, alone)
        bar.update(n + 1)
    return Sensitivity(0.0, kl[1][0], kl[0], kl[1][1:], time.perf_counter() - t0,
                       {"windows": int(windows.shape[0]), "ctx": int(windows.shape[1])})


def _embedded(model, windows: torch.Tensor) -> torch.Tensor:
    x = embed(model, windows).float()
    if not model.spec.tied_embeddings:      # (tied: the head needs it again at the end)
        model.release(roles.name(roles.T.TOKEN_EMBD))
    return x


def _head_klds(float_model, quant_model, x_ref, quantized_head: list, float_head: list):
    """Mean KL(reference ‖ stream) over every position, for streams through the float model's norm and head
    (`float_head`) and the quantized model's (`quantized_head`); the reference is `x_ref` through the float
    head. One window at a time: the reference log-probs are never all held."""
    sums = ([0.0] * len(float_head), [0.0] * len(quantized_head))
    for w in range(x_ref.shape[0]):
        ref = torch.log_softmax(head(float_model, x_ref[w: w + 1].to(float_model.dtype))[0].float(), -1)
        p = ref.exp()
        for model, streams, acc in ((float_model, float_head, sums[0]), (quant_model, quantized_head, sums[1])):
            for k, x in enumerate(streams):
                lp = torch.log_softmax(head(model, x[w: w + 1].to(model.dtype))[0].float(), -1)
                acc[k] += float((p * (ref - lp)).sum())
    positions = x_ref.shape[0] * x_ref.shape[1]
    return [v / positions for v in sums[0]], [v / positions for v in sums[1]]
