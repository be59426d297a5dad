"""What was done to a model's weights, in order, as typed records: norms fused, rotations (fused R1/R2, online
R3/R4), padding. `Model.history` holds them; the GGUF stores them as `twinquant.rotation` (a JSON list of objects
with a `kind`, the padding records also as `twinquant.padding`), written by `to_dict` and read by `from_dict`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Union

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class FuseNorms:
    """RMSNorm gains multiplied into the linears they feed (gains then 1)."""

    KIND: ClassVar[str] = "fuse_norms"

    def to_dict(self) -> dict:
        return {"kind": self.KIND}


@dataclass(frozen=True)
class Rotation:
    """An orthogonal transform: R1 (residual) and R2 (per head, attn_v/attn_output) fused into the weights, R3
    (q/k after RoPE) and R4 (ffn_down's input) applied online. `type`: rh (randomized Hadamard), ro (optimized,
    with its search's settings and objective), hadamard (online)."""

    kind: str
    type: str
    n: int
    seed: int | None = None
    iters: int | None = None               # ro only
    bits: int | None = None
    objective_start: float | None = None
    objective: float | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("R1", "R2", "R3", "R4")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if v is not None or k == "seed"}


@dataclass(frozen=True)
class Padding:
    """Exact zero-channel padding of the hidden / ffn widths and query heads (twinquant.export.padding)."""

    multiple: int
    hidden: int
    to: int
    intermediate: int
    intermediate_to: int
    n_heads: int
    n_heads_to: int
    rms_eps: float
    rms_eps_to: float
    qk_scale: float

    KIND: ClassVar[str] = "pad"

    def to_dict(self) -> dict:
        return {"kind": self.KIND, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Skipped:
    """A step a recipe asked for that this model's architecture cannot take (yet), with the reason: kept in the
    file so nobody mistakes its absence for an oversight."""

    what: str
    why: str

    KIND: ClassVar[str] = "skipped"

    def to_dict(self) -> dict:
        return {"kind": self.KIND, "what": self.what, "why": self.why}


@dataclass(frozen=True)
class Other:
    """A record of a kind this version does not know (kept as read, written back unchanged)."""

    fields: tuple

    def to_dict(self) -> dict:
        return dict(self.fields)


Record = Union[FuseNorms, Rotation, Padding, Skipped, Other]


def from_dict(d: dict) -> Record:
    if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
        raise TwinquantError(f"twinquant.rotation: a record without a kind ({d!r:.80})")
    body = {k: v for k, v in d.items() if k != "kind"}
    try:
        if d["kind"] == FuseNorms.KIND:
            return FuseNorms()
        if d["kind"] in Rotation.KINDS:
            return Rotation(d["kind"], **body)
        if d["kind"] == Padding.KIND:
            return Padding(**body)
        if d["kind"] == Skipped.KIND:
            return Skipped(**body)
    except TypeError as e:
        raise TwinquantError(f"twinquant.rotation: malformed {d['kind']} record ({e})") from None
    return Other(tuple(d.items()))


def to_list(history) -> list[dict]:
    return [r.to_dict() for r in history]


def from_list(items) -> list[Record]:
    if not isinstance(items, list):
        raise TwinquantError("twinquant.rotation is not a list of records")
    return [from_dict(d) for d in items]


def has(history, kind: type) -> bool:
    return any(isinstance(r, kind) for r in history)


def paddings(history) -> list[Padding]:
    return [r for r in history if isinstance(r, Padding)]


def without_padding(history) -> list[Record]:
    return [r for r in history if not isinstance(r, Padding)]
