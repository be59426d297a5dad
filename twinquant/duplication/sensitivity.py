"""Per-layer quantization sensitivity: which blocks lose the most to their quantized weights.

Two measurements per block, both as KL divergence to the float reference on calibration windows:

- `alone`: only this block quantized, every other tensor float → the KLD this block's quantization causes;
- `restored`: every block quantized except this one → how much KLD restoring it removes (`gain`).

The float and quantized models must share one basis (the same rotation and padding), because blocks are swapped
between them; weights are swapped by reference, nothing is copied. Cost: 2·n_layers + 2 forwards over the windows.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from twinquant.duplication.objective import KLDObjective
from twinquant.errors import TwinquantError
from twinquant.model import history, roles
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


def _block_names(model, layer: int) -> list[str]:
    return roles.block_tensor_names(model.spec, layer)


def layer_sensitivity(float_model, quant_model, windows, progress: bool = True) -> Sensitivity:
    """Measure every block's sensitivity (see module doc). Both models are left as they were."""
    shape = lambda s: (s.arch, s.n_layers, s.hidden, s.intermediate, s.n_heads, s.n_kv_heads, s.head_dim,  # noqa
                       s.vocab, s.tied_embeddings, s.qkv_bias, s.qk_norm)
    float_model.spec.require_dense("layer sensitivity")
    if shape(float_model.spec) != shape(quant_model.spec):
        raise TwinquantError("sensitivity: the float and quantized models differ in shape (padding? a different "
                             "model?)")
    if history.without_padding(float_model.history) != history.without_padding(quant_model.history):
        raise TwinquantError("sensitivity: the float and quantized models are in different bases (rotation); "
                             "give the float model rotated the same way")
    t0 = time.perf_counter()
    float_model.materialize()
    quant_model.materialize()
    objective = KLDObjective(float_model, windows)
    n = float_model.spec.n_layers
    work = quant_model   # swap float blocks into the quantized model, by reference, and back
    globals_ = [x for x in work.tensor_names() if not x.startswith("blk.")]
    saved = {name: work.tensors[name] for name in work.tensor_names()}

    def put(layer: int, source) -> None:
        for name in _block_names(work, layer):
            work.tensors[name] = source.tensors[name] if source is not None else saved[name]

    alone, restored = [], []
    try:
        kq = objective(work)
        with Progress(2 * n, "sensitivity", enabled=progress) as bar:
            for layer in range(n):
                put(layer, float_model)
                restored.append(objective(work))
                put(layer, None)
                bar.update(2 * layer + 1)
            for name in globals_:               # embedding, norms, head: float while blocks are measured alone
                work.tensors[name] = float_model.tensors[name]
            for layer in range(n):              # only `layer` quantized: every other block float
                for other in range(n):
                    if other != layer:
                        put(other, float_model)
                alone.append(objective(work))
                for other in range(n):
                    put(other, None)
                bar.update(n + layer + 1)
        kf = objective(float_model)
    finally:
        for name, t in saved.items():
            work.tensors[name] = t
    return Sensitivity(kf, kq, alone, restored, time.perf_counter() - t0,
                       {"windows": int(windows.shape[0]), "ctx": int(windows.shape[1])})
