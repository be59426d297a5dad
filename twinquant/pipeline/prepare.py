"""Prepare a model as a recipe says — load, pad, fuse norms and rotate — written once for every stage.

`quantize` and `measure` start here, and `sensitivity` brings a float model into a quantized file's basis here
(`same_basis`); `imatrix` computes its statistics in a recipe's basis (`--rotation`, `--pad`: recorded in the
file, `Preparation.basis`), so that `quantize --imatrix` can check it; `duplicate` does not prepare a model yet. With `stream=True` (the default)
nothing is materialized: padding and rotation are lazy views (`export/padding.py`, `rotation/lazy.py`) that compute
a tensor from the source's when a stage asks for it, so a block-streamed stage holds one block. `stream=False`
materializes the model and rotates it in place in float64 (the in-memory path, kept as the oracle of the streamed
one: both give the same bits).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from twinquant.errors import TwinquantError
from twinquant.model.model import Model


@dataclass(frozen=True)
class Preparation:
    """What was done to the source before quantizing: the typed record of `padding` and `rotation`."""

    rotation: str = "none"           # none | rh | ro (resolved: never auto)
    seed: int = 0
    pad: bool = False
    pad_multiple: int = 256

    @classmethod
    def of(cls, recipe, tied_embeddings: bool, moe: bool = False) -> "Preparation":
        return cls(recipe.resolved_rotation(tied_embeddings, moe), recipe.seed, recipe.pad, recipe.pad_multiple)

    @classmethod
    def from_quant_record(cls, rec: dict | None) -> "Preparation":
        """The preparation a quantized file's `twinquant.quant` record says it had."""
        rec = rec or {}
        recipe = rec.get("recipe") or {}
        return cls(rec.get("rotation", "none"), int(recipe.get("seed", 0)), bool(recipe.get("pad", False)),
                   int(recipe.get("pad_multiple", 256)))

    def basis(self) -> dict | None:
        """The basis this preparation puts the weights in, as imatrix files record it (`twinquant.basis`): None
        for the model as stored (what llama-imatrix sees)."""
        if self.rotation == "none" and not self.pad:
            return None
        return {"rotation": self.rotation, "seed": self.seed if self.rotation != "none" else None,
                "pad": self.pad, "pad_multiple": self.pad_multiple if self.pad else None}

    def planned_spec(self, spec):
        """The spec the prepared model will have without preparing it: rotating unties a tied head (the
        final-norm gain is fused into it). (Padding is lazy and cheap: apply it for its spec.)"""
        if self.rotation != "none" and spec.tied_embeddings:
            return dataclasses.replace(spec, tied_embeddings=False)
        return spec


def apply(model: Model, prep: Preparation, calib_windows: torch.Tensor | None = None, stream: bool = True,
          rotate: bool = True, log=None) -> Model:
    """`model` padded and rotated as `prep` says (a new lazy model when streaming; the original must not change
    afterwards). `rotate=False` pads only (a dry run needs the spec, not the weights)."""
    if prep.pad:   # zero channels up to a multiple of 256: K-quants instead of llama.cpp's ~4-5-bit fallbacks
        from twinquant.export.padding import pad_model, padding_records

        model = pad_model(model, multiple=prep.pad_multiple, ffn=True, heads=True)
        if log and padding_records(model):
            r = padding_records(model)[-1]
            log(f"padded: hidden {r.hidden} -> {r.to}, ffn {r.intermediate} -> {r.intermediate_to}, "
                f"heads {r.n_heads} -> {r.n_heads_to}")
    if prep.rotation == "none" or not rotate:
        return model
    if prep.rotation == "ro" and calib_windows is None:
        raise TwinquantError("--rotation ro needs calibration windows")
    if stream:
        from twinquant.rotation.lazy import rotate_lazy

        return rotate_lazy(model, prep.rotation, prep.seed, r2=True, calib_windows=calib_windows)
    from twinquant.rotation.rotate import rotate as rotate_eager

    model.materialize()
    dtype = model.dtype
    model.to(dtype=torch.float64)           # rotations are computed exactly, then stored in the model's type
    rotate_eager(model, prep.rotation, prep.seed, r2=True, online=(), calib_windows=calib_windows)
    return model.to(dtype=dtype)


def same_basis(float_model: Model, quant_record: dict | None, stream: bool = True, log=None) -> Model:
    """The float model in a quantized file's basis: the padding and RH rotation its recipe recorded. RO depends on
    the calibration: such a file needs its float model given in that basis."""
    prep = Preparation.from_quant_record(quant_record)
    if prep.rotation not in ("none", "rh"):
        raise TwinquantError(f"the quantized file was rotated with {prep.rotation!r}, which depends on calibration: "
                             "give the float model in that basis")
    model = apply(float_model, prep, stream=stream)
    if log and prep.rotation == "rh":
        log(f"rotated the float model as the quantized file was (rh, seed {prep.seed})")
    return model


def describe_basis(basis: dict | None) -> str:
    """A basis (`Preparation.basis`) in words, and the `twinquant imatrix` options that compute in it."""
    if basis is None:
        return "the model as stored (no rotation, no padding)"
    words = []
    if basis.get("rotation", "none") != "none":
        words.append(f"rotated {basis['rotation']} with seed {basis.get('seed')}")
    if basis.get("pad"):
        words.append(f"padded to multiples of {basis.get('pad_multiple')}")
    return " and ".join(words) or "the model as stored"


def basis_options(basis: dict | None) -> str:
    if basis is None:
        return "--rotation none"
    out = f"--rotation {basis.get('rotation', 'none')}"
    if basis.get("rotation", "none") != "none":
        out += f" --seed {basis.get('seed')}"
    if basis.get("pad"):
        out += " --pad" + (f" --pad-multiple {basis['pad_multiple']}" if basis.get("pad_multiple") != 256 else "")
    return out
