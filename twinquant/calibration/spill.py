"""Staged activations that may not fit in memory: a list of same-shaped tensors, in memory or in a temporary file.

`staged_block` holds the inputs of a block's down projection for every calibration window while the projection is
quantized (they are needed again for the block's outputs). At Qwen2.5-32B's shapes that is 55296 tokens x 27648
float32 = 6.1 GB, next to the 27648-wide Hessian (3.1 GB) and its factor (3.1 GB): on a 24 GiB CPU the block was
killed for memory. On the CPU, past `SPILL_ABOVE` bytes, the windows go to an unnamed temporary file (deleted when
closed, and by the OS if the process dies) and are read back one at a time: float32 bytes round-trip exactly, so
the results are the same, for a write and a read of the file (~15 s a block on this project's CPU, against ~10 min
of GPTQ there). Accelerators and smaller models keep them in memory.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

SPILL_ABOVE = 2 << 30       # bytes of staged float32 inputs held in memory on the CPU at most


class _Spillable:
    """What the staged stores share: values held in memory (`_held`) or in a temporary file (`_file`)."""

    _held = None
    _file = None

    def close(self) -> None:
        """Drop everything staged (the file goes with it)."""
        self._held = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


class StagedInputs(_Spillable):
    """`n` tensors of one shape and dtype, appended in order (`append`), read back by index (`[i]`).

    Held in memory unless they are on the CPU and `n` of them exceed `spill_above` bytes; then each goes to a
    temporary file in `directory` (the run's work directory where there is one) as it is appended."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, device, directory=None,
                 spill_above: int | None = None):
        self.shape, self.dtype = tuple(shape), dtype
        self.numel = int(np.prod(self.shape))
        self.nbytes = self.numel * torch.empty((), dtype=dtype).element_size()      # of one tensor
        limit = SPILL_ABOVE if spill_above is None else spill_above
        self.on_disk = torch.device(device).type == "cpu" and n * self.nbytes > limit
        self._held: list[torch.Tensor] = []
        self._file = tempfile.TemporaryFile(dir=directory, prefix="staged-") if self.on_disk else None
        self._count = 0

    def append(self, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise ValueError(f"staged inputs: {tuple(t.shape)} {t.dtype}, expected {self.shape} {self.dtype}")
        if self._file is None:
            self._held.append(t)
        else:
            self._file.seek(self._count * self.nbytes)       # raw bytes: any dtype (bfloat16 has no numpy one)
            t.detach().contiguous().view(-1).view(torch.uint8).numpy().tofile(self._file)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._count:
            raise IndexError(i)
        if self._file is None:
            return self._held[i]
        self._file.flush()
        self._file.seek(i * self.nbytes)
        a = np.fromfile(self._file, dtype=np.uint8, count=self.nbytes)
        if a.size != self.nbytes:
            raise OSError(f"staged inputs: window {i} read back short ({a.size} of {self.nbytes} bytes)")
        return torch.from_numpy(a).view(self.dtype).view(self.shape)


class StagedRows(_Spillable):
    """Row blocks of one width and dtype (a MoE block's expert activations: each expert's own number of tokens),
    written once at row offsets (`put`) and read back (`get`); `rows` in all, known up front. In memory unless on
    the CPU past `spill_above` bytes; then in an unnamed temporary file in `directory`, the same values back."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, device, directory=None,
                 spill_above: int | None = None):
        self.width, self.dtype, self.device = width, dtype, torch.device(device)
        self.row_bytes = width * torch.empty((), dtype=dtype).element_size()
        limit = SPILL_ABOVE if spill_above is None else spill_above
        self.on_disk = self.device.type == "cpu" and rows * self.row_bytes > limit
        self._held = None if self.on_disk else torch.empty(rows, width, dtype=dtype, device=self.device)
        self._file = tempfile.TemporaryFile(dir=directory, prefix="staged-") if self.on_disk else None

    def put(self, row: int, t: torch.Tensor) -> None:
        if t.dtype != self.dtype or t.shape[-1] != self.width:
            raise ValueError(f"staged rows: {tuple(t.shape)} {t.dtype}, expected width {self.width} {self.dtype}")
        if self._file is None:
            self._held[row: row + t.shape[0]] = t
            return
        self._file.seek(row * self.row_bytes)
        t.detach().contiguous().view(-1).view(torch.uint8).numpy().tofile(self._file)

    def get(self, row: int, count: int) -> torch.Tensor:
        if count == 0:      # an expert no token reached
            return torch.empty(0, self.width, dtype=self.dtype, device=self.device)
        if self._file is None:
            return self._held[row: row + count]
        self._file.flush()
        self._file.seek(row * self.row_bytes)
        a = np.fromfile(self._file, dtype=np.uint8, count=count * self.row_bytes)
        if a.size != count * self.row_bytes:
            raise OSError(f"staged rows: rows {row}..{row + count} read back short")
        return torch.from_numpy(a).view(self.dtype).view(count, self.width)


def spill_directory(workdir) -> str | None:
    """Where staged inputs spill: the work directory of a resumable run (on the output's disk), else the system's
    temporary directory (None)."""
    path = getattr(workdir, "path", None)
    return os.fspath(path) if path is not None else None
