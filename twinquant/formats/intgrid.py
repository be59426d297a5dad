"""Integer-grid codecs: `bits`-bit codes per group of columns with an fp16 scale and an integer zero point.

This is the format of GPTQ checkpoints (Frantar et al. 2022, arXiv 2210.17323): within a row, each group of
`group_size` columns is `scale * (q - zero)` with `q in [0, 2**bits - 1]`. In the `Codec` vocabulary a group is
both the block and the sub-block (its parameters are chosen alone), and `offset = -zero * scale`.

* symmetric: `scale = max|w| / (2**(bits-1) - 1)` and the zero is fixed at `2**(bits-1)`, so the codes are the
  signed integers `[-2**(bits-1), 2**(bits-1) - 1]` shifted into `[0, qmax]` (the most negative one is spare,
  used only after clipping);
* asymmetric: the range `[min(w, 0), max(w, 0)]` (zero kept exactly representable, as GPTQ does) is split into
  `qmax` steps and the zero point is the rounded code of 0.

Scales are rounded *up* to fp16 (what a checkpoint stores), so the grid still covers the range and every weight
inside the (possibly clipped) range is within `scale / 2` of its dequantized value. Zeros are integers in
`[0, qmax]`: exact in fp16 and in one byte. `group_size=-1` is one group per row (per-channel); such a codec has
`block == sub == -1` until it is bound to a row length with `for_cols(cols)` (`quantize`, `pack` and `unpack`
bind by themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams

BITS = (2, 3, 4, 8)


def nearest_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmax: int) -> torch.Tensor:
    """Nearest grid codes (round half to even, clamped to [0, qmax]) of w on `scale * q + offset`, as float.

    w [rows, n * sub] with scale/offset [rows, n] (each repeated over `sub` columns), or w/scale/offset of one
    shape. A zero scale (an all-zero GGML block) has every code at 0. GPTQ rounds its columns with this same
    expression, so its codes equal RTN's bit for bit when nothing is propagated.
    """
    shape = w.shape
    if scale.shape != shape:
        rows, n = scale.shape
        w, scale, offset = w.reshape(rows, n, shape[-1] // n), scale[..., None], offset[..., None]
    zero = scale == 0
    q = (w - offset).div_(torch.where(zero, torch.ones_like(scale), scale)).round_().clamp_(0, qmax)
    if zero.any():
        q.masked_fill_(zero, 0.0)
    return q.reshape(shape)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (x >= 0), never 0: the stored scale must cover the range it was fitted to."""
    h = x.half()
    low = h.float() < x
    h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return torch.where(h == 0, torch.full_like(h, 2.0 ** -24), h)


@dataclass(frozen=True)
class IntGrid:
    """`IntGrid(4, 128, symmetric=False)` is GPTQ's int4 g128 asymmetric format; see the module docstring."""

    bits: int
    group_size: int = 128
    symmetric: bool = False
    row: int = 0                     # the row length a per-channel codec is bound to (0: not bound)

    ggml_type = None

    def __post_init__(self):
        if self.bits not in BITS:
            raise TwinquantError(f"integer grid: bits must be one of {BITS}, not {self.bits}")
        if self.group_size != -1 and not (isinstance(self.group_size, int) and 16 <= self.group_size <= 128):
            raise TwinquantError(f"integer grid: group size must be in 16..128 or -1 (per channel), not {self.group_size}")

    # -- the Codec protocol's attributes ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        g = f"g{self.group_size}" if self.group_size > 0 else "pc"
        return f"int{self.bits}_{g}_{'sym' if self.symmetric else 'asym'}"

    @property
    def block(self) -> int:
        return self.group_size if self.group_size > 0 else (self.row or -1)

    @property
    def sub(self) -> int:
        return self.block

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @classmethod
    def from_name(cls, name: str) -> "IntGrid":
        """Inverse of `name`: 'int4_g128_asym', 'int8_pc_sym' …"""
        try:
            b, g, s = name.split("_")
            assert b.startswith("int") and s in ("sym", "asym")
            group = -1 if g == "pc" else int(g.removeprefix("g"))
            return cls(int(b[3:]), group, s == "sym")
        except (ValueError, AssertionError):
            raise TwinquantError(f"{name!r} is not an integer grid name (like int4_g128_asym)") from None

    def for_cols(self, cols: int) -> "IntGrid":
        """This codec for rows of `cols` columns (per-channel: one group of `cols`); checks the divisibility."""
        if self.group_size > 0:
            if cols % self.group_size:
                raise TwinquantError(f"{self.name}: {cols} columns are not a multiple of the group size")
            return self
        return replace(self, row=cols)

    # -- parameters and codes -----------------------------------------------------------------------------------
    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None, clip=None) -> BlockParams:
        """Min/max (or max-abs) parameters of each group of w [rows, n * group].

        `clip` (the clip hook RTN's search uses) shrinks the range: a float or a tensor broadcastable to
        [rows, n]. `importance` is ignored here: min/max does not weigh columns (the clip search does).
        """
        w = w.float()
        rows, width = w.shape
        g = self.sub if self.sub > 0 else width
        if width % g:
            raise TwinquantError(f"{self.name}: a block of {width} columns is not whole groups of {g}")
        wg = w.reshape(rows, width // g, g)
        c = 1.0 if clip is None else torch.as_tensor(clip, dtype=torch.float32)
        if self.symmetric:
            half = 1 << (self.bits - 1)
            scale = _fp16_up(wg.abs().amax(-1) * c / (half - 1))
            zero = torch.full(scale.shape, float(half))
        else:
            lo = wg.amin(-1).clamp(max=0) * c
            hi = wg.amax(-1).clamp(min=0) * c
            scale = _fp16_up((hi - lo) / self.qmax)
            zero = torch.round(-lo / scale.float()).clamp_(0, self.qmax)
        s = scale.float()
        return BlockParams(s, -zero * s, (scale, zero.to(torch.uint8)))

    def codes(self, w: torch.Tensor, p: BlockParams) -> torch.Tensor:
        return nearest_codes(w.float(), p.scale, p.offset, self.qmax).to(torch.uint8)

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
        """RTN with min/max parameters: (uint8 codes [rows, cols], one BlockParams per group)."""
        c = self.for_cols(w.shape[1])
        p = c.fit(w)                                    # every group is independent: fit them all at once
        return c.codes(w, p), _split(p, w.shape[1] // c.block)

    # -- bytes ----------------------------------------------------------------------------------------------------
    def row_bytes(self, cols: int) -> int:
        n = cols // self.for_cols(cols).block
        return (cols * self.bits + 7) // 8 + 2 * n + (0 if self.symmetric else n)

    def pack(self, codes: torch.Tensor, params: list[BlockParams]) -> np.ndarray:
        """uint8 [rows, row_bytes]: per row the codes as an LSB-first bit stream (padded to a byte), then the fp16
        scales (little-endian), then the zero points (one byte each; asymmetric only)."""
        rows, cols = codes.shape
        c = self.for_cols(cols)
        if len(params) != cols // c.block:
            raise TwinquantError(f"{self.name}: {len(params)} parameter blocks for {cols} columns")
        scale16, zero = _join(c, params)
        q = codes.to(torch.int64).numpy()
        if q.size and (q.min() < 0 or q.max() > self.qmax):
            raise TwinquantError(f"{self.name}: codes outside [0, {self.qmax}]")
        bits = ((q[:, :, None] >> np.arange(self.bits)) & 1).astype(np.uint8).reshape(rows, cols * self.bits)
        parts = [np.packbits(bits, axis=1, bitorder="little"),
                 scale16.numpy().astype("<f2").view(np.uint8).reshape(rows, -1)]
        if not self.symmetric:
            parts.append(zero.numpy().astype(np.uint8))
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    def unpack(self, data: np.ndarray, cols: int) -> tuple[torch.Tensor, list[BlockParams]]:
        c = self.for_cols(cols)
        data = np.asarray(data, dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != self.row_bytes(cols):
            raise TwinquantError(f"{self.name}: expected [rows, {self.row_bytes(cols)}] bytes, got {data.shape}")
        rows, n = data.shape[0], cols // c.block
        nq = (cols * self.bits + 7) // 8
        bits = np.unpackbits(data[:, :nq], axis=1, bitorder="little")[:, : cols * self.bits]
        q = (bits.reshape(rows, cols, self.bits).astype(np.int64) << np.arange(self.bits)).sum(-1)
        scale16 = torch.from_numpy(data[:, nq:nq + 2 * n].copy().view("<f2").astype(np.float16))
        if self.symmetric:
            zero = torch.full((rows, n), 1 << (self.bits - 1), dtype=torch.uint8)
        else:
            zero = torch.from_numpy(data[:, nq + 2 * n:].copy())
        s = scale16.float()
        p = BlockParams(s, -zero.float() * s, (scale16, zero))
        return torch.from_numpy(q.astype(np.uint8)), _split(p, n)


def _split(p: BlockParams, n: int) -> list[BlockParams]:
    """One BlockParams of n groups -> n BlockParams of one group each (integer grids: block == sub)."""
    s16, z = p.packed
    return [BlockParams(p.scale[:, j:j + 1], p.offset[:, j:j + 1], (s16[:, j:j + 1], z[:, j:j + 1])) for j in range(n)]


def _join(c: IntGrid, params: list[BlockParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales and uint8 zeros [rows, n groups] of a parameter list (derived from scale/offset if unpacked)."""
    s16, zs = [], []
    for p in params:
        if p.packed is not None:
            s, z = p.packed
        else:
            s = p.scale.half()
            z = torch.round(-p.offset / p.scale)
            if not torch.equal(s.float(), p.scale) or not torch.equal(-z * p.scale, p.offset) \
                    or (z < 0).any() or (z > c.qmax).any():
                raise TwinquantError(f"{c.name}: parameters not representable (fp16 scale, integer zero)")
        s16.append(s.half())
        zs.append(z.to(torch.uint8))
    return torch.cat(s16, 1), torch.cat(zs, 1)
