"""Versioned, validated settings of a quantizer backend (the base of every backend's config dataclass)."""

from __future__ import annotations

from dataclasses import asdict, fields

from twinquant.errors import TwinquantError


class Config:
    VERSION = 1

    def to_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        v = d.pop("version", cls.VERSION)
        if v != cls.VERSION:
            raise TwinquantError(f"{cls.__name__}: settings version {v} is not {cls.VERSION}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TwinquantError(f"{cls.__name__}: unknown settings {sorted(unknown)} (known: {sorted(names)})")
        return cls(**d)
