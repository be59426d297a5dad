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
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
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
    m = _SHARD.match(path.name)
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


def split_count(reader: gguf.GGUFReader) -> int:
    f = reader.fields.get(K.LLM_KV_SPLIT_COUNT)
    return int(f.contents()) if f is not None else 1


class SplitReader:
    """What the loader needs of a `GGUFReader` for a split model: the first shard's metadata (`fields`) and every
    shard's tensors (`tensors`, in shard order). Holds the shards' readers (their memory maps)."""

    def __init__(self, paths: list[Path], readers: list[gguf.GGUFReader]):
        self.paths = paths
        self.readers = readers
        self.fields = readers[0].fields
        self.tensors = [t for r in readers for t in r.tensors]


def open_split(path: str | os.PathLike, reader: gguf.GGUFReader | None = None) -> SplitReader:
    """Open every shard of the split model `path` (any of its shards, normally the first) and check the set:
    names by the convention, `split.no` / `split.count` of each shard, the total tensor count, no duplicates."""
    from twinquant.io.gguf_read import open_gguf

    path = Path(path)
    reader = reader if reader is not None else open_gguf(path)
    count = split_count(reader)
    paths = shard_paths(path)
    if _SHARD.match(path.name) is None or len(paths) != count:
        raise TwinquantError(f"{path}: one of {count} split files, but not named like "
                             f"{shard_name('<name>.gguf', 1, count).name} (llama.cpp finds the shards by name)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise TwinquantError(f"{path}: split model is missing shard {missing[0].name}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    readers = [reader if p == path else open_gguf(p) for p in paths]
    seen: set[str] = set()
    for i, (p, r) in enumerate(zip(paths, readers)):
        no = r.fields.get(K.LLM_KV_SPLIT_NO)
        if no is None or int(no.contents()) != i or split_count(r) != count:
            raise TwinquantError(f"{p}: not shard {i + 1} of {count} (its split.no / split.count disagree)")
        for t in r.tensors:
            if t.name in seen:
                raise TwinquantError(f"{p}: tensor {t.name} also appears in an earlier shard")
            seen.add(t.name)
    total = readers[0].fields.get(K.LLM_KV_SPLIT_TENSORS_COUNT)
    if total is not None and int(total.contents()) != len(seen):
        raise TwinquantError(f"{paths[0]}: split.tensors.count is {int(total.contents())}, the shards hold "
                             f"{len(seen)} tensors")
    return SplitReader(paths, readers)
