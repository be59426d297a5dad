"""GGUF files: hyper-parameters, tokenizer and tensors (any type gguf-py can dequantize), read lazily.

The file is memory-mapped by gguf-py's `GGUFReader`; a tensor is dequantized to float32 only when a stage asks
for it. Loading never executes anything from the file, and every tensor's extent is checked against the file
size before use. llama-family q/k rows are stored permuted for llama.cpp's interleaved RoPE; they are restored
to the HF (rotate-half) order here, which is exact.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError, one_line, show
from twinquant.formats.ggml import dequantize_bytes
from twinquant.io.split import SHARD_NAME, shard_name, shard_paths
from twinquant.io.metadata import apply_metadata, read_metadata
from twinquant.model import roles
from twinquant.model.architectures import get_architecture
from twinquant.model.model import Model, TensorInfo
from twinquant.model.spec import ModelSpec

T = gguf.MODEL_TENSOR
K = gguf.Keys
DEQUANT_ROWS = 8192
MAX_ARRAY_ITEMS = 1 << 24     # a metadata array longer than this is damage (tokenizers hold ~10^5 entries)
_ARRAY = int(gguf.GGUFValueType.ARRAY)


class _BoundedReader(gguf.GGUFReader):
    """gguf-py's reader with the bound it lacks: a metadata array's length must fit in the rest of the file (and be
    sane) before gguf-py loops over its items one by one. gguf-py reads past the end of the file as an empty array
    and carries on, so a damaged length (2^60 items of a scalar type) made it loop for ever, appending to a list on
    every turn. (Other reads past the end fail at once: gguf-py indexes the empty result.)"""

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == _ARRAY:      # a plain int: numpy scalar == IntEnum costs ~8 us, on every tokenizer entry
            item_type, n = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(item_type)
            least = np.dtype(scalar).itemsize if scalar is not None else 8    # a string or array: its length
            if n > MAX_ARRAY_ITEMS or n * least > len(self.data) - orig_offs - 12:
                raise ValueError(f"array of {n} items at byte {orig_offs} does not fit in the file")
        return super()._get_field_parts(orig_offs, raw_type)

    def _get(self, offset, dtype, count=1, override_order=None):
        """gguf-py's `_get` on a plain ndarray view of the map: slicing a `np.memmap` runs two Python-level hooks
        per slice, and a tokenizer's ~450k metadata items made opening a Qwen file take 16 s instead of ~5."""
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        arr = plain[offset: offset + dt.itemsize * int(count)].view(dt)[:int(count)]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise TwinquantError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TwinquantError(f"{path}: not a GGUF file (bad magic)")
    try:
        reader = _BoundedReader(path, "r")
    except MemoryError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged headers
        raise TwinquantError(f"{path}: corrupt or truncated GGUF ({one_line(e)})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        offset = int(t.field.parts[-1][0])
        if offset + reader.data_offset != t.data_offset:     # gguf-py adds them as uint64, which wraps around
            raise TwinquantError(f"{path}: corrupt GGUF (tensor {show(t.name)} has offset {offset})")
        if t.data_offset + t.n_bytes > size:
            raise TwinquantError(f"{path}: truncated GGUF (tensor {show(t.name)} runs past the end of the file)")
    return reader


def split_count(reader: gguf.GGUFReader) -> int:
    return field(reader, K.Split.LLM_KV_SPLIT_COUNT, 1, int)


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
        if field(r, K.Split.LLM_KV_SPLIT_NO, None, int) != i or split_count(r) != count:
            raise TwinquantError(f"{p}: not shard {i + 1} of {count} (its split.no / split.count disagree)")
        for t in r.tensors:
            if t.name in seen:
                raise TwinquantError(f"{p}: tensor {show(t.name)} also appears in an earlier shard")
            seen.add(t.name)
    total = field(readers[0], K.Split.LLM_KV_SPLIT_TENSORS_COUNT, None, int)
    if total is not None and total != len(seen):
        raise TwinquantError(f"{paths[0]}: split.tensors.count is {total}, the shards hold {len(seen)} tensors")
    return SplitReader(paths, readers)


def field(reader: gguf.GGUFReader, key: str, default=..., kind: type | None = None):
    """The value of metadata `key` (`default` if absent; required if no default). kind int / float / str: the
    value must be of that type (an int is a float too; a bool is no int)."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise TwinquantError(f"GGUF metadata: missing required key {key!r}")
        return default
    try:
        v = f.contents()
    except (ValueError, IndexError, TypeError) as e:      # e.g. a string that is not UTF-8
        raise TwinquantError(f"GGUF metadata: unreadable value of {key!r} ({type(e).__name__})") from None
    ok = {int: (int,), float: (int, float), str: (str,)}.get(kind, (object,))
    if not isinstance(v, ok) or (kind in (int, float) and isinstance(v, bool)):
        raise TwinquantError(f"GGUF metadata: {key!r} is {type(v).__name__} {str(v)[:40]!r}, expected {kind.__name__}")
    return float(v) if kind is float else v


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


def _deepseek(reader, a: dict, names: set[str], expert_ffn: int) -> dict:
    """Latent-attention and routing fields of a DeepSeek (deepseek2) file, defaulted as llama.cpp defaults them."""
    if any(n.endswith(".attn_kv_b.weight") for n in names):
        raise TwinquantError("GGUF: an early DeepSeek file with the unsplit attn_kv_b tensor; convert the model "
                             "again (llama.cpp's converter now writes attn_k_b and attn_v_b)")
    dense = field(reader, K.LLM.LEADING_DENSE_BLOCK_COUNT.format(**a), 0, int)
    gating = field(reader, K.LLM.EXPERT_GATING_FUNC.format(**a), int(gguf.ExpertGatingFuncType.SOFTMAX), int)
    if gating not in (int(gguf.ExpertGatingFuncType.SOFTMAX), int(gguf.ExpertGatingFuncType.SIGMOID)):
        raise TwinquantError(f"GGUF metadata: expert gating function {gating} is not supported (softmax, sigmoid)")
    groups = field(reader, K.LLM.EXPERT_GROUP_COUNT.format(**a), 1, int) or 1
    return dict(
        shared_ffn=field(reader, K.LLM.EXPERT_SHARED_COUNT.format(**a), 0, int) * expert_ffn,
        norm_topk=bool(field(reader, K.LLM.EXPERT_WEIGHTS_NORM.format(**a), False)),
        gating="sigmoid" if gating == int(gguf.ExpertGatingFuncType.SIGMOID) else "softmax",
        expert_bias=f"blk.{dense}.exp_probs_b.bias" in names, n_groups=groups,
        groups_used=field(reader, K.LLM.EXPERT_GROUP_USED_COUNT.format(**a), groups, int) if groups > 1 else 1,
        expert_scale=field(reader, K.LLM.EXPERT_WEIGHTS_SCALE.format(**a), 0.0, float) or 1.0,   # 0: unscaled
        n_dense_lead=dense,
        q_lora_rank=field(reader, K.Attention.Q_LORA_RANK.format(**a), 0, int),
        kv_lora_rank=field(reader, K.Attention.KV_LORA_RANK.format(**a), kind=int),
        rope_dim=field(reader, K.Rope.DIMENSION_COUNT.format(**a), kind=int),
        v_head_dim=field(reader, K.Attention.VALUE_LENGTH_MLA.format(**a), kind=int))


def _yarn(reader, a: dict, mla: bool) -> dict:
    """YaRN's fields as llama.cpp reads them (its betas: 32 and 1; DeepSeek's mscale = mscale_all_dim, from the
    log multiplier the converter writes as 0.1 x mscale_all_dim)."""
    kind = field(reader, K.Rope.SCALING_TYPE.format(**a), "none", str)
    if kind in ("none", "linear") and not field(reader, K.Rope.SCALING_FACTOR.format(**a), 0.0, float):
        return {}
    if kind != "yarn":
        raise TwinquantError(f"GGUF metadata: RoPE scaling {kind[:40]!r} is not supported yet (default RoPE or YaRN)")
    mscale = field(reader, K.Rope.SCALING_YARN_LOG_MUL.format(**a), 0.0, float) / 0.1 if mla else 0.0
    return dict(yarn_factor=field(reader, K.Rope.SCALING_FACTOR.format(**a), kind=float),
                yarn_orig_ctx=field(reader, K.Rope.SCALING_ORIG_CTX_LEN.format(**a), None, int)
                or field(reader, K.LLM.CONTEXT_LENGTH.format(**a), kind=int),
                yarn_mscale=mscale, yarn_mscale_all_dim=mscale)


def spec_from_gguf(reader: gguf.GGUFReader) -> ModelSpec:
    arch_name = field(reader, K.General.ARCHITECTURE, kind=str)
    arch = get_architecture(arch_name)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise TwinquantError("GGUF: RoPE frequency factors (rope_freqs) are not supported yet")
    a = {"arch": arch_name}
    hidden = field(reader, K.LLM.EMBEDDING_LENGTH.format(**a), kind=int)
    heads = field(reader, K.Attention.HEAD_COUNT.format(**a), kind=int)
    kv = field(reader, K.Attention.HEAD_COUNT_KV.format(**a), heads, int)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise TwinquantError("GGUF: no token_embd.weight tensor")
    vocab = field(reader, K.LLM.VOCAB_SIZE.format(**a), None, int) or int(embd.shape[-1])
    n_layers = field(reader, K.LLM.BLOCK_COUNT.format(**a), kind=int)
    if n_layers > len(reader.tensors):     # before anything makes a list of n_layers blocks
        raise TwinquantError(f"GGUF metadata: block_count {n_layers}, but the file holds {len(reader.tensors)} tensors")
    rope_theta = field(reader, K.Rope.FREQ_BASE.format(**a), 10000.0, float)
    rms_eps = field(reader, K.Attention.LAYERNORM_RMS_EPS.format(**a), kind=float)
    for key, v in (("rope.freq_base", rope_theta), ("attention.layer_norm_rms_epsilon", rms_eps)):
        if not (math.isfinite(v) and v > 0):
            raise TwinquantError(f"GGUF metadata: {arch_name}.{key} is {v}, must be a positive finite number")
    n_experts = field(reader, K.LLM.EXPERT_COUNT.format(**a), 0, int) if arch.moe else 0
    if arch.moe and not n_experts:
        raise TwinquantError(f"GGUF metadata: {arch_name}.expert_count is missing or 0")
    experts = {} if not n_experts else dict(
        n_experts=n_experts, n_experts_used=field(reader, K.LLM.EXPERT_USED_COUNT.format(**a), kind=int),
        expert_ffn=field(reader, K.LLM.EXPERT_FEED_FORWARD_LENGTH.format(**a), kind=int),
        shared_ffn=field(reader, K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(**a), 0, int)
        if arch.shared_expert else 0,
        norm_topk=arch.gguf_norm_topk)     # what llama.cpp's graph for the family does
    attn = dict(n_kv_heads=kv,
                head_dim=field(reader, K.Attention.KEY_LENGTH.format(**a), hidden // heads if heads > 0 else 0, int))
    if arch.mla:
        experts.update(_deepseek(reader, a, names, experts["expert_ffn"]))
        attn = dict(n_kv_heads=heads, head_dim=field(reader, K.Attention.KEY_LENGTH_MLA.format(**a), kind=int))
    return ModelSpec(
        arch=arch.name,
        **experts,
        **attn,
        **_yarn(reader, a, arch.mla),
        n_layers=n_layers,
        hidden=hidden,
        intermediate=field(reader, K.LLM.FEED_FORWARD_LENGTH.format(**a), kind=int),
        n_heads=heads,
        vocab=vocab,
        rope_theta=rope_theta,
        rms_eps=rms_eps,
        tied_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        context_length=field(reader, K.LLM.CONTEXT_LENGTH.format(**a), 4096, int),
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
            raise TwinquantError(f"{path}: tensors no role consumes: {', '.join(map(_show, extra[:5]))}")
        missing = [n for n in roles.all_tensor_names(spec) if n not in self._tensors]
        if missing:
            raise TwinquantError(f"{path}: missing tensors: {', '.join(missing[:5])}")
        for n, t in self._tensors.items():   # before any dequantizing / un-permuting by the metadata's shapes
            shape, want = tuple(int(d) for d in reversed(t.shape)), roles.expected_shape(spec, n)
            # llama-quantize drops a size-1 dimension (the shared expert's gate [1, hidden] becomes [hidden])
            if shape != want and [d for d in shape if d != 1] != [d for d in want if d != 1]:
                raise TwinquantError(f"{path}: tensor {n} has shape {shape}, the metadata says {want}")

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(name, roles.expected_shape(self.spec, name), t.tensor_type.name, int(t.n_bytes))

    def load(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        shape = roles.expected_shape(self.spec, name)
        data = t.data
        out = np.empty(shape, dtype=np.float32)
        flat = out.reshape(-1, shape[-1])
        rows = data.reshape(flat.shape[0], -1) if data.ndim >= 2 else data.reshape(1, -1)
        try:    # row chunks: gguf-py's numpy dequantizers hold several temporaries of the output's size
            for r in range(0, flat.shape[0], DEQUANT_ROWS):
                flat[r: r + DEQUANT_ROWS] = dequantize_bytes(rows[r: r + DEQUANT_ROWS], t.tensor_type
                                                             ).reshape(-1, shape[-1])
        except TwinquantError as e:
            raise TwinquantError(f"{name}: {e}") from None
        w = torch.from_numpy(out)
        heads = self._rope_heads(name)
        return unpermute_rope_rows(w, heads) if heads else w

    def load_expert(self, name: str, expert: int) -> torch.Tensor:
        """One expert's [out, in] of a stacked tensor [experts, out, in]: only its rows are read and dequantized."""
        t = self._tensors[name]
        shape = roles.expected_shape(self.spec, name)
        rows = t.data.reshape(shape[0], shape[1], -1)[expert]
        try:
            return torch.from_numpy(np.ascontiguousarray(dequantize_bytes(rows, t.tensor_type).reshape(shape[1:]),
                                                         dtype=np.float32))
        except TwinquantError as e:
            raise TwinquantError(f"{name}: {e}") from None

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
    try:
        meta = read_metadata(reader)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TwinquantError(f"{path}: corrupt twinquant.* metadata ({one_line(e)})") from None
    tokenizer = None
    if load_tokenizer:
        from twinquant.io.tokenizer import Tokenizer

        try:
            tokenizer = Tokenizer.from_gguf(reader)
        except (ValueError, TypeError, KeyError, IndexError) as e:     # e.g. a token that is not UTF-8
            raise TwinquantError(f"{path}: corrupt tokenizer metadata ({one_line(e)})") from None
    model = Model(spec=spec, source=source, tokenizer=tokenizer)
    try:
        apply_metadata(model, meta)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TwinquantError(f"{path}: corrupt twinquant.* metadata ({one_line(e)})") from None
    if keep_quantized:
        from twinquant.model.model import QuantizedWeight

        floats = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
        for t in reader.tensors:
            if t.tensor_type in floats or len(t.shape) != 2:    # 1-D tensors are kept (and written) as F32
                continue
            data = np.asarray(t.data)                 # [rows, bytes per row], memory-mapped
            heads = source._rope_heads(t.name)
            if heads:   # rows are independent blocks: un-permuting packed rows is exact
                data = unpermute_rope_rows(torch.from_numpy(np.array(data)), heads).numpy()
            model.quantized[t.name] = QuantizedWeight(t.tensor_type, data)
    return model
