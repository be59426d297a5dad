"""Saved reference log-probabilities, so a reference model is evaluated once and compared against many times.

Format (little-endian): magic `TQLOGPR1`, uint64 header length, a UTF-8 JSON header (protocol, ctx, chunks,
first scored position, vocab, sha256 of the windows' tokens), the windows as int32 [chunks, ctx], then for each
chunk the log-softmax of the scored positions as float16 [ctx - 1 - first, vocab]. Written streaming to a
temporary name and renamed when complete; read through a memory map.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twinquant.errors import TwinquantError

MAGIC = b"TQLOGPR1"


def tokens_hash(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int32).numpy().tobytes()).hexdigest()


def is_logits_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(8) == MAGIC


def bytes_needed(chunks: int, scored: int, vocab: int) -> int:
    return chunks * scored * vocab * 2


class LogitsWriter:
    def __init__(self, path: str | os.PathLike, header: dict, windows: torch.Tensor):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        hdr = json.dumps({**header, "tokens_sha256": tokens_hash(windows)}).encode()
        self.f = open(self.tmp, "wb")
        self.f.write(MAGIC + struct.pack("<Q", len(hdr)) + hdr)
        self.f.write(windows.to(torch.int32).numpy().tobytes())

    def add(self, logprobs: torch.Tensor) -> None:
        self.f.write(logprobs.to(torch.float16).cpu().numpy().tobytes())

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class LogitsFile:
    header: dict
    windows: torch.Tensor          # int64 [chunks, ctx]
    logprobs: np.ndarray           # float16 memmap [chunks, scored, vocab]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "LogitsFile":
        p = Path(path)
        if not is_logits_file(p):
            raise TwinquantError(f"{p}: not a twinquant log-prob file")
        try:
            with open(p, "rb") as f:
                f.seek(8)
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            chunks, ctx, scored, vocab = (int(header[k]) for k in ("chunks", "ctx", "scored", "vocab"))
            off = 16 + n
            size = p.stat().st_size
            if off + chunks * ctx * 4 + bytes_needed(chunks, scored, vocab) != size:
                raise ValueError("size does not match the header")
            windows = np.memmap(p, dtype="<i4", mode="r", offset=off, shape=(chunks, ctx))
            lp = np.memmap(p, dtype="<f2", mode="r", offset=off + chunks * ctx * 4, shape=(chunks, scored, vocab))
        except (ValueError, KeyError, json.JSONDecodeError, struct.error) as e:
            raise TwinquantError(f"{p}: corrupt log-prob file ({e})") from None
        return cls(header, torch.from_numpy(np.array(windows, dtype=np.int64)), lp)

    def chunk(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.logprobs[i], dtype=np.float32))
