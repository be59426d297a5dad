"""The work directory of a long run: what is finished, so that `--resume` continues after a crash or a kill.

Layout (`OUT.gguf.work/` by default):

    fingerprint.json   what the run is (source identity, recipe, types, calibration, importance, software) + sha256
    state.json         blocks finished, the per-tensor report so far; written last, atomically: it is the truth
    x.K.pt             the calibration activations entering block K (the output of block K-1)
    tensors/NAME.npy   packed GGML bytes of every finished tensor (memory-mapped back, never held whole)

`measure` keeps one too (`MEASUREMENT.json.work/`: its fingerprint is the measurement's header, its truth the
measurement file itself, and `fisher.pt` the output-channel weights of the Fisher cost), so a resumed
measurement starts at its first unfinished block instead of running every block before it again.

Every file is written under a temporary name and renamed. A resumed run reads `state.json`, maps the finished
tensors and restarts at block K from `x.K.pt`: the remaining arithmetic is the same as an uninterrupted run's, so
the file is byte-identical (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from twinquant.errors import TwinquantError

FORMAT = 1


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def source_identity(path: str | os.PathLike) -> dict:
    """A cheap identity of a model's files: name, size and the sha256 of the first and last MiB of each (a 64 GB
    model is not hashed whole for every run; a changed file changes its size or its ends in practice)."""
    p = Path(path)
    files = sorted(q for q in p.iterdir() if q.suffix in (".safetensors", ".json")) if p.is_dir() else [p]
    out = {}
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
        out[f.name] = {"size": size, "ends_sha256": h.hexdigest()}
    return out


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class WorkDir:
    """Finished blocks of one run (see module doc). `open` starts it afresh or, with `resume`, continues it."""

    def __init__(self, path: Path, parts: dict):
        self.path = path
        self.parts = {**parts, "workdir_format": FORMAT}
        self.sha = fingerprint(self.parts)
        self.state: dict = {"blocks_done": 0, "embedding_done": False, "tensors": {}, "report": [],
                            "seconds_per_block": []}

    @classmethod
    def open(cls, path: str | os.PathLike, parts: dict, resume: bool) -> "WorkDir":
        wd = cls(Path(path), parts)
        fp = wd.path / "fingerprint.json"
        if resume and fp.is_file():
            try:
                old = json.loads(fp.read_text())
                state = json.loads((wd.path / "state.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TwinquantError(f"{wd.path}: unreadable work directory ({e}); remove it to start over") from None
            if old.get("sha256") != wd.sha:
                diff = sorted(k for k in set(old.get("parts", {})) | set(wd.parts)
                              if old.get("parts", {}).get(k) != wd.parts.get(k))
                raise TwinquantError(f"{wd.path} was made for another run ({', '.join(diff) or 'fingerprint'} "
                                     "differs); remove it, or run without --resume to start over")
            wd.state = state
            return wd
        if wd.path.exists():
            shutil.rmtree(wd.path)
        (wd.path / "tensors").mkdir(parents=True)
        _atomic_write(fp, json.dumps({"sha256": wd.sha, "parts": wd.parts}, indent=1, default=str).encode())
        wd._write_state()
        return wd

    @property
    def resumed(self) -> bool:
        return self.state["blocks_done"] > 0 or self.state["embedding_done"]

    # --- tensors and activations -----------------------------------------------------------------------------
    def _tensor_path(self, name: str) -> Path:
        return self.path / "tensors" / f"{name}.npy"

    def save_tensor(self, name: str, type_name: str, data) -> np.ndarray:
        """Keep a finished tensor's packed bytes; returns them memory-mapped from the file."""
        f = self._tensor_path(name)
        tmp = f.with_name(f.name + ".tmp.npy")
        np.save(tmp, np.ascontiguousarray(data))
        os.replace(tmp, f)
        self.state["tensors"][name] = type_name
        return np.load(f, mmap_mode="r")

    def load_tensor(self, name: str) -> np.ndarray:
        f = self._tensor_path(name)
        if not f.is_file():
            raise TwinquantError(f"{f}: missing from the work directory; remove {self.path} to start over")
        return np.load(f, mmap_mode="r")

    def save_pt(self, name: str, obj) -> None:
        """Tensors (or a dict / list of them) under `name`.pt, atomically."""
        f = self.path / f"{name}.pt"
        tmp = f.with_name(f.name + ".tmp")
        torch.save(obj, tmp)
        os.replace(tmp, f)

    def load_pt(self, name: str, required: bool = True):
        """What `save_pt` kept (tensors only: nothing is unpickled); None when missing and not `required`."""
        f = self.path / f"{name}.pt"
        if not f.is_file():
            if not required:
                return None
            raise TwinquantError(f"{f}: missing from the work directory; remove {self.path} to start over")
        return torch.load(f, weights_only=True)

    def save_x(self, block: int, x: torch.Tensor) -> None:
        self.save_pt(f"x.{block}", x)

    def load_x(self, block: int) -> torch.Tensor:
        return self.load_pt(f"x.{block}")

    # --- progress ---------------------------------------------------------------------------------------------
    def _write_state(self) -> None:
        _atomic_write(self.path / "state.json", json.dumps(self.state, indent=1).encode())

    def commit(self, **changes) -> None:
        """Record progress (after the tensors and activations it refers to are on disk); drop stale x files."""
        self.state.update(changes)
        self._write_state()
        keep = f"x.{self.state['blocks_done']}.pt"
        for f in self.path.glob("x.*.pt"):
            if f.name != keep:
                f.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
