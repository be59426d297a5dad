"""The shared machinery of the GGML codecs: whole-matrix quantize / pack / unpack / dequantize over the per-type
hooks, per-block parameter lists.

A type implements, on tensors whose leading axis runs over B blocks (block = `self.block` columns of a row):
  _fit(x [B, block], qw [B, block] | None, sigma2 [B] | None) -> header dict (the block's stored fields)
  _effective(hdr) -> (scale, offset) float32 [B, nsub]
  _codes(x [B, block], hdr, scale, offset) -> uint8 [B, block]
on torch tensors of the input's device (the numerics, _num.py), and on numpy arrays (byte layout only, on the CPU)
  _pack(codes [B, block], hdr) -> uint8 [B, type_size];   _unpack(blocks) -> (codes, hdr)
Header values have leading axis B (a str for `rule`); `fallback` ([B, block] or None) holds codes llama.cpp keeps
from its search where a sub-block's effective scale is 0 (they do not change the weights).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.formats.codec import BlockParams, dequantize_codes
from twinquant.formats.ggml._num import F32, div, seqsum, static


@dataclass
class GGMLPacked:
    """Format-specific stored fields of one block of columns for every row (BlockParams.packed of GGML codecs).

    d:        float16 [rows]            the stored super-block / block scale
    dmin:     float16 [rows] or None    the stored min scale (Q2_K, Q4_K, Q5_K)
    scales:   uint8 [rows, k] or None   the stored sub-block scale bytes, verbatim (K-quants)
    iscale:   float32 [rows] or None    legacy types: the float32 multiplier llama.cpp rounded the codes with
    rule:     str or None               legacy types: "ref" (quantize_row_*_ref rounding), "qx" (make_qx_quants
                                        codes, the imatrix path) or None (nearest on the effective grid)
    fallback: uint8 [rows, block] or None  codes kept where a sub-block's effective scale is 0 (bytes only)
    """

    d: torch.Tensor
    dmin: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    iscale: torch.Tensor | None = None
    rule: str | None = None
    fallback: torch.Tensor | None = None


def _np(t) -> np.ndarray | None:
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _torch(a, device=None) -> torch.Tensor | None:
    """A tensor (moved to `device` if given) from a tensor or array; None and strings pass through."""
    if a is None or isinstance(a, str):
        return a
    if not isinstance(a, torch.Tensor):
        a = np.ascontiguousarray(a)
        a = torch.from_numpy(a if a.flags.writeable else a.copy())      # e.g. a read-only memory map
    return a if device is None else a.to(device)


def as_f32(w, what: str = "weight") -> torch.Tensor:
    """w (torch or numpy) as a contiguous float32 tensor on its own device (numpy: the CPU)."""
    t = _torch(w.detach() if isinstance(w, torch.Tensor) else w)
    if t.dim() != 2:
        raise TwinquantError(f"{what} must be 2-D [rows, cols], got shape {tuple(t.shape)}")
    return t.to(F32).contiguous()


class GGMLSizes:
    """Block and byte sizes of a GGML type (`ggml_type`), shared by every codec of a GGML format."""

    name: str
    ggml_type: gguf.GGMLQuantizationType

    def __init__(self) -> None:
        self.block, self.type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block

    def check_cols(self, cols: int) -> None:
        if cols <= 0 or cols % self.block:
            raise TwinquantError(f"{self.name} needs rows whose length is a multiple of its block size "
                                 f"{self.block}; got a row of {cols}")

    def bytes_per_row(self, cols: int) -> int:
        self.check_cols(cols)
        return cols // self.block * self.type_size


class GGMLCodec(GGMLSizes):
    """One GGML block format (see twinquant.formats.codec for the protocol). Codes are torch.uint8 in [0, qmax]."""

    sub: int
    qmax: int
    zero_code: int = 0                  # signed formats: the code of 0 (offset = -zero_code * scale)

    def __init__(self) -> None:
        super().__init__()
        self.nsub = self.block // self.sub

    def __repr__(self) -> str:
        return f"<{type(self).__name__} block={self.block} sub={self.sub} qmax={self.qmax}>"

    # ---- hooks ---------------------------------------------------------------------------------------------------
    def _fit(self, x, qw, sigma2) -> dict: raise NotImplementedError
    def _effective(self, hdr) -> tuple[torch.Tensor, torch.Tensor]: raise NotImplementedError
    def _codes(self, x, hdr, scale, offset) -> torch.Tensor: raise NotImplementedError
    def _pack(self, codes, hdr) -> np.ndarray: raise NotImplementedError
    def _unpack(self, blocks) -> tuple[np.ndarray, dict]: raise NotImplementedError

    def row_sigma2(self, w) -> torch.Tensor:
        """llama.cpp's per-row mean square over the whole row (sequential float32 sum / n_per_row), which weights
        the imatrix search of Q4_0 / Q5_0; pass it to `fit(..., sigma2=)` to fit one block like quantize does."""
        x = as_f32(w)
        return div(seqsum(x * x), float(x.shape[1]))

    # ---- protocol --------------------------------------------------------------------------------------------------
    def fit(self, w, importance=None, *, sigma2=None) -> BlockParams:
        """llama.cpp's parameters for a block slice w [rows, block]; importance [block] (imatrix) or None.
        sigma2 [rows]: only for Q4_0/Q5_0 with importance (their search weights use the whole row's mean square,
        see `row_sigma2`); by default the block's own mean square is used."""
        x = as_f32(w)
        if x.shape[1] != self.block:
            raise TwinquantError(f"{self.name}.fit takes a block of {self.block} columns, got {x.shape[1]}")
        qw = self._importance(importance, self.block, x)
        s2 = None if sigma2 is None else _torch(sigma2, x.device).to(F32).reshape(-1)
        hdr = self._fit(x, qw, s2)
        scale, offset = self._effective(hdr)
        return self._params(hdr, scale, offset, keep_fallback=True)

    def codes(self, w, p: BlockParams) -> torch.Tensor:
        """Codes of w [rows, block] on p, by llama.cpp's rounding for those parameters: torch.uint8 [rows, block]."""
        x = as_f32(w)
        hdr = self._hdr(p.packed, x.device) if p.packed is not None else {"rule": None, "fallback": None}
        return self._codes(x, hdr, p.scale.to(x.device, F32), p.offset.to(x.device, F32))

    def quantize(self, w, importance=None) -> tuple[torch.Tensor, list[BlockParams]]:
        """RTN of w [rows, cols] exactly as llama.cpp (ggml_quantize_chunk with imatrix = importance [cols]):
        (codes torch.uint8 [rows, cols], one BlockParams per block of columns)."""
        x = as_f32(w)
        R, C = x.shape
        self.check_cols(C)
        nb = C // self.block
        qw = self._importance(importance, C, x)
        sigma2 = None
        if qw is not None and self._needs_row_sigma2:
            sigma2 = div(seqsum(x * x), float(C)).repeat_interleave(nb)
        X = x.reshape(R * nb, self.block)
        QW = None if qw is None else qw.reshape(R * nb, self.block)
        hdr = self._fit(X, QW, sigma2)
        scale, offset = self._effective(hdr)
        codes = self._codes(X, hdr, scale, offset)
        params = []
        for j in range(nb):
            sl = {k: (v if isinstance(v, str) or v is None else v.reshape(R, nb, *v.shape[1:])[:, j])
                  for k, v in hdr.items()}
            params.append(self._params(sl, scale.reshape(R, nb, -1)[:, j], offset.reshape(R, nb, -1)[:, j],
                                       keep_fallback=True))
        return codes.reshape(R, C), params

    def pack(self, codes, params: list[BlockParams]) -> np.ndarray:
        """GGML bytes uint8 [rows, bytes_per_row] of any codes on any parameters that carry `packed` fields."""
        q = _np(codes)
        if q.ndim != 2:
            raise TwinquantError(f"{self.name}.pack: codes must be 2-D [rows, cols], got {tuple(q.shape)}")
        R, C = q.shape
        self.check_cols(C)
        nb = C // self.block
        if len(params) != nb:
            raise TwinquantError(f"{self.name}.pack: {nb} blocks of columns but {len(params)} parameter sets")
        if np.issubdtype(q.dtype, np.floating):
            if not np.array_equal(q, np.round(q)):
                raise TwinquantError(f"{self.name}.pack: codes must be integers")
        if q.size and (q.min() < 0 or q.max() > self.qmax):
            raise TwinquantError(f"{self.name}.pack: codes must lie in [0, {self.qmax}]")
        q = q.astype(np.uint8).reshape(R * nb, self.block)
        hdrs = [self._hdr(p.packed) for p in params]
        hdr = {}
        for k, v in hdrs[0].items():
            if k == "fallback" or v is None or isinstance(v, str):
                hdr[k] = v
            else:
                hdr[k] = np.stack([h[k] for h in hdrs], axis=1).reshape(R * nb, *v.shape[1:])
        return self._pack(q, hdr).reshape(R, nb * self.type_size)

    def unpack(self, data, cols: int) -> tuple[torch.Tensor, list[BlockParams]]:
        """Inverse of pack: bytes (any shape holding whole rows) -> (codes uint8 [rows, cols], params)."""
        bpr = self.bytes_per_row(cols)
        b = np.ascontiguousarray(_np(data)).view(np.uint8).reshape(-1)
        if b.size % bpr:
            raise TwinquantError(f"{self.name}: {b.size} bytes do not hold whole rows of {cols} values "
                                 f"({bpr} bytes per row)")
        R, nb = b.size // bpr, cols // self.block
        codes, hdr = self._unpack(b.reshape(R * nb, self.type_size))
        codes, hdr = torch.from_numpy(codes), {k: _torch(v) for k, v in hdr.items()}
        scale, offset = self._effective(hdr)
        params = []
        for j in range(nb):
            sl = {k: (v if isinstance(v, str) or v is None else v.reshape(R, nb, *v.shape[1:])[:, j])
                  for k, v in hdr.items()}
            params.append(self._params(sl, scale.reshape(R, nb, -1)[:, j], offset.reshape(R, nb, -1)[:, j],
                                       keep_fallback=False))
        return codes.reshape(R, cols), params

    def dequantize(self, codes, params: list[BlockParams]) -> torch.Tensor:
        """float32 [rows, cols]: dequantize_codes block by block (what llama.cpp computes from the bytes)."""
        q = codes if isinstance(codes, torch.Tensor) else torch.from_numpy(np.asarray(codes))
        return torch.cat([dequantize_codes(q[:, j * self.block:(j + 1) * self.block], p, self.sub)
                          for j, p in enumerate(params)], dim=1)

    def dequantize_bytes(self, data, cols: int) -> torch.Tensor:
        return self.dequantize(*self.unpack(data, cols))

    # ---- helpers -----------------------------------------------------------------------------------------------------
    _needs_row_sigma2 = False

    def _importance(self, importance, n: int, x: torch.Tensor) -> torch.Tensor | None:
        """importance [n] (or one row of it per row of x: [rows, n]) as [rows, n] float32 on x's device, or None."""
        if importance is None:
            return None
        a = _torch(importance, x.device).to(F32)
        if a.dim() == 2 and tuple(a.shape) == (x.shape[0], n):     # per row: several experts fitted together
            return a.contiguous()
        a = a.reshape(-1)
        if a.numel() != n:
            raise TwinquantError(f"{self.name}: importance has {a.numel()} values, expected {n} (one per column)")
        return a[None].expand(x.shape[0], n).contiguous()

    def _params(self, hdr: dict, scale: torch.Tensor, offset: torch.Tensor, keep_fallback: bool) -> BlockParams:
        fb = hdr.get("fallback")
        if fb is not None and (not keep_fallback or not (static() or bool((scale == 0).any()))):
            fb = None
        c = {k: (None if v is None else v.contiguous()) for k, v in hdr.items() if not isinstance(v, str)}
        packed = GGMLPacked(d=c["d"], dmin=c.get("dmin"), scales=c.get("scales"), iscale=c.get("iscale"),
                            rule=hdr.get("rule"), fallback=None if fb is None else fb.to(torch.uint8).contiguous())
        return BlockParams(scale=scale.contiguous(), offset=offset.contiguous(), packed=packed)

    def _hdr(self, packed, device=None) -> dict:
        """The stored fields of `packed` as tensors on `device`, or as numpy arrays (for packing) by default."""
        if not isinstance(packed, GGMLPacked):
            raise TwinquantError(f"{self.name}: parameters lack the GGML fields (BlockParams.packed); "
                                 f"make them with fit, quantize or unpack")
        hdr = {f.name: getattr(packed, f.name) for f in fields(packed)}
        conv = _np if device is None else (lambda v: _torch(v, device))
        return {k: (v if isinstance(v, str) or v is None else conv(v)) for k, v in hdr.items()}
