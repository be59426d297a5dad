"""Per-copy parameter sets of duplicated layers, resolved base → layer override → copy override.

A copy shares its block's (quantized) weights; what it owns is how it runs them:

- activation quantization of every linear input of the block (`act_bits` None = off; per token or per tensor,
  symmetric or with a zero point, dynamic or static scale / zero point) — `twinquant.algorithms.actquant.ActQuant`;
- clipping: `clip_ratio` (per layer: the activation range is shrunk by it) and optional per-channel thresholds
  `channel_clip` (absolute |x| limits on the hidden-width inputs: q/k/v and gate/up);
- rounding: `nearest`, or `stochastic` with a `seed` (copies with different seeds average out rounding noise;
  the noise is drawn per call from the seed, so it depends on how tokens are batched, e.g. prompt vs cached steps);
- the residual factor `alpha` of a serial copy (α = 0: identity).

Only values that differ from the defaults (or from the level below) are stored, so a topology with many copies
and few tuned values stays small in GGUF metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from twinquant.errors import TwinquantError
from twinquant.algorithms.actquant import ActQuant


@dataclass(frozen=True)
class CopyParams:
    act_bits: int | None = None
    act_granularity: str = "per_token"
    act_symmetric: bool = True
    act_static: bool = False
    act_scale: float | None = None
    act_zero_point: float | None = None
    clip_ratio: float = 1.0
    channel_clip: tuple[float, ...] | None = None
    rounding: str = "nearest"
    seed: int = 0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "stochastic"):
            raise TwinquantError(f"rounding {self.rounding!r}: use nearest or stochastic")
        if not 0 < self.clip_ratio <= 1:
            raise TwinquantError(f"clip_ratio {self.clip_ratio} must be in (0, 1]")
        if self.channel_clip is not None and any(not c > 0 for c in self.channel_clip):
            raise TwinquantError("channel_clip thresholds must be positive")
        # built once: the forward asks for it on every linear input
        object.__setattr__(self, "_aq", self._make_act_quant())   # ActQuant validates bits, granularity, scales

    def act_quant(self) -> ActQuant | None:
        return self._aq

    def _make_act_quant(self) -> ActQuant | None:
        if self.act_bits is None:
            return None
        return ActQuant(bits=self.act_bits, granularity=self.act_granularity, symmetric=self.act_symmetric,
                        static=self.act_static, scale=self.act_scale, zero_point=self.act_zero_point,
                        clip_ratio=self.clip_ratio, rounding=self.rounding, seed=self.seed)

    @property
    def is_identity_transform(self) -> bool:
        """True when the copy runs its linears on unmodified inputs (no activation quantization or clipping)."""
        return self.act_bits is None and self.channel_clip is None

    def apply(self, x: torch.Tensor, hidden_width: bool) -> torch.Tensor:
        """The copy's transform of a linear's input: channel clipping (hidden-width inputs), then fake-quant."""
        if self.channel_clip is not None and hidden_width:
            c = torch.tensor(self.channel_clip, dtype=x.dtype, device=x.device)
            if c.numel() != x.shape[-1]:
                raise TwinquantError(f"channel_clip has {c.numel()} thresholds for inputs of width {x.shape[-1]}")
            x = torch.maximum(torch.minimum(x, c), -c)
        aq = self.act_quant()
        return aq(x) if aq is not None else x


FIELDS = {f.name for f in dataclasses.fields(CopyParams)}
DEFAULTS = CopyParams()


def _check(d: dict, where: str) -> dict:
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise TwinquantError(f"{where}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    d = dict(d)
    if isinstance(d.get("channel_clip"), list):
        d["channel_clip"] = tuple(float(c) for c in d["channel_clip"])
    return d


@dataclass
class ParamStore:
    """base → layers[block] → copies[(block, copy)]; each level a sparse dict of CopyParams fields."""

    base: dict = dataclasses.field(default_factory=dict)
    layers: dict[int, dict] = dataclasses.field(default_factory=dict)
    copies: dict[tuple[int, int], dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.base = _check(self.base, "base parameters")
        self.layers = {int(b): _check(d, f"layer {b} parameters") for b, d in self.layers.items()}
        self.copies = {(int(b), int(c)): _check(d, f"copy {b}.{c} parameters") for (b, c), d in self.copies.items()}
        self._cache: dict[tuple[int, int], CopyParams] = {}

    def resolve(self, block: int, copy: int) -> CopyParams:
        key = (block, copy)
        if key not in self._cache:
            merged = {**self.base, **self.layers.get(block, {}), **self.copies.get(key, {})}
            self._cache[key] = CopyParams(**merged)
        return self._cache[key]

    def set(self, level: str, values: dict, block: int | None = None, copy: int | None = None) -> None:
        """Set values at one level ('base', 'layer', 'copy'); values equal to what the level below gives are
        dropped, so the store stays sparse."""
        values = _check(values, f"{level} parameters")
        below = {**dataclasses.asdict(DEFAULTS), **(self.base if level != "base" else {}),
                 **(self.layers.get(block, {}) if level == "copy" else {})}
        keep = {k: v for k, v in values.items() if below.get(k) != v}
        if level == "base":
            self.base = {**self.base, **keep}
        elif level == "layer":
            self.layers[block] = {**self.layers.get(block, {}), **keep}
        elif level == "copy":
            self.copies[(block, copy)] = {**self.copies.get((block, copy), {}), **keep}
        else:
            raise TwinquantError(f"parameter level {level!r}: use base, layer or copy")
        self._cache.clear()

    @property
    def empty(self) -> bool:
        return not (self.base or any(self.layers.values()) or any(self.copies.values()))

    def any_act_quant(self, keys) -> bool:
        return any(not self.resolve(b, c).is_identity_transform for b, c in keys)

    def to_dict(self) -> dict:
        """Sparse, JSON-ready: `{"base": {...}, "layers": {"12": {...}}, "copies": {"12.1": {...}}}`."""
        fix = lambda d: {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}  # noqa: E731
        out: dict = {}
        if self.base:
            out["base"] = fix(self.base)
        layers = {str(b): fix(d) for b, d in sorted(self.layers.items()) if d}
        if layers:
            out["layers"] = layers
        copies = {f"{b}.{c}": fix(d) for (b, c), d in sorted(self.copies.items()) if d}
        if copies:
            out["copies"] = copies
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ParamStore":
        if not isinstance(d, dict):
            raise TwinquantError("duplication parameters must be a mapping with base / layers / copies")
        unknown = sorted(set(d) - {"base", "layers", "copies"})
        if unknown:
            raise TwinquantError(f"duplication parameters: unknown section(s) {', '.join(unknown)}")
        copies = {}
        for key, v in (d.get("copies") or {}).items():
            try:
                b, c = (int(p) for p in str(key).split("."))
            except ValueError:
                raise TwinquantError(f"duplication parameters: copy key {key!r} is not BLOCK.COPY") from None
            copies[(b, c)] = v
        try:
            layers = {int(b): v for b, v in (d.get("layers") or {}).items()}
        except ValueError:
            raise TwinquantError("duplication parameters: layer keys must be block numbers") from None
        return cls(dict(d.get("base") or {}), layers, copies)
