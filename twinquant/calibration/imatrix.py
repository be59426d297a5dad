"""Importance matrices as llama.cpp computes, stores and uses them (`llama-imatrix`, `llama-quantize --imatrix`).

What llama-imatrix accumulates (tools/imatrix/imatrix.cpp, `IMatrixCollector::collect_imatrix`): for every
matrix multiplication whose weight is named `blk.*` (and `output.weight` only with `--process-output`; a tied
head runs on `token_embd.weight` and is never collected), when the batch has at least 16 token rows, the sum over
tokens of x² per input column of the activation x entering that weight, in float32, and one count per matrix: the
number of token rows seen. Linears that share an input (q/k/v, gate/up) get identical sums. The chunk count is
`max(count) // chunk_size`, with chunk_size the `-c` window. `collect_imatrix` runs whole windows and counts every
token; llama-imatrix batches 2048 // ctx windows together and would skip only a trailing micro-batch of under 16
tokens, which no ctx >= 16 that divides 2048 (or is a multiple of 512) produces. Values: llama-imatrix's defaults
(F16 KV cache, flash attention) put its sums ~1e-3 (relative) from an fp32 forward's; with `-fa off -ctk f32
-ctv f32` they agree within float32 summation error (~1e-5).

What llama-quantize passes to the quantizer (tools/quantize/quantize.cpp, `load_imatrix`): per matrix
`in_sum2 / count` in float32 (1.0 where the count is 0); for the legacy `.dat` format the stored values are
`(sum / count) * ncall` and it divides by `ncall`.

File formats (both written exactly as llama-imatrix writes them, byte for byte):
- GGUF (`imatrix.gguf`): keys `general.type = "imatrix"`, `imatrix.datasets` (string array),
  `imatrix.chunk_count` (u32), `imatrix.chunk_size` (u32), no `general.architecture`; per entry, in name order,
  an F32 tensor `<name>.in_sum2` (ggml ne [in, n_mat]: 1-D for a dense weight) and an F32 tensor `<name>.counts`
  (ne [1, n_mat]) holding the raw sums and token counts. twinquant adds `twinquant.basis` (a JSON string) when it
  computed the statistics of a rotated or padded model (`twinquant imatrix --rotation rh`), which `quantize
  --imatrix` checks against its own preparation; llama-quantize ignores the key.
- legacy `.dat`: int32 n_entries; per entry (name order): int32 len, name bytes, int32 ncall
  (= ceil(max count / chunk_size)), int32 nval, float32[nval] = (sum / count) * ncall; then int32 chunk count,
  int32 len and the dataset name.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from twinquant.errors import TwinquantError, show

SUM_SUFFIX = ".in_sum2"
BASIS_KEY = "twinquant.basis"     # (a JSON string) where twinquant computed the imatrix of a prepared model
COUNT_SUFFIX = ".counts"


@dataclass
class Imatrix:
    """Raw per-column sums of squared activations and token counts, per weight (llama.cpp tensor names).

    sums[name]: float32 [in] for a 2-D weight ([n_mat, in] for stacked experts); counts[name]: int64 [n_mat]
    (one count for a dense weight), as the GGUF format stores them."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    # the basis the activations were in (`pipeline.prepare.Preparation.basis`: rotation, seed, padding) when
    # twinquant computed them for a prepared model; None: the model as stored (llama-imatrix's files)
    basis: dict | None = None

    # --- queries -------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    @property
    def names(self) -> list[str]:
        return sorted(self.sums)

    def importance(self, name: str) -> np.ndarray:
        """What llama-quantize hands the quantizer for `name`: sum / count per column, in float32 (1.0 for a matrix
        with no data). Shape as `sums[name]`. KeyError when the imatrix has no entry for `name`."""
        s = self.sums[name]
        c = self.counts[name]
        s2 = s.reshape(len(c), -1)
        out = np.ones_like(s2, dtype=np.float32)
        for j, n in enumerate(c):
            if n > 0:
                out[j] = s2[j].astype(np.float32) / np.float32(n)
        return out.reshape(s.shape)

    def max_count(self) -> int:
        return max((int(c.max()) for c in self.counts.values() if c.size), default=0)

    # --- combine -------------------------------------------------------------------------------------------
    def merge(self, other: Imatrix) -> Imatrix:
        """A new imatrix with both sets of sums and counts added (llama-imatrix `--in-file` semantics): sums must
        have the same size; a single count broadcasts over the other's per-matrix counts. chunk_size is this
        one's (the other's if this one has none); chunk_count = max count // chunk_size."""
        sums = {k: v.copy() for k, v in self.sums.items()}
        counts = {k: v.copy() for k, v in self.counts.items()}
        for name in other.sums:
            s, c = other.sums[name].astype(np.float32), other.counts[name].astype(np.int64)
            if name not in sums:
                sums[name], counts[name] = s.copy(), c.copy()
                continue
            if sums[name].size != s.size:
                raise TwinquantError(f"imatrix merge: {name} has {sums[name].size} values in one file and "
                                     f"{s.size} in the other")
            mine = counts[name]
            if mine.size == 1 and c.size > 1:
                mine = np.full(c.size, mine[0], dtype=np.int64)
            elif mine.size > 1 and c.size == 1:
                c = np.full(mine.size, c[0], dtype=np.int64)
            elif mine.size != c.size:
                raise TwinquantError(f"imatrix merge: {name} has {mine.size} counts in one file and {c.size} "
                                     f"in the other")
            shape = sums[name].shape if sums[name].ndim >= s.ndim else s.shape
            if len(mine) > 1:
                shape = (len(mine), s.size // len(mine))
            sums[name] = (sums[name].reshape(-1) + s.reshape(-1)).astype(np.float32).reshape(shape)
            counts[name] = mine + c
        if self.basis != other.basis:
            raise TwinquantError(f"imatrix merge: the files were computed in different bases ({self.basis} and "
                                 f"{other.basis}: rotation / padding)")
        chunk_size = self.chunk_size or other.chunk_size
        out = Imatrix(sums, counts, list(self.datasets) + list(other.datasets), 0, chunk_size, self.basis)
        out.chunk_count = out.max_count() // chunk_size if chunk_size > 0 else self.chunk_count + other.chunk_count
        return out

    # --- GGUF ----------------------------------------------------------------------------------------------
    def write_gguf(self, path: str | os.PathLike) -> None:
        """Write llama.cpp's imatrix GGUF (as llama-imatrix's `save_imatrix` does), atomically."""
        import gguf

        path = Path(path)
        _check_u32("chunk_count", self.chunk_count)
        _check_u32("chunk_size", self.chunk_size)

        def write(tmp: Path) -> None:
            w = _writer_class()(tmp, arch="")     # an empty arch adds no general.architecture, as llama-imatrix
            w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
            w.add_key_value(gguf.Keys.General.TYPE, gguf.GGUFType.IMATRIX, gguf.GGUFValueType.STRING)
            w.add_key_value(gguf.Keys.IMatrix.DATASETS, list(self.datasets), gguf.GGUFValueType.ARRAY,
                            sub_type=gguf.GGUFValueType.STRING)
            w.add_key_value(gguf.Keys.IMatrix.CHUNK_COUNT, int(self.chunk_count), gguf.GGUFValueType.UINT32)
            w.add_key_value(gguf.Keys.IMatrix.CHUNK_SIZE, int(self.chunk_size), gguf.GGUFValueType.UINT32)
            if self.basis is not None:    # (llama-quantize reads only the imatrix.* keys)
                w.add_key_value(BASIS_KEY, json.dumps(self.basis, sort_keys=True), gguf.GGUFValueType.STRING)
            for name in self.names:      # byte order of the names, as std::sort on std::string
                s, c = self.sums[name], self.counts[name]
                n_mat = c.size
                if s.size == 0 or n_mat == 0:
                    continue
                if s.size % n_mat:
                    raise TwinquantError(f"imatrix {name}: {s.size} values do not split into {n_mat} matrices")
                # ggml trims trailing 1-sized dims: a dense weight's sums are 1-D [in], its counts 1-D [1]
                shape_s = (s.size,) if n_mat == 1 else (n_mat, s.size // n_mat)
                shape_c = (1,) if n_mat == 1 else (n_mat, 1)
                w.add_tensor(name + SUM_SUFFIX, np.ascontiguousarray(s, dtype=np.float32).reshape(shape_s))
                w.add_tensor(name + COUNT_SUFFIX, c.astype(np.float32).reshape(shape_c))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()

        _atomic_write(path, write)

    # --- legacy .dat ---------------------------------------------------------------------------------------
    def write_dat(self, path: str | os.PathLike) -> None:
        """Write llama-imatrix's legacy binary format (`--output-format dat`), atomically. Entries without any
        data are skipped, as llama-imatrix does."""
        if self.chunk_size <= 0:
            raise TwinquantError("imatrix: chunk_size must be positive to write the legacy .dat format")
        path = Path(path)
        buf = bytearray()
        names = []
        for name in self.names:
            c = self.counts[name]
            if c.size == 0 or not (c > 0).any():
                continue
            names.append(name)
        buf += struct.pack("<i", len(names))
        for name in names:
            s, c = self.sums[name].reshape(-1).astype(np.float32), self.counts[name]
            raw = name.encode("utf-8")
            ncall = (int(c.max()) + self.chunk_size - 1) // self.chunk_size
            per = s.size // c.size
            cnt = np.repeat(c.astype(np.float32), per)
            val = s.copy()
            zero = cnt == 0
            val[zero], cnt[zero] = np.float32(1), np.float32(1)       # "store 1 for partial data"
            tmp = (val / cnt) * np.float32(ncall)
            buf += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, s.size)
            buf += tmp.astype("<f4").tobytes()
        buf += struct.pack("<i", int(self.chunk_count))
        ds = (self.datasets[-1] if self.datasets else "").encode("utf-8")
        buf += struct.pack("<i", len(ds)) + ds

        def write(tmp: Path) -> None:
            tmp.write_bytes(bytes(buf))

        _atomic_write(path, write)

    # --- read ----------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike, chunk_size: int | None = None) -> Imatrix:
        """Read an imatrix GGUF or a legacy `.dat` file (told apart by the GGUF magic).

        A legacy file stores sum/count·ncall and ncall only; it is read as llama-imatrix's `--in-file` does, sums ×
        chunk_size and counts = ncall × chunk_size, so it merges with raw data collected at that chunk size. With
        chunk_size None the factor is 1 (counts = ncall), which keeps `importance` exactly what llama-quantize
        computes from the file."""
        path = Path(path)
        if not path.is_file():
            raise TwinquantError(f"{path}: no such imatrix file")
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _read_gguf(path)
        return _read_dat(path, chunk_size)


read_imatrix = Imatrix.read


# --- collection ------------------------------------------------------------------------------------------------
class _Accumulator:
    """The LinearHook: float64 per-column sums of x² and token counts per weight name."""

    def __init__(self, include: Callable[[str], bool], stack_size: Callable[[str], int] | None = None):
        self.include = include
        self.stack_size = stack_size      # name -> matrices in a stacked tensor (experts, MLA's heads)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.slices: dict[str, dict[int, list]] = {}      # stacked tensor -> {matrix: [Σ x², tokens]}
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def expert_input(self, name: str, expert: int, x: torch.Tensor) -> None:
        """One matrix of a stacked tensor and its inputs (the tokens routed to an expert, or a head's): per-matrix
        sums and counts, as llama-imatrix keeps them for MUL_MAT_ID. gate_exps' inputs are up_exps' too."""
        names = [name] + ([name.replace("ffn_gate_exps", "ffn_up_exps")] if ".ffn_gate_exps." in name else [])
        x2 = x.detach().reshape(-1, x.shape[-1])
        sq = None
        for n in names:
            if not self.include(n):
                continue
            if sq is None:
                sq = x2.to(torch.float64).pow(2).sum(0)
            acc = self.slices.setdefault(n, {}).setdefault(expert, [torch.zeros_like(sq), 0])
            acc[0] += sq
            acc[1] += x2.shape[0]

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if not self.include(name):
            return
        last = self._last
        if last is not None and last[0] is x:        # q/k/v and gate/up share one input tensor
            sq, rows = last[1], last[2]
        else:
            x2 = x.detach().reshape(-1, x.shape[-1])
            rows = x2.shape[0]
            sq = x2.to(torch.float64).pow(2).sum(0)
            self._last = (x, sq, rows)
        acc = self.sums.get(name)
        if acc is None:
            self.sums[name] = sq.clone()
        elif acc.shape != sq.shape:
            raise TwinquantError(f"imatrix: {name} input width changed ({acc.shape[0]} -> {sq.shape[0]})")
        else:
            acc += sq
        self.counts[name] = self.counts.get(name, 0) + rows

    def snapshot(self, chunk_count: int, chunk_size: int, datasets: Iterable[str]) -> Imatrix:
        sums, counts = {}, {}
        for name, s in self.sums.items():
            v = s.cpu().numpy().astype(np.float32)
            if not np.isfinite(v).all():
                raise TwinquantError(f"imatrix: non-finite values in the activations of {name}")
            sums[name] = v
            counts[name] = np.array([self.counts[name]], dtype=np.int64)
        for name, per in self.slices.items():     # every matrix, those no token reached with zeros
            n_mat = self.stack_size(name)
            cols = next(iter(per.values()))[0].shape[0]
            v = np.zeros((n_mat, cols), dtype=np.float32)
            c = np.zeros(n_mat, dtype=np.int64)
            for e, (sq, rows) in per.items():
                v[e], c[e] = sq.cpu().numpy().astype(np.float32), rows
            if not np.isfinite(v).all():
                raise TwinquantError(f"imatrix: non-finite values in the activations of {name}")
            from twinquant.model import roles

            if not roles.is_expert_stack(name):     # a dense 3-D tensor (per-head): one count, as llama-imatrix
                v, c = v.reshape(-1), c[:1]
            sums[name], counts[name] = v, c
        return Imatrix(sums, counts, list(datasets), chunk_count, chunk_size)


def collect_imatrix(model, windows, progress: bool = True, process_output: bool = False,
                    datasets: Iterable[str] = (),
                    on_chunk: Callable[[int, Callable[[], Imatrix]], None] | None = None,
                    every: int | None = None, stream: bool | None = None) -> Imatrix:
    """Run `windows` (int64 [n, ctx] token windows, BOS already placed, or an object with `.tokens` / `.windows`)
    through the model and collect the imatrix of every `blk.*` linear (and of `output.weight` with
    `process_output`, unless the head is tied to the embeddings, as llama-imatrix does).

    Each window is one chunk; chunk_size = ctx. Sums are accumulated in float64 and stored as float32.
    `on_chunk(done, snapshot)` is called after every window, or with `every` after every `every` windows;
    `snapshot()` builds the imatrix so far (for periodic saves).

    `stream` (default: when the model is lazily loaded with the plain layout) runs the windows block by block,
    `every` of them at a time (all at once without it): each block is read, run on the group's windows and
    released, so a model larger than memory needs one block plus the group's hidden states ([every, ctx,
    hidden]). Every tensor's sums are added window after window in both orders, so the bytes are the same.
    """
    from twinquant.eval.perplexity import streamable
    from twinquant.progress import Progress

    tokens = getattr(windows, "tokens", None)
    if tokens is None:
        tokens = getattr(windows, "windows", windows)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise TwinquantError("imatrix: windows must be a non-empty [n, ctx] tensor of token ids")
    if every is not None and every < 1:
        raise TwinquantError(f"imatrix: every must be positive, got {every}")
    n, ctx = tokens.shape
    head = process_output and not model.spec.tied_embeddings
    from twinquant.model import roles

    acc = _Accumulator(lambda name: name.startswith("blk.") or (head and name == "output.weight"),
                       lambda name: roles.expected_shape(model.spec, name)[0])
    ds = list(datasets)
    if stream is None:
        stream = streamable(model)
    step = every or (n if stream else 1)
    with Progress(n, "imatrix", enabled=progress) as bar:
        for i in range(0, n, step):
            j = min(i + step, n)
            if stream:
                _streamed_group(model, tokens[i:j], acc, head, progress)
            else:
                for k in range(i, j):
                    _window(model, tokens[k: k + 1], acc)
            bar.update(j)
            if on_chunk is not None:
                on_chunk(j, lambda done=j: acc.snapshot(done, ctx, ds))
    return acc.snapshot(n, ctx, ds)


def _window(model, tokens: torch.Tensor, acc: _Accumulator) -> None:
    """One window through the whole model; all logits computed, as llama-imatrix requests them."""
    from twinquant.model.forward import forward

    forward(model, tokens, hook=acc)
    acc._last = None


@torch.inference_mode()
def _streamed_group(model, tokens: torch.Tensor, acc: _Accumulator, head: bool, progress: bool) -> None:
    """Windows [g, ctx] through the model block by block (each block released after use), window after window
    within a block; the head's input collected only when wanted (the logits themselves are not needed)."""
    from twinquant.eval.perplexity import blocks_streamed
    from twinquant.model import roles
    from twinquant.model.forward import head as head_forward

    def forget():                         # q/k/v's shared input is cached per window
        acc._last = None

    x = blocks_streamed(model, tokens, hook=acc, after_window=forget, progress=progress)
    if head:
        for xk in x:
            head_forward(model, xk, hook=acc)
            acc._last = None
        for t in (roles.T.OUTPUT_NORM, roles.T.OUTPUT):
            model.release(roles.name(t))


# --- coverage / statistics -------------------------------------------------------------------------------------
def coverage(imatrix: Imatrix, tensor_names: Iterable[str]) -> dict[str, dict]:
    """Per tensor name: {"present": has an entry, "count": tokens (smallest over its matrices; 0 if absent),
    "partial": some matrix of it has no data}."""
    out = {}
    for name in tensor_names:
        c = imatrix.counts.get(name)
        if c is None or c.size == 0:
            out[name] = {"present": False, "count": 0, "partial": False}
        else:
            out[name] = {"present": bool((c > 0).any()), "count": int(c.min()),
                         "partial": bool((c == 0).any() and (c > 0).any())}
    return out


def _layer_and_tensor(name: str) -> tuple[str, str]:
    parts = name.split(".")
    layer = parts[parts.index("blk") + 1] if "blk" in parts[:-1] else "-"
    tensor = parts[parts.index("weight") - 1] if "weight" in parts[1:] else name
    return layer, tensor


def statistics(imatrix: Imatrix) -> list[dict]:
    """Per tensor, what `llama-imatrix --show-statistics` reports, over the per-column means sum/count:
    Σ(Act²), min, max, mean, std, active fraction (|mean| > 1e-5), N columns, entropy (bits) and its percentage
    of log2 N, ZD (fraction of columns with z-score > 1) and the cosine similarity of the raw sums with the same
    tensor of the previous block. Sorted like llama-imatrix: by tensor kind, then Σ(Act²) descending."""
    rows = []
    for name in imatrix.names:
        s, c = imatrix.sums[name], imatrix.counts[name]
        if c.size == 0 or s.size % c.size:
            continue
        s2 = s.reshape(c.size, -1).astype(np.float64)
        acts = np.concatenate([s2[j] / c[j] for j in range(c.size) if c[j] > 0]) if (c > 0).any() else None
        if acts is None or acts.size == 0:
            continue
        total = float(acts.sum())
        mean = total / acts.size
        std = math.sqrt(max(0.0, float((acts * acts).mean()) - mean * mean))
        p = acts / total if total > 0 else np.zeros_like(acts)
        entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum()) if total > 0 else 0.0
        zd = float(((acts - mean) / std > 1).mean()) if std > 0 else 0.0
        layer, tensor = _layer_and_tensor(name)
        rows.append({"name": name, "layer": layer, "tensor": tensor, "sum": total, "min": float(acts.min()),
                     "max": float(acts.max()), "mean": mean, "std": std,
                     "active": 1.0 - float((np.abs(acts) <= 1e-5).mean()), "n": int(acts.size),
                     "entropy": entropy,
                     "entropy_norm": 100.0 * entropy / math.log2(acts.size) if acts.size > 1 else 0.0,
                     "zd": zd, "cossim": 0.0, "_raw": s.reshape(-1).astype(np.float64)})
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["layer"] == "-":
            continue
        prev_name = r["name"].replace(f"blk.{r['layer']}.", f"blk.{int(r['layer']) - 1}.", 1)
        prev = by_name.get(prev_name)
        if prev is not None and prev["_raw"].size == r["_raw"].size:
            den = np.linalg.norm(r["_raw"]) * np.linalg.norm(prev["_raw"])
            r["cossim"] = float(r["_raw"] @ prev["_raw"] / den) if den > 0 else 0.0
    for r in rows:
        del r["_raw"]
    rows.sort(key=lambda r: (r["tensor"], -r["sum"]))
    return rows


def format_statistics(imatrix: Imatrix) -> str:
    """The per-tensor table and the per-layer weighted averages, laid out like llama-imatrix's."""
    rows = statistics(imatrix)
    header = (f"{'Layer':>5}  {'Tensor':<20} {'Σ(Act²)':>12} {'Min':>10} {'Max':>12} {'μ':>10} {'σ':>10} "
              f"{'% Active':>9} {'N':>7} {'Entropy':>9} {'E (norm)':>9} {'ZD':>8} {'CosSim':>8}")
    lines = [header, "=" * len(header)]
    per_layer: dict[int, list[float]] = {}
    for r in rows:
        lines.append(f"{r['layer']:>5}  {r['tensor']:<20} {r['sum']:>12.2f} {r['min']:>10.4f} {r['max']:>12.4f} "
                     f"{r['mean']:>10.2f} {r['std']:>10.2f} {100 * r['active']:>8.2f}% {r['n']:>7d} "
                     f"{r['entropy']:>9.4f} {r['entropy_norm']:>8.2f}% {100 * r['zd']:>7.2f}% {r['cossim']:>8.4f}")
        if r["layer"] != "-":
            w = per_layer.setdefault(int(r["layer"]), [0.0, 0.0, 0.0, 0])
            w[0] += r["n"] * r["sum"]
            w[1] += r["n"] * r["zd"]
            w[2] += r["n"] * r["cossim"]
            w[3] += r["n"]
    lines += ["", f"weighted averages per layer ({len(per_layer)} layers)",
              f"{'Layer':>5}  {'μΣ(Act²)':>14} {'μZD':>10} {'μCosSim':>8}", "=" * 42]
    for layer in sorted(per_layer):
        b, z, cs, n = per_layer[layer]
        if n:
            lines.append(f"{layer:>5}  {b / n:>14.2f} {100 * z / n:>9.4f}% {cs / n:>8.4f}")
    return "\n".join(lines)


# --- helpers ---------------------------------------------------------------------------------------------------
def _check_u32(what: str, v: int) -> None:
    if not 0 <= int(v) < 2 ** 32:
        raise TwinquantError(f"imatrix: {what} {v} does not fit the format's uint32")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _writer_class():
    import gguf

    class Writer(gguf.GGUFWriter):
        """gguf-py refuses empty arrays; llama-imatrix writes `imatrix.datasets` even when it is empty."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer



def _read_gguf(path: Path) -> Imatrix:
    import gguf

    from twinquant.io.gguf_read import open_gguf

    reader = open_gguf(path)   # memory-mapped; released with `reader` on return

    def get(key, default):
        f = reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:  # noqa: BLE001 - a damaged value
            raise TwinquantError(f"{path}: corrupt imatrix metadata {key} ({e})") from None

    datasets = get(gguf.Keys.IMatrix.DATASETS, [])
    if isinstance(datasets, str) or not isinstance(datasets, list) or \
            not all(isinstance(d, str) for d in datasets):
        raise TwinquantError(f"{path}: imatrix.datasets is not an array of strings")
    chunk_count = get(gguf.Keys.IMatrix.CHUNK_COUNT, 0)
    chunk_size = get(gguf.Keys.IMatrix.CHUNK_SIZE, 0)
    for key, v in (("imatrix.chunk_count", chunk_count), ("imatrix.chunk_size", chunk_size)):
        if not isinstance(v, int) or v < 0:
            raise TwinquantError(f"{path}: {key} is not an unsigned integer")
    basis = get(BASIS_KEY, None)
    if basis is not None:
        try:
            basis = json.loads(basis) if isinstance(basis, str) else None
        except ValueError:
            basis = None
        if not isinstance(basis, dict) or set(basis) != {"rotation", "seed", "pad", "pad_multiple"}:
            raise TwinquantError(f"{path}: {BASIS_KEY} is not a basis record (rotation, seed, pad, pad_multiple)")
    pairs: dict[str, list] = {}
    for t in reader.tensors:
        for suffix, slot in ((SUM_SUFFIX, 0), (COUNT_SUFFIX, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    if not pairs:
        raise TwinquantError(f"{path}: not an imatrix file (no '{SUM_SUFFIX}' / '{COUNT_SUFFIX}' tensors)")
    sums, counts = {}, {}
    for name, (ts, tc) in pairs.items():
        if ts is None or tc is None:
            raise TwinquantError(f"{path}: mismatched sums and counts for {show(name)}")
        if ts.tensor_type != gguf.GGMLQuantizationType.F32 or tc.tensor_type != gguf.GGMLQuantizationType.F32:
            raise TwinquantError(f"{path}: sums and counts for {show(name)} must be F32")
        s = np.array(ts.data, dtype=np.float32).reshape(-1)
        c = np.array(tc.data, dtype=np.float32).reshape(-1)
        if s.size == 0 or c.size == 0 or s.size % c.size:
            raise TwinquantError(f"{path}: {show(name)} has {s.size} sums for {c.size} counts")
        if not np.isfinite(c).all() or (c < 0).any() or (c >= 2.0 ** 62).any():
            raise TwinquantError(f"{path}: invalid counts for {show(name)}")
        if not np.isfinite(s).all():
            raise TwinquantError(f"{path}: non-finite sums for {show(name)}")
        sums[name] = s if c.size == 1 else s.reshape(c.size, -1)
        # std::lround: halves away from zero
        counts[name] = np.floor(c.astype(np.float64) + 0.5).astype(np.int64)
    return Imatrix(sums, counts, list(datasets), int(chunk_count), int(chunk_size), basis)


def _read_dat(path: Path, chunk_size: int | None) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise TwinquantError(f"{path}: truncated or corrupt imatrix file (reading {what} at byte {pos})")
        b = data[pos: pos + n]
        pos += n
        return b

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    if len(data) < 4:
        raise TwinquantError(f"{path}: not an imatrix file (too short)")
    n_entries = i32("the entry count")
    if n_entries < 1 or n_entries > len(data) // 16:
        raise TwinquantError(f"{path}: not an imatrix file (GGUF or legacy .dat): bad entry count {n_entries}")
    factor = 1 if chunk_size is None else int(chunk_size)
    if factor < 1:
        raise TwinquantError(f"imatrix: chunk_size must be positive, got {chunk_size}")
    sums, counts = {}, {}
    for i in range(n_entries):
        n = i32(f"the name length of entry {i + 1}")
        raw = take(n, f"the name of entry {i + 1}")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TwinquantError(f"{path}: corrupt imatrix file (entry {i + 1} has an invalid name)") from None
        if not name or name in sums:
            raise TwinquantError(f"{path}: corrupt imatrix file (empty or duplicate entry name {name!r})")
        ncall = i32(f"the call count of {show(name)}")
        nval = i32(f"the value count of {show(name)}")
        if ncall < 0 or nval < 1:
            raise TwinquantError(f"{path}: corrupt imatrix file ({show(name)}: ncall {ncall}, nval {nval})")
        vals = np.frombuffer(take(4 * nval, f"the values of {show(name)}"), dtype="<f4").astype(np.float32)
        with np.errstate(over="ignore"):
            sums[name] = vals * np.float32(factor) if factor != 1 else vals
        if not np.isfinite(sums[name]).all():      # stored so, or too large once scaled by the chunk size
            raise TwinquantError(f"{path}: non-finite values for {show(name)}")
        counts[name] = np.array([ncall * factor], dtype=np.int64)
    chunk_count, datasets = 0, []
    if pos < len(data):                          # optional trailer: chunk count, dataset name
        chunk_count = i32("the chunk count")
        if chunk_count < 0:
            raise TwinquantError(f"{path}: corrupt imatrix file (chunk count {chunk_count})")
        if pos < len(data):
            n = i32("the dataset name length")
            if n > 0:
                ds = take(n, "the dataset name").decode("utf-8", errors="replace")
                datasets.append(ds.split("\0", 1)[0])
        if pos != len(data):
            raise TwinquantError(f"{path}: corrupt imatrix file ({len(data) - pos} unexpected trailing bytes)")
    return Imatrix(sums, counts, datasets, chunk_count, factor)
