"""GGUF files: hyper-parameters, tokenizer and tensors (any type gguf-py can dequantize), read lazily.

The file is memory-mapped by gguf-py's `GGUFReader`; a tensor is dequantized to float32 only when a stage asks
for it. Loading never executes anything from the file, and every tensor's extent is checked against the file
size before use. llama-family q/k rows are stored permuted for llama.cpp's interleaved RoPE; they are restored
to the HF (rotate-half) order here, which is exact.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.io.split import SHARD_NAME, shard_name, shard_paths
from twinquant.io.metadata import apply_metadata, read_metadata
from twinquant.model import roles
from twinquant.model.architectures import get_architecture
from twinquant.model.model import Model, TensorInfo
from twinquant.model.spec import ModelSpec

T = gguf.MODEL_TENSOR
K = gguf.Keys
DEQUANT_ROWS = 8192


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise TwinquantError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TwinquantError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged headers
        raise TwinquantError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise TwinquantError(f"{path}: truncated GGUF (tensor {t.name} runs past the end of the file)")
    return reader


def split_count(reader: gguf.GGUFReader) -> int:
    f = reader.fields.get(K.Split.LLM_KV_SPLIT_COUNT)
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
    path = Path(path)
    reader = reader if reader is not None else open_gguf(path)
    count = split_count(reader)
    paths = shard_paths(path)
    if SHARD_NAME.match(path.name) is None or len(paths) != count:
        raise TwinquantError(f"{path}: one of {count} split files, but not named like "
                             f"{shard_name('<name>.gguf', 1, count).name} (llama.cpp finds the shards by name)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise TwinquantError(f"{path}: split model is missing shard {missing[0].name}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    readers = [reader if p == path else open_gguf(p) for p in paths]
    seen: set[str] = set()
    for i, (p, r) in enumerate(zip(paths, readers)):
        no = r.fields.get(K.Split.LLM_KV_SPLIT_NO)
        if no is None or int(no.contents()) != i or split_count(r) != count:
            raise TwinquantError(f"{p}: not shard {i + 1} of {count} (its split.no / split.count disagree)")
        for t in r.tensors:
            if t.name in seen:
                raise TwinquantError(f"{p}: tensor {t.name} also appears in an earlier shard")
            seen.add(t.name)
    total = readers[0].fields.get(K.Split.LLM_KV_SPLIT_TENSORS_COUNT)
    if total is not None and int(total.contents()) != len(seen):
        raise TwinquantError(f"{paths[0]}: split.tensors.count is {int(total.contents())}, the shards hold "
                             f"{len(seen)} tensors")
    return SplitReader(paths, readers)


def field(reader: gguf.GGUFReader, key: str, default=...):
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise TwinquantError(f"GGUF metadata: missing required key {key!r}")
        return default
    return f.contents()


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's converter permutation: rows [h, hd/2, 2] -> [h, 2, hd/2] per head."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order (used by the writer)."""
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def rope_permuted_heads(spec: ModelSpec, name: str) -> int:
    """For attn_q / attn_k tensors: the number of heads their rows split into; else 0."""
    parts = name.split(".")
    if parts[0] != "blk":
        return 0
    return {"attn_q": spec.n_heads, "attn_k": spec.n_kv_heads}.get(parts[2], 0)


def spec_from_gguf(reader: gguf.GGUFReader) -> ModelSpec:
    arch_name = field(reader, K.General.ARCHITECTURE)
    arch = get_architecture(arch_name)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise TwinquantError("GGUF: RoPE frequency factors (rope_freqs) are not supported yet")
    a = {"arch": arch_name}
    hidden = int(field(reader, K.LLM.EMBEDDING_LENGTH.format(**a)))
    heads = int(field(reader, K.Attention.HEAD_COUNT.format(**a)))
    kv = field(reader, K.Attention.HEAD_COUNT_KV.format(**a), heads)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise TwinquantError("GGUF: no token_embd.weight tensor")
    vocab = field(reader, K.LLM.VOCAB_SIZE.format(**a), None) or int(embd.shape[1])
    return ModelSpec(
        arch=arch.name,
        n_layers=int(field(reader, K.LLM.BLOCK_COUNT.format(**a))),
        hidden=hidden,
        intermediate=int(field(reader, K.LLM.FEED_FORWARD_LENGTH.format(**a))),
        n_heads=heads,
        n_kv_heads=int(kv),
        head_dim=int(field(reader, K.Attention.KEY_LENGTH.format(**a), hidden // heads)),
        vocab=int(vocab),
        rope_theta=float(field(reader, K.Rope.FREQ_BASE.format(**a), 10000.0)),
        rms_eps=float(field(reader, K.Attention.LAYERNORM_RMS_EPS.format(**a))),
        tied_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        context_length=int(field(reader, K.LLM.CONTEXT_LENGTH.format(**a), 4096)),
        name=str(field(reader, K.General.NAME, "")),
    )


def drop_pages(arr) -> None:
    """madvise(DONTNEED) on the file mapping behind a numpy memmap: its touched pages leave this process's resident
    set (they stay in the page cache and come back on the next touch). No-op for anything else."""
    import mmap

    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def drop_mapped_pages(reader) -> None:
    for part in getattr(reader, "readers", None) or [reader]:     # a split set holds one reader per shard
        drop_pages(getattr(part, "data", None))


class GGUFSource:
    """Lazy, dequantizing access to a GGUF file's tensors by role name."""

    def __init__(self, path: str | os.PathLike, reader: gguf.GGUFReader, spec: ModelSpec):
        self.path = str(path)
        self.reader = reader
        self.spec = spec
        self.permuted = get_architecture(spec.arch).gguf_rope_permuted
        self._tensors = {t.name: t for t in reader.tensors}
        expected = set(roles.all_tensor_names(spec))
        extra = sorted(set(self._tensors) - expected)
        if extra:
            raise TwinquantError(f"{path}: tensors no role consumes: {', '.join(extra[:5])}")
        missing = [n for n in roles.all_tensor_names(spec) if n not in self._tensors]
        if missing:
            raise TwinquantError(f"{path}: missing tensors: {', '.join(missing[:5])}")

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))

    def load(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        shape = tuple(int(d) for d in reversed(t.shape))
        data = t.data
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1, shape[-1])
        rows = data.reshape(flat.shape[0], -1) if data.ndim >= 2 else data.reshape(1, -1)
        try:    # row chunks: gguf-py's numpy dequantizers hold several temporaries of the output's size
            for r in range(0, flat.shape[0], DEQUANT_ROWS):
                flat[r: r + DEQUANT_ROWS] = np.asarray(
                    gguf.quants.dequantize(rows[r: r + DEQUANT_ROWS], t.tensor_type), dtype=np.float32
                ).reshape(-1, shape[-1])
        except NotImplementedError:
            raise TwinquantError(f"{name}: tensor type {t.tensor_type.name} cannot be dequantized") from None
        w = torch.from_numpy(out)
        heads = self._rope_heads(name)
        return unpermute_rope_rows(w, heads) if heads else w

    def release(self) -> None:
        """Drop the file pages this process has touched from its resident set (they stay in the page cache):
        streaming a 1 GB file block by block must not show up as 1 GB resident at the end."""
        drop_mapped_pages(self.reader)

    def _rope_heads(self, name: str) -> int:
        """Heads of a tensor whose rows llama.cpp stores permuted (q/k weights and biases), else 0."""
        if not self.permuted:
            return 0
        return rope_permuted_heads(self.spec, name)


def load_gguf(path: str | os.PathLike, load_tokenizer: bool = True, keep_quantized: bool = False) -> Model:
    """A model from a GGUF file, or from a split model (llama.cpp's `<stem>-00001-of-0000N.gguf` shards) given
    its first shard: the shards are found by name and their tensors merged; metadata comes from the first.

    keep_quantized: also keep every quantized tensor's packed blocks (`model.quantized`), so writing the model
    again reproduces them byte for byte (e.g. `duplicate` adds metadata to a quantized file)."""
    reader = open_gguf(path)
    if split_count(reader) > 1:
        reader = open_split(path, reader)
    spec = spec_from_gguf(reader)
    source = GGUFSource(path, reader, spec)
    meta = read_metadata(reader)
    tokenizer = None
    if load_tokenizer:
        from twinquant.io.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(reader)
    model = Model(spec=spec, source=source, tokenizer=tokenizer)
    apply_metadata(model, meta)
    if keep_quantized:
        from twinquant.model.model import QuantizedWeight

        floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
        for t in reader.tensors:
            if t.tensor_type in floats:
                continue
            data = np.asarray(t.data)                 # [rows, bytes per row], memory-mapped
            heads = source._rope_heads(t.name)
            if heads:   # rows are independent blocks: un-permuting packed rows is exact
                data = unpermute_rope_rows(torch.from_numpy(np.array(data)), heads).numpy()
            model.quantized[t.name] = QuantizedWeight(t.tensor_type, data)
    return model
