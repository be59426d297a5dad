"""Measure what every candidate type costs each tensor, once, so any target size can be solved from it.

For every quantizable tensor and every candidate type (`candidate_types`: K-quants Q2_K…Q6_K, Q8_0 and the i-quants
IQ1_S…IQ4_XS where rows are whole 256-blocks, the 32-block types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL and
Q1_0 (128-blocks) elsewhere, and Q2_0 (64-blocks) on both) the tensor is quantized with the
quantizer the file will really use (GPTQ with the layer's input Hessian and the importance data; RTN for the
embedding, as the quantize executor does) and its cost is recorded as the KL divergence it adds to the model's output:

* the cheapest candidate (the *anchor*) is put into the otherwise float model alone and the calibration windows run
  from the tensor's block to the logits: `anchor_kld` = mean KL(reference ‖ perturbed) per scored token;
* every candidate's output error `e = tr(ΔW H ΔWᵀ)` on the block's real inputs is computed with no extra forward;
* cost(type) = anchor_kld · e(type) / e(anchor): KL grows with the squared output perturbation of one tensor (both
  are quadratic in ΔW near the reference), so one forward per tensor prices all its candidates. `cost="exact"`
  measures the KL of every candidate instead (one forward each) — the check of that proxy.
  The embedding and the output head are always measured exactly (few candidates, and no Hessian for the embedding).
* `cost="fisher"` prices every candidate, the embedding and head included, by the Fisher-weighted output error of
  `allocation/fisher.py` instead: no KL forward at all, so the model streams block by block (for models where a
  forward per tensor cannot be afforded; it ranks tensors of one type like the KL but has role biases, see there).

Inputs are the float model's (each tensor is perturbed alone: the costs are meant to add up; `benchmarks/frontier.py`
checks how well they do). The measurement is a JSON file, written after every block (atomically), so an
interrupted run resumes where it stopped and gives the same file as an uninterrupted one. `sha256()` names it in
the GGUF's `twinquant.quant.allocation`.

With `sample_rows` (Fisher cost only) each candidate is quantized on a sample of each tensor's rows, not all of
them: GPTQ and the codecs round every row on its own, so the sampled rows are exactly what a full quantization
gives them, and a tensor's cost is `Σ_j G_j (ΔW A ΔWᵀ)_jj` estimated by the ratio estimator: the sampled rows'
Fisher-weighted share of error, `Σ_S G_j r_j / Σ_S G_j s_j` (r = the row's error, s = the row's own signal
`(W A Wᵀ)_jj`), times the whole tensor's `Σ_all G_j s_j`, computed exactly. A type's relative error varies little
from row to row, so a few dozen rows (half those with the largest G, half evenly spaced) price a 8960-row
tensor; the embedding is priced on exactly the rows of the tokens the Fisher windows hold (the others cost
nothing there), so it stays exact. The Hessian of a tensor is factorised once for all its candidates, and tensors
that read one input (q, k, v; gate, up) have their sampled rows quantized as one matrix (one sweep per candidate).

With `keep_blocks` every candidate's packed GGML bytes are also kept (`<measurement>.blocks/`, one .npy per tensor and
type; about four times the size of a 5-bit file): `quantize --from-measurement` then assembles a file for any target
from them in seconds instead of quantizing again (each tensor as measured: GPTQ on the float model's inputs, not
the sequential GPTQ of a normal `quantize` run).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch
import torch.nn.functional as F

from twinquant.formats import tensor_bytes  # noqa: F401  (re-exported: measurement entries price their bytes)
from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.forward import block_forward, embed, head, rms_norm
from twinquant.progress import Progress

VERSION = 1
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
BLOCK32_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
# llama.cpp's i-quants (256-blocks but IQ4_NL): lattice codebooks, the only types below Q2_K's 2.625 bpw
I_TYPES = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")
# rows that are no multiple of 256 (576, 896, 4864 wide): IQ4_NL, and Q1_0's signs where the row is 128-blocks (the
# only type below 4 bits those rows can take)
I_BLOCK32_TYPES = ("IQ4_NL", "Q1_0")
# llama.cpp's 2-bit 64-blocks ({-1, 0, 1, 2}·d, 2.25 bpw): a candidate on every row it fits, 256-aligned or not
ANY_ROW_TYPES = ("Q2_0",)
CANDIDATE_SETS = ("all", "k")       # "k": the K-quant / legacy types only (faster to measure, >= 2.625 bpw)
FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
T = roles.T


def candidate_types(cols: int, candidates: str = "all") -> list[str]:
    """The types a row of `cols` values can take (no fallback: every one of them fits exactly); the first is the
    anchor of the "anchor" cost (Q2_K / Q4_0, whose KL forwards were validated). `candidates`: "all" or "k"."""
    if candidates not in CANDIDATE_SETS:
        raise TwinquantError(f"candidates must be one of {', '.join(CANDIDATE_SETS)}, not {candidates!r}")
    kinds = K_TYPES if cols % 256 == 0 else BLOCK32_TYPES
    if candidates == "all":
        kinds = kinds + (I_TYPES if cols % 256 == 0 else I_BLOCK32_TYPES) + ANY_ROW_TYPES
    return [t for t in kinds if cols % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]][0] == 0]


@dataclass
class Measurement:
    header: dict                                  # what was measured, how (must match to be reused / resumed)
    n_params: int                                 # of the source model (bits per weight are counted against it)
    fixed_bytes: int                              # tensors kept in float (norms, biases, …)
    tensors: dict[str, dict] = field(default_factory=dict)   # name -> {shape, anchor, candidates{type: {...}}}
    seconds: float = 0.0
    complete: bool = False

    # --- file ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": VERSION, "header": self.header, "n_params": self.n_params,
                "fixed_bytes": self.fixed_bytes, "complete": self.complete, "seconds": self.seconds,
                "tensors": self.tensors}

    @classmethod
    def from_dict(cls, d: dict) -> Measurement:
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise TwinquantError(f"not a twinquant measurement of version {VERSION}")
        missing = [k for k in ("header", "n_params", "fixed_bytes", "tensors", "complete") if k not in d]
        if missing:
            raise TwinquantError(f"measurement: malformed (no {missing[0]!r})")
        header, n_params, fixed, tensors = d["header"], d["n_params"], d["fixed_bytes"], d["tensors"]
        seconds, complete = d.get("seconds", 0.0), d["complete"]
        if not isinstance(header, dict) or not isinstance(tensors, dict) or not isinstance(complete, bool):
            raise TwinquantError("measurement: malformed (header and tensors must be objects, complete a bool)")
        if not _is_int(n_params) or n_params <= 0 or not _is_int(fixed) or fixed < 0:
            raise TwinquantError(f"measurement: malformed (n_params {str(n_params)[:40]!r}, fixed_bytes "
                                 f"{str(fixed)[:40]!r})")
        if not _is_number(seconds):
            raise TwinquantError(f"measurement: malformed (seconds {str(seconds)[:40]!r})")
        for name, t in tensors.items():
            _check_entry(name, t)
        return cls(header, n_params, fixed, dict(tensors), float(seconds), complete)

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Measurement:
        p = Path(path)
        if not p.is_file():
            raise TwinquantError(f"{p}: no such measurement file")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
            raise TwinquantError(f"{p}: not a measurement JSON ({type(e).__name__}: {str(e)[:200]})") from None
        try:
            return cls.from_dict(d)
        except TwinquantError as e:
            raise TwinquantError(f"{p}: {e}") from None

    def sha256(self) -> str:
        """Hash of what the allocation depends on (header, sizes, costs), not of timings."""
        body = {"header": self.header, "n_params": self.n_params, "fixed_bytes": self.fixed_bytes,
                "tensors": self.tensors}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    # --- use -----------------------------------------------------------------------------------------------
    def check_matches(self, header: dict) -> None:
        """Error unless this measurement was made for the same weights (`source`: the files' sizes and end
        hashes), model preparation, quantizer and calibration. A measurement from before `source` was recorded
        is taken with a warning (nothing in it says which weights it priced)."""
        first = {"source": 0, "method": 1}      # the weights, then the quantizer: the causes of the other lines
        diff = sorted((k for k in set(header) | set(self.header) if header.get(k) != self.header.get(k)),
                      key=lambda k: (first.get(k, 2), k))
        if "source" in diff and "source" not in self.header:
            warnings.warn("the measurement does not record which weights it was made for (made before twinquant "
                          "recorded it); it is taken as this model's")
            diff.remove("source")
        if diff:
            k = diff[0]
            if k == "source":
                raise TwinquantError(f"the measurement was made for other weights ({_files(self.header[k])}; this "
                                     f"model: {_files(header.get(k))}); measure this model")
            raise TwinquantError(f"the measurement was made with {k} = {self.header.get(k)!r}, this run has "
                                 f"{header.get(k)!r}; measure again or use a matching recipe")

    def groups(self, fixed: dict[str, str] | None = None, minimum: dict[str, str] | None = None,
               exclude: tuple[str, ...] = ()):
        """Solver groups (one per tensor); `fixed` / `minimum`: name -> type from the user's rules; `exclude`:
        types dropped from every tensor's candidates (a fixed type stays)."""
        from twinquant.allocation.solve import Candidate, Group

        if not self.complete:
            raise TwinquantError("the measurement is incomplete; run `twinquant measure` again to resume it")
        fixed, minimum = fixed or {}, minimum or {}
        out = []
        for name, t in self.tensors.items():
            f = fixed.get(name)
            cands = [Candidate(ty, c["bytes"], c["cost"]) for ty, c in t["candidates"].items()
                     if ty not in exclude or ty == f]
            if not cands:
                raise TwinquantError(f"{name}: --exclude-type leaves it no measured type")
            if f is not None and f not in t["candidates"]:   # a type we did not measure (e.g. F16): size known
                f = f.upper()
                cost = 0.0 if f in FLOAT_BYTES else min(c.cost for c in cands)
                size = math.prod(t["shape"]) * FLOAT_BYTES[f] if f in FLOAT_BYTES else tensor_bytes(f, t["shape"])
                cands.append(Candidate(f, size, cost))
            out.append(Group(name, cands, fixed=f, min_type=minimum.get(name)))
        return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_entry(name: str, t) -> None:
    """One tensor of a measurement file: {shape: [1-3 positive ints], anchor: one of its candidates, candidates: {GGML
    type: {bytes: int >= 0, cost: finite number, other numbers finite or null}}}."""
    def bad(what: str):
        return TwinquantError(f"measurement: malformed entry {name[:60]!r} ({what})")

    if not isinstance(t, dict) or not isinstance(t.get("candidates"), dict) or not t["candidates"]:
        raise bad("no candidates")
    shape = t.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3 or not all(_is_int(v) and v > 0 for v in shape):
        raise bad(f"shape {str(shape)[:40]!r}")
    if not isinstance(t.get("anchor"), str) or t["anchor"] not in t["candidates"]:
        raise bad(f"anchor {str(t.get('anchor'))[:40]!r} is not a candidate")
    for ty, c in t["candidates"].items():
        if ty not in gguf.GGMLQuantizationType.__members__:
            raise bad(f"{ty[:20]!r} is not a GGML type")
        if not isinstance(c, dict) or not _is_int(c.get("bytes")) or c["bytes"] < 0 or not _is_number(c.get("cost")):
            raise bad(f"{ty}: bytes and cost must be a non-negative int and a finite number")
        if not all(v is None or _is_number(v) for v in c.values() if not isinstance(v, str)):
            raise bad(f"{ty}: a value is not a finite number")


# --- kept blocks ---------------------------------------------------------------------------------------------------
def blocks_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".blocks")


def _save_block(path: Path, data) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, np.ascontiguousarray(data))
    os.replace(tmp, path)


def load_block(path: str | os.PathLike, name: str, type_name: str, shape) -> tuple[torch.Tensor, object]:
    """(dequantized float32 [rows, cols], packed uint8 bytes) of one kept candidate of a measurement at `path`."""
    import numpy as np

    from twinquant.formats.ggml import get_codec

    f = blocks_dir(path) / f"{name}.{type_name}.npy"
    if not f.is_file():
        raise TwinquantError(f"{f}: missing; measure with --keep-blocks to use --from-measurement")
    data = np.load(f)
    codec = get_codec(type_name)
    rows, cols = shape
    if data.shape != (rows, codec.bytes_per_row(cols)):
        raise TwinquantError(f"{f}: {data.shape} bytes do not hold {type_name} [{rows}, {cols}]")
    return codec.dequantize_bytes(data, cols), data


# --- rules ---------------------------------------------------------------------------------------------------------
def match_rules(names, rules: list[str], what: str = "--tensor-type") -> dict[str, str]:
    """name -> type for REGEX=TYPE rules (the first matching rule wins, as llama-quantize's --tensor-type)."""
    from twinquant.allocation.mixes import parse_type, type_name

    parsed = []
    for r in rules:
        pat, sep, ty = r.partition("=")
        if not sep or not pat or not ty:
            raise TwinquantError(f"{what} {r!r}: expected REGEX=TYPE")
        try:
            parsed.append((re.compile(pat), type_name(parse_type(ty))))
        except re.error as e:
            raise TwinquantError(f"{what} {r!r}: bad regular expression ({e})") from None
    out = {}
    for n in names:
        for rx, ty in parsed:
            if rx.search(n):
                out[n] = ty
                break
    return out


# --- measuring -----------------------------------------------------------------------------------------------------
def _kld(logp: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """Sum over positions of KL(ref ‖ logp) (both log-probs [..., vocab]), and the number of positions."""
    k = (ref.exp() * (ref - logp)).sum(-1)
    return float(k.double().sum()), k.numel()


class _Scorer:
    """Runs the KL windows from a block's (float) input to the logits and compares with the reference."""

    def __init__(self, model, windows: torch.Tensor):
        self.model = model
        self.scored = slice(windows.shape[1] // 2, None)   # the second half, as llama-perplexity scores
        self.ref = None
        self.ref = [self._logp(0, embed(model, windows[i: i + 1]).float()) for i in range(windows.shape[0])]

    def _logp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = x.to(m.dtype)
        for j in range(layer, m.spec.n_layers):
            x = block_forward(m, j, x)
        return F.log_softmax(head(m, x[:, self.scored]).float(), -1)

    @torch.inference_mode()
    def kld(self, layer: int, xs: list[torch.Tensor]) -> float:
        tot, n = 0.0, 0
        for x, ref in zip(xs, self.ref):
            s, c = _kld(self._logp(layer, x), ref)
            tot, n = tot + s, n + c
        return max(tot / n, 0.0)


def _out_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    d = (W_hat.float() - W).double()
    return float(((d @ H.double()) * d).sum())


def _row_quadratic(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(W H Wᵀ)_jj for every row j, float64 [rows], in row chunks (float32 products: W of a head is 151936 rows)."""
    Hf = H.float()
    return torch.cat([((W[a:a + 8192].float() @ Hf) * W[a:a + 8192].float()).double().sum(1)
                      for a in range(0, W.shape[0], 8192)])


def sample_row_indices(G: torch.Tensor | None, rows: int, k: int) -> torch.Tensor:
    """`k` of `rows` row indices, sorted: half the rows with the largest Fisher weight G (where the cost lives),
    half evenly spaced (the rest of the tensor); all rows when k >= rows."""
    if k >= rows:
        return torch.arange(rows)
    top = torch.topk(G.double(), k // 2).indices if G is not None and k >= 2 else torch.zeros(0, dtype=torch.long)
    even = (torch.arange(k - top.numel()) * rows) // (k - top.numel())
    idx = torch.unique(torch.cat([top.cpu(), even]))
    if idx.numel() < k:                  # the two halves overlapped: fill up with the next unused rows
        free = torch.ones(rows, dtype=torch.bool)
        free[idx] = False
        idx = torch.cat([idx, torch.nonzero(free).flatten()[: k - idx.numel()]])
    return torch.sort(idx).values


def _sampled_cost(dW: torch.Tensor, rows: torch.Tensor, signal: torch.Tensor, G: torch.Tensor, H: torch.Tensor,
                  n_bytes: int, scored: int) -> dict:
    """A candidate's entry from the error dW of the sampled `rows` (the ratio estimator of the module doc; signal
    and G: every row's (W H Wᵀ)_jj and Fisher weight)."""
    r = _row_quadratic(dW, H)                                                  # r_j of the sampled rows
    s_s, G_s = signal[rows.to(signal.device)], G[rows.to(G.device)]
    return {"bytes": n_bytes, "rows": int(rows.numel()),
            "fisher": _ratio(G_s * r, G_s * s_s, (G * signal).sum()) / 2 / (2 * scored),
            "out_error": _ratio(r, s_s, signal.sum())}


def _ratio(num: torch.Tensor, den: torch.Tensor, total: torch.Tensor) -> float:
    """num.sum() / den.sum() · total (the ratio estimator), 0 where the sample has no signal."""
    d = float(den.sum())
    return float(num.sum()) / d * float(total) if d > 0 else 0.0


STACK_SHARED_INPUTS = True     # sampled rows of tensors with one input priced as one matrix (tests turn it off)


def _stacked(names: list[str], importance: dict | None) -> list[list[str]]:
    """Tensors of one input priced as one matrix where they can be (STACK_SHARED_INPUTS, one importance vector),
    else one by one."""
    if STACK_SHARED_INPUTS and len(names) > 1 and _same_importance(importance, names):
        return [names]
    return [[n] for n in names]


def _same_importance(importance: dict | None, names: list[str]) -> bool:
    """The tensors' importance vectors are one (or there are none): they can be quantized as one matrix."""
    if not importance:
        return True
    vs = [importance.get(n) for n in names]
    if all(v is None for v in vs):
        return True
    return all(v is not None and torch.equal(v, vs[0]) for v in vs)


COSTS = ("fisher", "anchor", "exact")


def measure(model, names: list[str], calib_windows: torch.Tensor, kld_windows: int, header: dict, fixed_bytes: int,
            n_params: int, method: str = "gptq", config: dict | None = None,
            importance: dict[str, torch.Tensor] | None = None, cost: str = "anchor",
            path: str | os.PathLike | None = None, progress: bool = True, log=None,
            stop_after_layer: int | None = None, keep_blocks: bool = False, stream: bool = False,
            candidates: str = "all", sample_rows: int | None = None, workdir=None,
            kld_from: torch.Tensor | None = None) -> Measurement:
    """Measure `names` (quantizable 2-D tensors of `model`, float) on the calibration windows; see module doc.

    `cost`: "fisher" (no forward: the Fisher-weighted output error of allocation/fisher.py), "anchor" (one KL
    forward per tensor, the other types scaled by output error) or "exact" (a KL forward per candidate). Every
    candidate also records its Fisher estimate (`fisher`), so any measurement checks the estimate.
    `kld_windows`: how many windows price the candidates by KL (and weigh the Fisher cost): the first of
    `kld_from` (windows held out of the Hessians, e.g. `Calibration.heldout`: a price measured on the text the GPTQ
    fit minimized its error on would flatter it), or, with `kld_from` None, the first of the calibration windows
    themselves (the Hessians use all of them; what measurements made before held-out windows did). The header
    records which (`kld_source`).
    `stream`: release each block once priced (a lazily loaded model then holds one block; "fisher" only: the other
    costs run every later block to the logits).
    `path`: save after every block, and resume from it when it holds a matching, incomplete measurement.
    `stop_after_layer`: stop (incomplete) after that block — for tests of resuming.
    `keep_blocks`: keep every candidate's packed bytes beside `path` (see module doc).
    `candidates`: "all" (K-quants, legacy types and the i-quants) or "k" (without the i-quants).
    `sample_rows`: price each candidate on this many rows of each tensor (Fisher cost only; see module doc).
    `workdir` (a `pipeline.workdir.WorkDir`, with `path`): the activations entering the next block and the Fisher
    weights are kept there after every block, so a resumed measurement starts at its first unfinished block (it
    ran every block before it again otherwise).
    """
    from twinquant.algorithms.backends import get_quantizer, quantize_experts_to_format, quantize_to_format
    from twinquant.algorithms.gptq import reuse_factors
    from twinquant.allocation.fisher import Fisher, output_fisher
    from twinquant.calibration.blocks import HessianHook, block_pass, chunked_stacks, recollector
    from twinquant.formats import codec_for

    if cost not in COSTS:
        raise TwinquantError(f"measure: cost {cost!r} is not one of {', '.join(COSTS)}")
    exact = cost == "exact"
    stream = stream and cost == "fisher"
    if sample_rows is not None:
        if not (isinstance(sample_rows, int) and not isinstance(sample_rows, bool) and sample_rows >= 2):
            raise TwinquantError(f"measure: sample_rows must be an integer >= 2, not {sample_rows!r}")
        if cost != "fisher" or keep_blocks:
            raise TwinquantError("measure: sampled rows price candidates by the Fisher cost alone (cost='fisher', "
                                 "no kept blocks: a sampled tensor has no whole quantized bytes)")

    quantizer = get_quantizer(method, config)
    rtn = get_quantizer("rtn")
    s = model.spec
    if (s.moe or s.mla) and (cost == "fisher" or keep_blocks):
        raise TwinquantError(f"measure: a {s.arch} model (stacked experts / per-head tensors) is priced by KL "
                             "(--cost anchor or exact) without kept blocks so far")
    if keep_blocks and path is None:
        raise TwinquantError("keep_blocks needs a measurement path (the blocks are kept beside it)")
    store = blocks_dir(path) if keep_blocks else None
    header = {**header, "method": method, "config": quantizer.config.to_dict(), "cost": cost, "fisher_seed": 0,
              "keep_blocks": keep_blocks, "candidates": candidates, "sample_rows": sample_rows,
              "kld_windows": int(min(kld_windows, (calib_windows if kld_from is None else kld_from).shape[0])),
              "kld_scored": "second half", "kld_source": "calibration" if kld_from is None else "held out"}
    meas = Measurement(header, n_params, fixed_bytes)
    if path is not None and Path(path).is_file():
        old = Measurement.load(path)
        old.check_matches(header)
        if old.complete:
            return old
        meas = old
        if log:
            log(f"resuming {path}: {len(old.tensors)} of {len(names)} tensors already measured")
    t_start = time.perf_counter() - meas.seconds
    want = set(names)
    kw = (calib_windows if kld_from is None else kld_from)[: header["kld_windows"]]
    if header["kld_windows"] < 1:
        raise TwinquantError("measure: no window to price the candidates on")
    if log:
        log(f"fisher: output-channel weights from {kw.shape[0]} windows (one streamed backward pass)")
    # (stacked tensors have no output taps: their candidates carry no Fisher estimate)
    fisher = None
    if not (s.moe or s.mla):
        kept = workdir.load_pt("fisher", required=False) if workdir is not None else None
        if kept is not None:
            fisher = Fisher(kept["weights"], kept["emb_tokens"], kept["emb_weights"], int(kept["scored"]))
        else:
            fisher = output_fisher(model, kw, want, seed=header["fisher_seed"], stream=stream, progress=progress)
            if workdir is not None:
                workdir.save_pt("fisher", {"weights": fisher.weights, "emb_tokens": fisher.emb_tokens,
                                           "emb_weights": fisher.emb_weights,
                                           "scored": torch.tensor(fisher.scored)})
    scorer = _Scorer(model, kw) if cost != "fisher" else None

    def sampled(group: list[str], H) -> dict:
        """Tensors that read one input (q, k, v; gate, up) or one tensor, to be priced on sampled rows: their rows
        stacked into one matrix, so each candidate is one GPTQ / block LDLQ sweep instead of one per tensor (every
        row is rounded on its own under the shared H, so each tensor's rows come out as they would alone; on a GPU
        the sweeps of small sampled matrices are bound by their launches, not their rows)."""
        mats, parts = [], []
        for name in group:
            W = model.get(name).float()
            rows = sample_row_indices(fisher.weights.get(name), W.shape[0], sample_rows).to(W.device)
            signal = _row_quadratic(W, H)
            mats.append(W[rows])
            parts.append((name, W.shape, rows, signal, fisher.weights[name].to(signal.device)))
        imp = importance.get(group[0]) if importance else None
        Ws = torch.cat(mats)
        types = candidate_types(Ws.shape[-1], candidates)
        if not types:
            raise TwinquantError(f"{group[0]}: rows of {Ws.shape[-1]} fit no quantized type (not a multiple of 32)")
        return {"H": H, "W": Ws, "mats": mats, "parts": parts, "types": types,
                "importance": torch.diagonal(H).clone() if imp is None else imp}

    def price_sampled(group: dict, quant) -> None:
        """Every candidate of a group from `sampled`: its tensors' sampled rows quantized as one matrix."""
        W, H = group["W"], group["H"]
        cands: dict[str, dict] = {name: {} for name, *_ in group["parts"]}
        with reuse_factors():                    # one factorisation of H for all the candidates
            for ty in group["types"]:
                codec = codec_for(ty, W.shape[-1])
                _, W_hat = quantize_to_format(quant, W, codec, H=H, importance=group["importance"])
                for (name, shape, rows, signal, G), W_s, hat in zip(group["parts"], group["mats"],
                                                                    W_hat.split([len(m) for m in group["mats"]])):
                    c = _sampled_cost(hat.float() - W_s, rows, signal, G, H, tensor_bytes(ty, shape), fisher.scored)
                    cands[name][ty] = {**c, "cost": c["fisher"]}
        for name, shape, *_ in group["parts"]:
            meas.tensors[name] = {"shape": list(shape), "anchor": group["types"][0], "candidates": cands[name]}

    def price(name: str, layer: int, xs, H, quant) -> None:
        """Quantize `name` into each candidate; KL of the anchor (or of all), output errors of all. H: the input
        Hessian, or a stacked tensor's per-expert ones (`ExpertHessians`)."""
        W = model.get(name).float().clone()      # on the model's device: the quantizers run there
        imp = importance.get(name) if importance else None
        if imp is None and H is not None and W.ndim == 2:
            imp = torch.diagonal(H).clone()
        types = candidate_types(W.shape[-1], candidates)
        if not types:
            raise TwinquantError(f"{name}: rows of {W.shape[-1]} fit no quantized type (not a multiple of 32)")
        direct = cost != "fisher" and (exact or H is None or layer < 0 or layer >= s.n_layers)
        rows = None
        if sample_rows is not None:   # (the other tensors are priced by price_sampled)
            assert name == emb
            rows = fisher.emb_tokens.to(W.device)       # exactly the rows the Fisher windows look up
        Ws = W if rows is None else W[rows]
        cands = {}
        with reuse_factors():                    # one factorisation of H for all the candidates
            for ty in types:
                codec = codec_for(ty, W.shape[-1])
                if W.ndim == 3:     # a stack: each expert (head) with its Hessian; its share of the tokens weighs it
                    # each expert's error taken as its result arrives, while a chunked Hessian is still held
                    W_hat, err, total = torch.empty_like(W), 0.0, max(sum(H.tokens), 1)
                    for e, (_, hat) in enumerate(quantize_experts_to_format(quant, W, codec, H, imp)):
                        W_hat[e] = hat.float()
                        err += H.tokens[e] / total * _out_error(W[e], W_hat[e], H[e])
                    cands[ty] = {"bytes": tensor_bytes(ty, W.shape), "fisher": None, "out_error": err}
                    if scorer is not None and (direct or ty == types[0]):
                        model.set(name, W_hat)
                        cands[ty]["kld"] = scorer.kld(max(layer, 0), xs)
                        model.set(name, W)
                    continue
                data, W_hat = quantize_to_format(quant if H is not None else rtn, Ws, codec, H=H, importance=imp)
                if rows is None:
                    c = {"bytes": tensor_bytes(ty, W.shape),
                         "fisher": fisher.cost(name, W, W_hat, H) if fisher is not None else None,
                         "out_error": _out_error(W, W_hat, H) if H is not None else None}
                else:
                    c = {"bytes": tensor_bytes(ty, W.shape), "fisher": fisher.cost(name, Ws, W_hat, H, sampled=True),
                         "out_error": None, "rows": int(rows.numel())}
                if store is not None:
                    _save_block(store / f"{name}.{ty}.npy", data)
                if scorer is not None and (direct or ty == types[0]):
                    model.set(name, W_hat)
                    start = max(layer, 0)
                    x_in = [embed(model, kw[i: i + 1]).float() for i in range(kw.shape[0])] if layer < 0 else xs
                    c["kld"] = scorer.kld(start, x_in)
                    model.set(name, W)
                cands[ty] = c
        anchor = types[0]
        a = cands[anchor]
        for ty, c in cands.items():
            if cost == "fisher":
                c["cost"] = c["fisher"]
            elif "kld" in c:
                c["cost"] = c["kld"]
            else:   # the proxy: KL scales with the output error of this one tensor
                c["cost"] = a["kld"] * c["out_error"] / a["out_error"] if a["out_error"] > 0 else 0.0
        meas.tensors[name] = {"shape": list(W.shape), "anchor": anchor, "candidates": cands}

    def save() -> None:
        meas.seconds = time.perf_counter() - t_start
        if path is not None:
            meas.save(path)

    emb, out = roles.name(T.TOKEN_EMBD), roles.name(T.OUTPUT)
    with torch.inference_mode(), Progress(s.n_layers + 2, "measure", enabled=progress) as bar:
        if emb in want and emb not in meas.tensors:
            price(emb, -1, None, None, rtn)
            save()
        bar.update(1, emb)
        start = workdir.state["blocks_done"] if workdir is not None else 0
        x = workdir.load_x(start) if start else embed(model, calib_windows).float()
        # held-out windows run beside the calibration stream (float weights, no Hessian hook) when KL forwards
        # start from them (a resumed run passes them through the finished blocks again: a few windows); the
        # Fisher cost takes them whole in its own pass
        xh = None
        if kld_from is not None and scorer is not None:
            xh = embed(model, kw).float()
            for layer in range(start):
                xh = block_pass(model, layer, xh)
        for layer in range(start, s.n_layers):
            groups = roles.shared_input_groups(layer, s)
            todo = [n for g in groups for n in g if n in want and n not in meas.tensors]
            names = {g[0] for g in groups if any(n in todo for n in g)}
            hooks = HessianHook(names, chunked_stacks(model, layer) & names)
            x_kld = [(x if xh is None else xh)[i: i + 1] for i in range(kw.shape[0])]
            x = block_pass(model, layer, x, hook=hooks)
            if sample_rows is not None:      # (no stacks: a sampled measurement refuses MoE / MLA models)
                for g in groups:
                    for part in _stacked([n for n in g if n in todo], importance):
                        price_sampled(sampled(part, hooks.hessian(g[0])), quantizer)
            for g in groups:
                for n in g:
                    if n in todo and n not in meas.tensors:
                        shape = roles.expected_shape(s, n)
                        H = hooks.expert_hessians(g[0], shape[0], shape[-1], recollect=recollector(
                            model, layer, hooks))[0] if roles.is_stack(n) else hooks.hessian(g[0])
                        price(n, layer, x_kld, H, quantizer)
            model.fuse_shared_inputs()
            if xh is not None:
                xh = block_pass(model, layer, xh)
            if stream:
                model.release_block(layer)
            if workdir is not None:      # the next block's inputs first: the saved measurement refers to them
                workdir.save_x(layer + 1, x)
            if todo:
                save()
            if workdir is not None:
                workdir.commit(blocks_done=layer + 1)
            bar.update(layer + 2, f"block {layer}: {len(todo)} tensors")
            if stop_after_layer is not None and layer >= stop_after_layer:
                return meas
        if out in want and out not in meas.tensors:
            from twinquant.algorithms.gptq import accumulate_hessian

            h = rms_norm(x.to(model.dtype), model.get(roles.name(T.OUTPUT_NORM)), s.rms_eps).float()
            H, _ = accumulate_hessian(None, 0, h.reshape(-1, s.hidden))
            if sample_rows is not None:
                price_sampled(sampled([out], H), quantizer)
            else:
                price(out, s.n_layers, [(x if xh is None else xh)[i: i + 1] for i in range(kw.shape[0])], H,
                      quantizer)
        bar.update(s.n_layers + 2, out)
    missing = want - set(meas.tensors)
    if missing:
        raise TwinquantError(f"measure: no measurement for {', '.join(sorted(missing)[:3])}")
    meas.complete = True
    save()
    return meas


def _files(identity) -> str:
    """A source identity (`pipeline.workdir.source_identity`) in a few words: file names, sizes, end hashes."""
    if not isinstance(identity, dict):
        return repr(identity)
    return ", ".join(f"{n} {v.get('size')} bytes, ends {str(v.get('ends_sha256'))[:12]}" if isinstance(v, dict)
                     else n for n, v in identity.items())
