"""Linear layers whose weights stay in their packed GGML bytes on the GPU (the runtime's decode path): K-quants and
the i-quants (`IQ_TYPES`).

`qlinear(x, w)` is F.linear(x, W) with W read from the bytes GGUF stores (formats/ggml/triton_kquants.py; the
i-quants' weights from triton_iquants.py): one dequant-GEMV per activation row up to GEMV_MAX_ROWS rows (decode
reads 84 bytes per 256 Q2_K weights instead of 1 KB of float32), above that one dequantization into x's dtype and a
dense matmul (prefill: the matmul dominates).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch
import torch.nn.functional as F

from twinquant.errors import TwinquantError
from twinquant.triton_env import interpreted, runs_triton

GEMV_MAX_ROWS = 8
QK_K = 256
# the i-quants with a kernel (triton_iquants.py; their codebooks are looked up in GPU memory)
IQ_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS")
# type -> (the kernels' TYPE id, bytes per super-block)
KERNEL_TYPES = {t: (int(t[1]) if t[0] == "Q" else 10 + IQ_TYPES.index(t),
                    gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][1])
                for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", *IQ_TYPES)}
# byte offsets of each super-block's fp16 fields (d, dmin), ggml-common.h's block_q*_K / block_iq*; IQ1_M keeps
# its d in the top nibbles of its four scale words (bytes 49, 51, 53, 55)
F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
              **{t: (0,) for t in IQ_TYPES if t != "IQ1_M"}, "IQ1_M": ()}


@dataclass(frozen=True)
class PackedWeight:
    """A weight as GGML bytes on a device: data uint8 [rows, bytes per row], HF row order. `layout` "ggml": each
    row as GGUF stores it; "planes" (Q2_K, `planes`): the same bytes of each row regrouped."""

    ggml_type: str
    data: torch.Tensor
    cols: int
    layout: str = "ggml"

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @classmethod
    def from_bytes(cls, ggml_type: str, data, cols: int, device) -> "PackedWeight":
        if ggml_type not in KERNEL_TYPES:
            raise TwinquantError(f"no packed-weight kernel for {ggml_type} (have: {', '.join(KERNEL_TYPES)})")
        arr = np.ascontiguousarray(np.asarray(data, dtype=np.uint8))
        if not arr.flags.writeable:         # a memory-mapped file: torch wants memory it may write
            arr = arr.copy()
        if cols % QK_K or arr.ndim != 2 or arr.shape[1] != cols // QK_K * KERNEL_TYPES[ggml_type][1]:
            raise TwinquantError(f"{ggml_type}: packed rows of {arr.shape[-1]} bytes do not hold {cols} columns")
        return cls(ggml_type, torch.from_numpy(arr).to(device), cols)


@dataclass(frozen=True)
class PackedRun:
    """Linears that read one input and share a type (q and k, gate and up) as one weight: `whole` holds their rows
    one after another, `views` are the members' weights (row views of it, so no extra memory), `bias` the
    concatenated biases (None without) and `bias_views` the members' bias tensors as views of it."""

    members: tuple[str, ...]
    whole: PackedWeight
    views: tuple[PackedWeight, ...]
    bias: torch.Tensor | None = None
    bias_views: tuple[torch.Tensor, ...] = ()

    @classmethod
    def join(cls, members: tuple[str, ...], weights: list[PackedWeight],
             biases: list[torch.Tensor] | None = None) -> "PackedRun":
        if len({w.layout for w in weights}) > 1:
            raise TwinquantError(f"cannot join packed weights of different layouts ({', '.join(members)})")
        whole = PackedWeight(weights[0].ggml_type, torch.cat([w.data for w in weights]), weights[0].cols,
                             weights[0].layout)
        views = tuple(PackedWeight(whole.ggml_type, d, whole.cols, whole.layout) for d in
                      whole.data.split([w.rows for w in weights]))
        if biases is None:
            return cls(members, whole, views)
        bias = torch.cat(biases)
        return cls(members, whole, views, bias, tuple(bias.split([w.rows for w in weights])))

    def product(self, x: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
        """Each member's F.linear(x, W, b), from one GEMV over the whole run."""
        y = qlinear(x, self.whole, self.bias if with_bias else None)
        return list(y.split([v.rows for v in self.views], dim=-1))


def kernel_for(ggml_type: str, device) -> bool:
    """True when qlinear has a kernel for this type on this device."""
    return ggml_type in KERNEL_TYPES and runs_triton(torch.empty(0, device=device))


def _gemv_config(rows: int, nb: int, br: int = 8, max_split: int = 4) -> tuple[int, int]:
    """(rows per program, super-block split): split the columns of short matrices so that the programs fill a
    large GPU (132 SMs on an H200) several times over, at most `max_split` ways (4: the H200 sweep's best for the
    float kernels on the 32B shapes; the int8 kernel's sweep on an H100 chose 8 for 5120 and 4096 rows)."""
    programs = -(-rows // br)
    split = 1
    while programs * split < 4 * 132 and split < max_split and nb >= 4 * split:
        split *= 2
    return br, split


def _tables(w: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """An i-quant's lookup tables on the weight's device: its codebook (float32 [points, width]) and the ±1 sign
    patterns (IQ4_XS: its 16 kvalues instead); a K-quant has none (its bytes stand in, never read)."""
    from twinquant.formats.ggml.iq_dequant import _grid, _ksign_bits, _kvalues

    dev = w.data.device
    if w.ggml_type not in IQ_TYPES:
        return w.data, w.data
    if w.ggml_type == "IQ4_XS":
        return _kvalues(dev), _kvalues(dev)
    return _grid(gguf.GGMLQuantizationType[w.ggml_type], dev), _ksign_bits(dev)


@functools.lru_cache(maxsize=None)
def _group_tables(ggml_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ2_XXS / IQ2_XS tables of `gemv_iq2_kernel`, built once per device (a decode step's CUDA graph cannot copy
    from the host): the codebook as float32 [entries, 8] (the 8 magnitudes of an entry, one 32-byte row) and the
    128 sign patterns (IQ2_XXS.ksigns) as int32 [128, 8] float sign bits (0 or 1 << 31, xor-ed into a magnitude):
    a group's weights are two table rows, no conversions (8 + 4 KB for IQ2_XS, in L1)."""
    from twinquant.formats.ggml.iq_dequant import _grid

    mags = _grid(gguf.GGMLQuantizationType[ggml_type], device).to(torch.float32).contiguous()
    ksigns = torch.tensor(np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8).astype(np.int64), device=device)
    negative = (ksigns[:, None] >> torch.arange(8, device=device)) & 1
    return mags, torch.where(negative > 0, -2 ** 31, 0).to(torch.int32).contiguous()         # int32's sign bit


# Q2_K's planes: within each row, the super-blocks' code bytes (64 each), then their scale bytes (16), then their
# d|dmin (4): GGUF's 84-byte blocks are only 4-byte aligned, so a lane's 16 code bytes take four loads; in planes
# one 16-byte load where the row is 16-byte aligned (NB % 4 == 0). The same bytes, moved once at load (`planes`).
PLANES_TYPES = ("Q2_K",)
_Q2K_PARTS = ((16, 80), (0, 16), (80, 84))            # codes, scales, d|dmin: byte ranges in a GGUF block


def planes(w: PackedWeight) -> PackedWeight:
    """w with each row's bytes in planes (`PLANES_TYPES`); one copy of w on its device while it is made."""
    if w.layout == "planes":
        return w
    if w.ggml_type not in PLANES_TYPES:
        raise TwinquantError(f"no planes layout for {w.ggml_type} (have: {', '.join(PLANES_TYPES)})")
    blocks = w.data.view(w.rows, w.cols // QK_K, KERNEL_TYPES[w.ggml_type][1])
    data = torch.cat([blocks[:, :, a:b].reshape(w.rows, -1) for a, b in _Q2K_PARTS], dim=1)
    return PackedWeight(w.ggml_type, data, w.cols, "planes")


def ggml_bytes(w: PackedWeight) -> torch.Tensor:
    """w's bytes as GGUF stores them [rows, bytes per row] (a copy where w is in planes)."""
    if w.layout == "ggml":
        return w.data
    nb = w.cols // QK_K
    cuts = [nb * (b - a) for a, b in _Q2K_PARTS]
    codes, scales, dd = (p.reshape(w.rows, nb, -1) for p in w.data.split(cuts, dim=1))
    return torch.cat([scales, codes, dd], dim=2).reshape(w.rows, -1)


def planes_default() -> tuple[str, ...]:
    """The types the runtime moves into planes at load (`planes`): those TWINQUANT_PLANES names (comma-separated)."""
    return _listed(os.environ.get("TWINQUANT_PLANES", ""), PLANES_TYPES)


def _q2k_rows(w: PackedWeight) -> dict:
    """The Q2_K word-lane kernels' row arguments for w: its row stride in units of ALIGN int32 words (ALIGN the
    largest of 4, 2, 1 dividing a row in planes: how wide the planes' loads may be; 1 in GGUF's layout) and the
    layout flag."""
    words = w.data.shape[1] // 4
    align = 1 if w.layout != "planes" else 4 if words % 4 == 0 else 2 if words % 2 == 0 else 1
    return {"row_n": words // align, "PLANES": w.layout == "planes", "ALIGN": align}


def _x_broadcast(c: GemvConfig) -> bool:
    """Whether the Q2_K word-lane kernels (float and int8 x) load x at their lanes' full shape (XB): where the lanes
    (rows × super-blocks × 4) fill the program's threads; with fewer lanes than threads the broadcast is what moves
    x through shared memory (SASS at sm_90: tests/test_kernel_sass.py, benchmarks/results/kernel_sass_s22.md)."""
    return c.br * c.u * 4 >= 32 * c.warps


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [rows, cols] of a packed one, computed on its device."""
    from twinquant.formats.ggml.triton_kquants import dequant_kernel

    tid, bs = KERNEL_TYPES[w.ggml_type]
    data = ggml_bytes(w)
    out = torch.empty(w.rows, w.cols, dtype=dtype, device=w.data.device)
    br = 8
    dequant_kernel[(-(-w.rows // br), w.cols // QK_K)](data, out, *_tables(w), w.rows, data.shape[1], w.cols,
                                                       TYPE=tid, BS=bs, BR=br, num_warps=4)
    return out


class GemvConfig(NamedTuple):
    """A GEMV launch: rows per program, super-blocks per step (in flight at once), column split, warps."""

    br: int
    u: int
    split: int
    warps: int


# The launches a sweep measured best (benchmarks/gemv_configs.py --emit-table): {type: [[rows, nb, br, u, split,
# warps], ...]}; TWINQUANT_GEMV_TABLE names another such file (a sweep on this GPU)
LAUNCH_TABLE = Path(__file__).with_name("gemv_launches.json")


@functools.cache
def _launch_table(path: str) -> dict[str, list[list[int]]]:
    p = Path(path)
    return json.loads(p.read_text())["launches"] if p.is_file() else {}


# the types read in their own order (`gemv_bytes_kernel`: Q2_K, Q3_K; `gemv_iq2_kernel`: a group of 8 at a time),
# and those gemv sends there by default when the word-lane kernel is off (Q2_K: faster than the generic kernel on
# the GPUs measured; the others not timed on a GPU yet)
BYTE_ORDER_TYPES = ("Q2_K", "Q3_K", "IQ2_XXS", "IQ2_XS")
BYTE_ORDER_DEFAULT = ("Q2_K",)
# the types with a kernel whose lanes own whole sub-blocks (`gemv_q{2,3,6}k_words_kernel`), all gemv's default since
# the twentieth session's H100 run: Q2_K 36.4% of copy at 27648x5120 against the byte-order kernel's 25.8%, and a
# Qwen2.5-1.5B Q2_K-mix decode at 444 tokens/s against 331 with the other kernels, 0.96x llama.cpp CUDA
# (benchmarks/results/gemv_configs_s20-h100-words.md, decode_gpu_s20-h100-kernels.md). TWINQUANT_WORDS names the
# types to send there instead (comma-separated; empty: none), `words_default`
WORDS_TYPES = ("Q2_K", "Q3_K", "Q6_K")
WORDS_DEFAULT = WORDS_TYPES


@functools.lru_cache(maxsize=64)
def _listed(value: str, types: tuple[str, ...]) -> tuple[str, ...]:
    """The types of `types` named in a comma-separated setting (cached: every GEMV asks)."""
    return tuple(t for t in value.split(",") if t in types)


def words_default() -> tuple[str, ...]:
    """The types gemv sends to their word-lane kernel when not told: WORDS_DEFAULT, or those TWINQUANT_WORDS names
    where it is set (comma-separated; set and empty: none)."""
    value = os.environ.get("TWINQUANT_WORDS")
    return WORDS_DEFAULT if value is None else _listed(value, WORDS_TYPES)


# the types whose runtime GEMV quantizes x to int8 first (llama.cpp's arithmetic, `gemv_q8`): none by default (it
# is not the exact product); TWINQUANT_Q8=Q2_K does, to time a decode the way llama.cpp computes it
Q8_TYPES = ("Q2_K",)


def q8_default() -> tuple[str, ...]:
    """The types qlinear sends through `gemv_q8` (word-lane kernel): those in TWINQUANT_Q8 (comma-separated)."""
    return _listed(os.environ.get("TWINQUANT_Q8", ""), Q8_TYPES)


def q8_handed_over() -> bool:
    """Whether the kernels that make an int8-x GEMV's input hand it over quantized (`with_q8`; forward.q8_input):
    TWINQUANT_Q8_FUSED=0 keeps the GEMV's own quantize launch, to time the difference."""
    return os.environ.get("TWINQUANT_Q8_FUSED", "1") != "0"


def kernel_key(ggml_type: str, byte_order: bool | None = None, words: bool | None = None) -> str:
    """The launch table's key for a type through a kernel: "T:words" for the word-lane kernel, the type itself for
    its default other kernel, "T:bytes" for the byte-order kernel where that is not the default, "generic" for the
    generic kernel where it is not. None: the type's default (`words_default`, `BYTE_ORDER_DEFAULT`)."""
    if words is None:
        words = byte_order is None and ggml_type in words_default()
    if words:
        return f"{ggml_type}:words"
    if byte_order is None or byte_order == (ggml_type in BYTE_ORDER_DEFAULT):
        return ggml_type
    return f"{ggml_type}:bytes" if byte_order else "generic"


def gemv_config(key: str, rows: int, nb: int) -> GemvConfig:
    """The launch `gemv` uses for a [rows, nb·256] weight (`key`: `kernel_key`): the swept launch of the nearest
    measured shape of that key (log rows, log columns; a generic-kernel type the sweep did not take: the table's
    "generic" entries), else enough programs to fill the GPU (a decode GEMV waits on memory: what counts is how
    many loads are in flight), short rows split."""
    return _config_from(os.environ.get("TWINQUANT_GEMV_TABLE") or str(LAUNCH_TABLE), key, rows, nb)


@functools.lru_cache(maxsize=4096)
def _config_from(path: str, key: str, rows: int, nb: int) -> GemvConfig:
    """gemv_config with the table at `path` (cached: every decode GEMV asks)."""
    launches = _launch_table(path)
    words_kernel = key.endswith((":words", ":q8words", ":planes", ":q8planes"))
    bytes_kernel = key in BYTE_ORDER_DEFAULT or key.endswith(":bytes")
    table = launches.get(key) or (launches.get("generic") if not (bytes_kernel or words_kernel) else None)
    if table:
        near = min(table, key=lambda e: math.log(e[0] / rows) ** 2 + math.log(e[1] / nb) ** 2)
        br, u, split, warps = near[2:]
        while split > 1 and u * split > nb:        # a shorter row than the measured one: fewer column parts
            split //= 2
        while u > 1 and u > nb:
            u //= 2
        return GemvConfig(br, u, split, warps)
    # tiles of 64 code bytes (byte order), of 16 code words (word lanes), or of 256 weights
    br = 16 if bytes_kernel and not key.startswith("IQ") else 32 if words_kernel else 4
    u = 1
    while u < 4 and nb >= 4 * u:
        u *= 2
    split = 1
    while -(-rows // br) * split < 4 * 132 and split < 8 and nb >= 2 * u * split:
        split *= 2
    return GemvConfig(br, u, split, 4)


def gemv(x2: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
         byte_order: bool | None = None, config: GemvConfig | None = None, words: bool | None = None) -> torch.Tensor:
    """[M, rows] = x2 [M, cols] @ Wᵀ (+ bias) in out_dtype, float32 accumulation, one pass over the packed rows per
    activation row. `words`: True takes the kernel whose lanes own whole sub-blocks (`gemv_q{2,3,6}k_words_kernel`:
    Q2_K, Q3_K, Q6_K), None its default (`words_default`); otherwise `byte_order`: True takes the kernel that reads
    the type in its own order (`gemv_bytes_kernel`: Q2_K, Q3_K; `gemv_iq2_kernel`: IQ2_XXS, IQ2_XS), False the
    generic kernel, None each type's default (`BYTE_ORDER_DEFAULT`); `config` overrides `gemv_config`."""
    from twinquant.formats.ggml.triton_iquants import gemv_iq2_kernel
    from twinquant.formats.ggml.triton_kquants import (gemv_bytes_kernel, gemv_kernel, gemv_q2k_words_kernel,
                                                       gemv_q3k_words_kernel, gemv_q6k_words_kernel)

    tid, bs = KERNEL_TYPES[w.ggml_type]
    x2 = x2.contiguous()
    nb = w.cols // QK_K
    if byte_order and w.ggml_type not in BYTE_ORDER_TYPES:
        raise TwinquantError(f"gemv: no byte-order kernel for {w.ggml_type} (have: {', '.join(BYTE_ORDER_TYPES)})")
    if words and w.ggml_type not in WORDS_TYPES:
        raise TwinquantError(f"gemv: no word-lane kernel for {w.ggml_type} (have: {', '.join(WORDS_TYPES)})")
    by_words = (byte_order is None and w.ggml_type in words_default()) if words is None else words
    by_bytes = w.ggml_type in BYTE_ORDER_DEFAULT if byte_order is None else byte_order
    in_planes = w.layout == "planes"
    if in_planes and (words is False or byte_order):
        raise TwinquantError(f"gemv: a {w.ggml_type} weight in planes has only its word-lane kernel")
    by_words = by_words or in_planes
    key = f"{w.ggml_type}:planes" if in_planes else kernel_key(w.ggml_type, by_bytes, by_words)
    cfg = config or gemv_config(key, w.rows, nb)
    # a split adds partial sums atomically: into zeroed float32; otherwise each output is stored once
    y = (torch.zeros(x2.shape[0], w.rows, dtype=torch.float32, device=x2.device) if cfg.split > 1 else
         torch.empty(x2.shape[0], w.rows, dtype=out_dtype, device=x2.device))
    if x2.shape[0]:
        grid = (-(-w.rows // cfg.br), x2.shape[0], cfg.split)
        b = bias if bias is not None else y
        args = (w.data, x2, y, b, w.rows, nb, w.data.shape[1], x2.stride(0), y.stride(0))
        kw = dict(BR=cfg.br, U=cfg.u, SPLIT=cfg.split, HAS_BIAS=bias is not None, num_warps=cfg.warps)
        if by_words and w.ggml_type == "Q2_K":
            gemv_q2k_words_kernel[grid](w.data.view(torch.int32), *args[1:6], stride_xm=x2.stride(0),
                                        stride_ym=y.stride(0), XB=_x_broadcast(cfg), **_q2k_rows(w), **kw)
        elif by_words:          # Q3_K, Q6_K: 110 / 210-byte super-blocks, read as 16-bit halves
            kernel = gemv_q3k_words_kernel if w.ggml_type == "Q3_K" else gemv_q6k_words_kernel
            kernel[grid](w.data.view(torch.int16), *args[1:6], w.data.shape[1] // 2, *args[7:], **kw)
        elif by_bytes and w.ggml_type.startswith("IQ"):
            tabs = _group_tables(w.ggml_type, w.data.device)
            gemv_iq2_kernel[grid](*args[:4], *tabs, *args[4:], TYPE=tid, BS=bs, **kw)
        elif by_bytes:
            gemv_bytes_kernel[grid](*args, TYPE=tid, **kw)
        else:
            gemv_kernel[grid](*args[:4], *_tables(w), *args[4:], TYPE=tid, BS=bs, **kw)
    return y.to(out_dtype)


def _int8_away(v: torch.Tensor) -> torch.Tensor:
    """v (already divided by its scale) to int8, rounding half away from zero as llama.cpp's roundf does."""
    return (v.sign() * (v.abs() + 0.5).floor()).clamp(-127, 127).to(torch.int8)


def q8_buffers(m: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty (q int8 [m, cols], d float32 [m, cols / 32], sums float32 [m, cols / 16]) for `quantize_q8`'s result
    (q not yet viewed as int32 words)."""
    return (torch.empty(m, cols, dtype=torch.int8, device=device),
            torch.empty(m, cols // 32, dtype=torch.float32, device=device),
            torch.empty(m, cols // 16, dtype=torch.float32, device=device))


def quantize_q8(x2: torch.Tensor, lanes: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations [M, cols] as llama.cpp's CUDA GEMV takes them (q8_1's rounding): int8 per 32 values with scale
    d = max|x| / 127, q = round half away from zero of x / d (0 where the block is 0); returned as (q viewed as int32
    words [M, cols / 4], d [M, cols / 32], float sums of x per 16 [M, cols / 16] for the Q2_K min term). `lanes`:
    the sums of each 256 values in the word-lane kernel's order (sum 8h + 2j + q at 8h + 4q + j: a lane's four in
    one 16-byte load). One Triton kernel where Triton runs (`quantize_q8_kernel`; torch's dozen small ops took
    90-230 µs on an H100), else torch."""
    if runs_triton(x2) and x2.shape[0]:
        from twinquant.formats.ggml.triton_kquants import quantize_q8_kernel

        x2 = x2.contiguous()
        m, cols = x2.shape
        q, d, sums = q8_buffers(m, cols, x2.device)
        bb = 16
        quantize_q8_kernel[(-(-(cols // 32) // bb), m)](x2, q, d, sums, cols // 32, x2.stride(0), q.stride(0),
                                                        d.stride(0), sums.stride(0), BB=bb, LANES=lanes, num_warps=4)
        return q.view(torch.int32), d, sums
    xb = x2.float().reshape(x2.shape[0], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = _int8_away(torch.where(d > 0, xb / d, torch.zeros_like(xb)))
    sums = x2.float().reshape(x2.shape[0], -1, 16).sum(-1)
    if lanes:           # [M, super-block, h, j, q] -> q before j
        sums = sums.reshape(x2.shape[0], -1, 2, 4, 2).transpose(-1, -2)
    return (q.reshape(x2.shape[0], -1).contiguous().view(torch.int32), d.squeeze(-1).contiguous(),
            sums.reshape(x2.shape[0], -1).contiguous())


# A decode GEMV through `gemv_q8` used to quantize x in a launch of its own (~1.8 µs in a replayed CUDA graph on an
# H100, 4 a block); the kernel that makes x (RMSNorm, SwiGLU, the decode attention: `forward.q8_input`) now stores
# x's int8 form as well and hands it over on the tensor itself: `with_q8` attaches it to that very tensor object,
# `q8_of` reads it (a reshaped or transformed x is another object and is quantized again).
_Q8_ATTR = "_twinquant_q8"


def with_q8(x: torch.Tensor, q8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """x carrying its `quantize_q8(x.reshape(-1, cols), lanes=True)` result (q as int32 words): made by the same
    kernel that wrote x, so never out of date while x is not written in place. None: x as it is."""
    if q8 is not None:
        setattr(x, _Q8_ATTR, q8)
    return x


def q8_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """x's int8 form in the word-lane order if the kernel that made x attached it (`with_q8`), else None."""
    return getattr(x, _Q8_ATTR, None)


def gemv_q8(x2: torch.Tensor, w: PackedWeight, br: int = 64, split: int | None = None,
            num_warps: int = 2, words: bool = False, config: GemvConfig | None = None,
            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
            prefetch: bool = False, xq8: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            ) -> torch.Tensor:
    """[M, rows] ≈ x2 @ Wᵀ (+ bias) in out_dtype for a Q2_K weight with x2 quantized to int8 per 32 values
    (`quantize_q8`): llama.cpp's arithmetic (its CUDA GEMV quantizes activations to q8_1 the same way), dp4a
    products on CUDA. Not the runtime's exact path: x's int8 rounding costs ~0.4% relative error per dot product
    (`TWINQUANT_Q8=Q2_K` makes it the runtime's, `q8_default`). `words`: the kernel whose lanes own whole
    sub-blocks (`gemv_q2k_q8_words_kernel`; launch `config`, else the word-lane rule; it alone takes a bias and
    out_dtype, the other kernel returns float32 and refuses a bias; `prefetch`: its next step's weight loads issued
    before this step's products, an experiment of `benchmarks/gemv_limits.py`). `xq8`: x2 already quantized in the
    word-lane order (`q8_of`), for the word-lane kernel."""
    from twinquant.formats.ggml.triton_kquants import gemv_q2k_q8_kernel, gemv_q2k_q8_words_kernel

    if w.ggml_type != "Q2_K":
        raise TwinquantError(f"gemv_q8: only Q2_K has an int8 kernel (got {w.ggml_type})")
    if bias is not None and not words:
        raise TwinquantError("gemv_q8: only the word-lane kernel adds a bias (words=True)")
    in_planes = w.layout == "planes"
    if in_planes and not words:
        raise TwinquantError("gemv_q8: a weight in planes has only the word-lane kernel (words=True)")
    if xq8 is not None and not words:
        raise TwinquantError("gemv_q8: x quantized in the word-lane order goes to the word-lane kernel (words=True)")
    xq, xd, xs = xq8 if xq8 is not None else quantize_q8(x2, lanes=words)
    nb = w.cols // QK_K
    asm = w.data.is_cuda and not interpreted()
    if words:
        c = config or gemv_config("Q2_K:q8planes" if in_planes else "Q2_K:q8words", w.rows, nb)
        # a split adds partial sums atomically: into zeroed float32; otherwise each output is stored once
        y = (torch.zeros(x2.shape[0], w.rows, dtype=torch.float32, device=x2.device) if c.split > 1 else
             torch.empty(x2.shape[0], w.rows, dtype=out_dtype, device=x2.device))
        if x2.shape[0]:
            gemv_q2k_q8_words_kernel[(-(-w.rows // c.br), x2.shape[0], c.split)](
                w.data.view(torch.int32), xq, xd, xs, y, bias if bias is not None else y, w.rows, nb,
                stride_ym=y.stride(0), BR=c.br, U=c.u, SPLIT=c.split, ASM=asm, HAS_BIAS=bias is not None,
                PREFETCH=prefetch, XB=_x_broadcast(c), num_warps=c.warps, **_q2k_rows(w))
        return y.to(out_dtype)
    y = torch.zeros(x2.shape[0], w.rows, dtype=torch.float32, device=x2.device)
    if not x2.shape[0]:
        return y
    if split is None:
        br, split = _gemv_config(w.rows, nb, br, max_split=8)
    gemv_q2k_q8_kernel[(-(-w.rows // br), x2.shape[0], split)](
        w.data.view(torch.int32), xq, xd, xs, y, w.rows, nb, w.data.shape[1] // 4, xq.stride(0), xd.stride(0),
        xs.stride(0), y.stride(0), BR=br, SPLIT=split, ASM=asm, num_warps=num_warps)
    return y


def quantize_tokens_i8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 activations: (q int8 [M, cols], scale float32 [M]) with scale = max|x| / 127 and
    q = round half away from zero of x / scale (0 for an all-zero row): what `gemm_i8` multiplies."""
    x = x2.float()
    s = x.abs().amax(-1) / 127
    q = _int8_away(torch.where(s[:, None] > 0, x / s.clamp_min(torch.finfo(torch.float32).tiny)[:, None],
                               torch.zeros_like(x)))
    return q.contiguous(), s.contiguous()


def gemm_i8(x2: torch.Tensor, w: PackedWeight, bm: int = 64, bn: int = 64, num_warps: int = 4) -> torch.Tensor:
    """float32 [M, rows] ≈ x2 @ Wᵀ for a Q2_K weight, the INT2×INT8 path: x2 quantized per token to int8
    (`quantize_tokens_i8`), each super-block two int8 tensor-core products with int32 sums (`gemm_q2k_i8_kernel`).
    For prefill-sized batches of files with per-token activation quantization; not the runtime's exact path (x's
    int8 rounding: about 1% relative error on Gaussian rows)."""
    from twinquant.formats.ggml.triton_kquants import gemm_q2k_i8_kernel

    if w.ggml_type != "Q2_K":
        raise TwinquantError(f"gemm_i8: only Q2_K has an int8 tensor-core kernel (got {w.ggml_type})")
    if x2.shape[-1] != w.cols:
        raise TwinquantError(f"gemm_i8: input width {x2.shape[-1]} does not match the weight's {w.cols}")
    xq, sx = quantize_tokens_i8(x2)
    m = x2.shape[0]
    y = torch.empty(m, w.rows, dtype=torch.float32, device=x2.device)
    if m:
        data = ggml_bytes(w)
        bm = max(16, min(bm, 1 << (m - 1).bit_length()))      # int8 products need 16 rows at least
        gemm_q2k_i8_kernel[(-(-m // bm), -(-w.rows // bn))](
            data, xq, sx, y, m, w.rows, w.cols // QK_K, data.shape[1], xq.stride(0), y.stride(0),
            BM=bm, BN=bn, num_warps=num_warps)
    return y


def qlinear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) with W read from its packed bytes; float32 accumulation, x's dtype out (a type in
    TWINQUANT_Q8 with x rounded to int8 per 32 first, llama.cpp's arithmetic: `gemv_q8`)."""
    if x.shape[-1] != w.cols:
        raise TwinquantError(f"qlinear: input width {x.shape[-1]} does not match the weight's {w.cols}")
    if not runs_triton(w.data):
        raise TwinquantError(f"qlinear: no Triton kernel runs on {w.data.device}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.cols)
    if x2.shape[0] > GEMV_MAX_ROWS:
        y = F.linear(x2, dequantize(w, x.dtype), bias)
    elif w.ggml_type in q8_default():
        y = gemv_q8(x2, w, words=True, bias=bias, out_dtype=x.dtype, xq8=q8_of(x))
    else:
        y = gemv(x2, w, bias, x.dtype)
    return y.reshape(*lead, w.rows)


def random_blocks(ggml_type: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Packed rows of random bytes: every bit pattern of codes and scales, finite fp16 d/dmin of either sign (for
    the kernels' tests and benchmarks; random bytes there could be NaN or inf)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // QK_K, KERNEL_TYPES[ggml_type][1]), dtype=np.uint8)
    for off in F16_FIELDS[ggml_type]:
        data[:, :, off:off + 2] = rng.normal(0, 0.01, (rows, cols // QK_K)).astype(np.float16)[..., None].view(np.uint8)
    if ggml_type == "IQ1_M":         # d's four nibbles are the high nibbles of bytes 49, 51, 53, 55
        d16 = rng.normal(0, 0.01, (rows, cols // QK_K)).astype(np.float16).view(np.uint16)
        for k in range(4):
            data[:, :, 49 + 2 * k] = (data[:, :, 49 + 2 * k] & 0x0F) | (((d16 >> (4 * k)) & 0xF) << 4).astype(np.uint8)
    return data.reshape(rows, -1)
