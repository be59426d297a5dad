"""`Model`: spec + weights by role + layout (+ tokenizer), the one representation every stage works on.

Weights come from a `TensorSource` (a Hugging Face directory or a GGUF file) and are materialised lazily, one
tensor at a time, so a single block can be loaded (and released) alone: quantizing a 32B model block by block
never needs the whole model in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from twinquant.errors import TwinquantError, all_finite
from twinquant.model import roles
from twinquant.model.layout import Layout
from twinquant.model.spec import ModelSpec

if TYPE_CHECKING:
    from twinquant.io.tokenizer import Tokenizer


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    return fn


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc only; elsewhere a no-op). Without it a streamed run's
    resident size creeps up block after block: glibc raises its mmap threshold after large frees, so later
    block-sized temporaries come from the heap and their freed pages are kept (measured: +3-6 MB per block on
    a 512-wide model; flat with this)."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # HF orientation ([out, in] for linears)
    source_type: str           # "F32", "BF16", "Q4_K" ...
    nbytes: int                # bytes in the source file


class TensorSource(Protocol):
    """Where a model's tensors live; `load` returns a float32 CPU tensor in HF orientation."""

    path: str

    def info(self, name: str) -> TensorInfo: ...

    def load(self, name: str) -> torch.Tensor: ...


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight held in a GGML block format: the packed bytes as written to GGUF ([rows, bytes per row], HF row
    order) and the type. The float tensor in `Model.tensors` is its exact dequantization (what the forward runs)."""

    ggml_type: object            # gguf.GGMLQuantizationType
    data: object                 # numpy uint8 [rows, bytes_per_row]


@dataclass
class Model:
    spec: ModelSpec
    source: TensorSource | None = None
    tokenizer: "Tokenizer | None" = None
    layout: Layout | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    # Online transforms the forward must apply (rotation R4 on a linear's input, R3 on q/k after RoPE), and the
    # record of every rotation fused into the weights (kind, type, size, seed), for metadata and the runtime.
    input_transforms: dict[str, object] = field(default_factory=dict)
    qk_transform: object | None = None
    history: list = field(default_factory=list)     # twinquant.model.history records, in order
    # How the weights were quantized (recipe, calibration hash/tokens), for the `twinquant.quant` metadata.
    quant_record: dict | None = None
    # Per-copy parameter sets of the layout's executions (twinquant.model.copies.ParamStore); None: plain.
    dup_params: object | None = None
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    # Linears the forward runs from their packed GGML bytes on the device (formats/ggml/packed.PackedWeight,
    # set by runtime/packed_weights.py): never dequantized into `tensors`.
    packed: dict[str, object] = field(default_factory=dict)
    # Runs of packed members of one shared-input group with one type, held as one concatenated PackedWeight
    # (formats/ggml/packed.PackedRun, keyed by the first member): one GEMV launch for q+k or gate+up.
    packed_groups: dict[str, object] = field(default_factory=dict)
    # Linears that read one input (q/k/v, gate/up) live in one concatenated tensor and `tensors` holds row
    # views of it, so the forward can run one larger matmul (faster on CPU) at no extra memory.
    _fused: dict[tuple[str, ...], tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = field(default_factory=dict)
    # Tensors set in memory (`set`) that the source does not hold: never released (a reload would lose them).
    _pinned: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.layout is None:
            self.layout = Layout.sequential(self.spec.n_layers)
        self.layout.validate(self.spec.n_layers)
        self.device = torch.device(self.device)

    # --- weights -------------------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return roles.all_tensor_names(self.spec)

    def get(self, name: str) -> torch.Tensor:
        """The tensor for a role, loaded from the source on first use."""
        t = self.tensors.get(name)
        if t is None:
            if self.source is None and name not in self.quantized:
                raise KeyError(name)
            group = self._group_of(name)
            for n in group or (name,):
                if n not in self.tensors:
                    self.tensors[n] = self._place(n, self._load(n))
            if group:
                self._fuse(group)
            t = self.tensors[name]
        return t

    def _load(self, name: str) -> torch.Tensor:
        """A released tensor: the dequantization of its packed bytes if it was quantized, else the source's."""
        q = self.quantized.get(name)
        if q is not None:
            from twinquant.formats.ggml import get_codec

            shape = roles.expected_shape(self.spec, name)      # [experts, out, in] for stacked experts
            return get_codec(q.ggml_type.name).dequantize_bytes(q.data, shape[-1]).reshape(shape)
        if self.source is None:
            raise KeyError(name)
        return self.source.load(name)

    def expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e's [out, in] weight of a stacked expert tensor, without materialising the stack unless it is held
        (a DeepSeek-V3 block's stacks are 45 GB in float32): from the held stack, its packed bytes, or the source."""
        t = self.tensors.get(name)
        if t is not None:
            return t[e]
        shape = roles.expected_shape(self.spec, name)
        q = self.quantized.get(name)
        if q is not None:
            from twinquant.formats.ggml import get_codec

            w = get_codec(q.ggml_type.name).dequantize_bytes(q.data.reshape(shape[0], shape[1], -1)[e], shape[-1])
            w = w.reshape(shape[1:])
        elif self.source is None:
            raise KeyError(name)
        else:
            load = getattr(self.source, "load_expert", None)
            w = load(name, e) if load is not None else self.source.load(name)[e]
        if tuple(w.shape) != tuple(shape[1:]):
            raise TwinquantError(f"{name}: expert {e} has shape {tuple(w.shape)}, the model's is {tuple(shape[1:])}")
        if not all_finite(w):
            raise TwinquantError(f"{name}: expert {e} contains NaN or Inf values")
        return w.to(device=self.device, dtype=self.dtype).contiguous()

    def _group_of(self, name: str) -> tuple[str, ...] | None:
        parts = name.split(".")
        if parts[0] != "blk" or parts[-1] != "weight":
            return None
        for g in self._fusable(int(parts[1])):
            if name in g:      # a group with packed members (runtime/packed_weights.py) is loaded one by one
                return None if any(n in self.packed for n in g) else g
        return None

    def _fusable(self, layer: int) -> list[tuple[str, ...]]:
        """Shared-input groups of block `layer` held as one concatenated matrix (not the stacked experts)."""
        return [g for g in roles.shared_input_groups(layer, self.spec) if len(g) > 1 and not roles.is_stack(g[0])]

    def _fuse(self, group: tuple[str, ...]) -> None:
        whole = torch.cat([self.tensors[n] for n in group])
        views = whole.split([self.tensors[n].shape[0] for n in group])
        self.tensors.update(zip(group, views))
        self._fused[group] = (whole, views)

    def fused(self, group: tuple[str, ...]) -> torch.Tensor | None:
        """The concatenated weight of a shared-input group, if its members are still the views of it."""
        entry = self._fused.get(group)
        if entry is not None and all(self.tensors.get(n) is v for n, v in zip(group, entry[1])):
            return entry[0]
        return None

    def _place(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = roles.expected_shape(self.spec, name)
        if tuple(t.shape) != want:
            raise TwinquantError(f"{name}: shape {tuple(t.shape)} does not match the model's {want}")
        if not all_finite(t):
            raise TwinquantError(f"{name}: tensor contains NaN or Inf values")
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def set(self, name: str, t: torch.Tensor) -> None:
        """Replace a tensor (float); a packed quantized form of it, if any, no longer applies."""
        self.tensors[name] = self._place(name, t)
        self.quantized.pop(name, None)
        self._pinned.add(name)

    def set_quantized(self, name: str, dequantized: torch.Tensor, q: QuantizedWeight) -> None:
        self.set(name, dequantized)
        self.quantized[name] = q
        self._pinned.discard(name)          # it comes back from its packed bytes

    def output_weight(self) -> torch.Tensor:
        return self.get(roles.name(roles.T.TOKEN_EMBD if self.spec.tied_embeddings else roles.T.OUTPUT))

    def block(self, layer: int) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in roles.block_tensor_names(self.spec, layer)}

    def release_block(self, layer: int) -> None:
        """Drop a block's materialised tensors (they reload from the source, or from their packed bytes once
        quantized, on next use)."""
        if self.source is None:
            return
        names = [n for n in roles.block_tensor_names(self.spec, layer) if n not in self._pinned]
        for n in names:
            self.tensors.pop(n, None)
        for g in self._fusable(layer):
            if any(n in names for n in g):
                self._fused.pop(g, None)
        self._release_source()
        return_freed_memory()

    def _release_source(self) -> None:
        release = getattr(self.source, "release", None)
        if release is not None:
            release()

    def release(self, name: str) -> None:
        """Drop one materialised tensor (e.g. the embedding once the calibration activations exist)."""
        if (self.source is not None or name in self.quantized) and name not in self._pinned:
            self.tensors.pop(name, None)
            for g in [g for g in self._fused if name in g]:
                self._fused.pop(g)
            self._release_source()

    def materialize(self) -> "Model":
        for n in self.tensor_names():
            if n not in self.packed:
                self.get(n)
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Model":
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for n, t in list(self.tensors.items()):
            self.tensors[n] = self._place(n, t)
        return self.fuse_shared_inputs()

    def fuse_shared_inputs(self) -> "Model":
        """(Re-)fuse every shared-input group whose members are loaded (after stages replaced tensors)."""
        self._fused.clear()
        for i in range(self.spec.n_layers):
            for g in self._fusable(i):
                if all(n in self.tensors for n in g):
                    self._fuse(g)
        return self

    @property
    def needs_online(self) -> bool:
        """True when the forward applies transforms stock llama.cpp does not (R3/R4)."""
        return bool(self.input_transforms) or self.qk_transform is not None

    # --- facts ---------------------------------------------------------------------------------------------
    def tensor_info(self, name: str) -> TensorInfo:
        if self.source is not None and name not in self.tensors:
            return self.source.info(name)
        t = self.get(name)
        return TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch.").upper(),
                          t.numel() * t.element_size())

    def n_params(self) -> int:
        n = 0
        for name in self.tensor_names():
            shape = roles.expected_shape(self.spec, name)
            size = 1
            for d in shape:
                size *= d
            n += size
        return n
