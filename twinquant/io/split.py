"""Split GGUF files in llama.cpp's convention (gguf-split, convert_hf_to_gguf --split-max-size).

A model is written as shards `<stem>-00001-of-00003.gguf` … ; every shard carries `split.no` (0-based),
`split.count` and `split.tensors.count` (gguf-py's `Keys.Split`); the first holds all other metadata. llama.cpp
loads the set when given the first shard. gguf-py's `GGUFWriter(split_max_size=...)` does the splitting (a new
shard starts when the next tensor would take the current one past the size; a tensor larger than the limit gets a
shard of its own) and names the shards; this module parses sizes, moves finished shards into place, and reads a
split model back as one reader.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import gguf

from twinquant.errors import TwinquantError

K = gguf.Keys.Split
SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_UNITS = {"": 1, "K": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4}   # decimal, as llama.cpp's tools


def parse_size(size: int | str) -> int:
    """Bytes from an int or a size like "50M", "2G", "500K", "4096" (decimal units, as gguf-split / convert)."""
    if isinstance(size, bool):
        raise TwinquantError(f"invalid split size {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(size), re.IGNORECASE)
        if m is None:
            raise TwinquantError(f"invalid split size {size!r}; give bytes or a size like 50M, 2G")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise TwinquantError(f"split size must be positive, got {size!r}")
    return n


def shard_name(path: str | os.PathLike, no: int, count: int) -> Path:
    """Shard `no` (1-based) of `count` for an output path: m.gguf -> m-00002-of-00003.gguf (gguf-py's format)."""
    path = Path(path)
    return path.with_name(gguf.gguf_writer.SHARD_NAME_FORMAT.format(path.stem, no, count))


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """Every shard's path of the split set `path` belongs to (by its name; no I/O); [path] for a plain name."""
    path = Path(path)
    m = SHARD_NAME.match(path.name)
    if m is None:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def move_shards(tmpdir: Path, path: Path) -> list[Path]:
    """Move the files gguf-py wrote into `tmpdir` (for output `tmpdir / path.name`) next to `path`, once all are
    complete; returns the final paths, first shard first. On failure nothing moved stays."""
    written = sorted(tmpdir.iterdir())
    names = [path.name] if [p.name for p in written] == [path.name] else \
        [shard_name(path, i + 1, len(written)).name for i in range(len(written))]
    if sorted(names) != [p.name for p in written]:
        raise TwinquantError(f"unexpected files from the GGUF writer: {', '.join(p.name for p in written)}")
    moved: list[Path] = []
    try:
        for n in names:
            os.replace(tmpdir / n, path.with_name(n))
            moved.append(path.with_name(n))
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return moved
