"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) rounding into any codec's format.

GPTQ quantizes the columns of W [rows, cols] one at a time and spreads each column's rounding error over the
columns not yet quantized, along the inverse Hessian of the layer's output error `H = 2 XᵀX / n`, so that
`‖XWᵀ − XŴᵀ‖²` (not ‖W − Ŵ‖²) is what gets small. The codec's parameters of a block are fitted when the sweep
reaches the block's first column, on the weights as the error updates have left them: GPTQ rounds *into the
codec's format* (GGML K-quants included) with parameters chosen along the way.

Here, as in the paper: damping `damp * mean(diag H)`; dead columns (`H_ii == 0`: an input that is always 0) get
`H_ii = 1` and weight 0; one Cholesky factorisation of H replaces repeated inverse updates (float32, as in the
reference; float64 only as a fallback); updates are lazy, applied to the columns beyond a batch of `block_size` columns once per batch.

Act-order (columns by descending `H_ii`, the most sensitive first) needs the parameters of every block before
the sweep reaches it out of order: with `static_groups=True` they are fitted up front on the original W, in the
original column order, and each column uses its own block's. `act_order=True, static_groups=False` raises a
TwinquantError when the format has more than one block per row (formats with contiguous blocks cannot take
GPTQ's permuted groups); with one block per row (per-channel grids) the two are the same and it is allowed.

Devices: everything runs where W is (H is moved there), the factorisation too; an n×n float32 matrix is 4·n²
bytes (3.1 GB for n = 27648). On a CPU the factorisation holds two more than H (the damped, flipped copy the
factor is written over and turned in place, and the LAPACK call's own column-major copy): 2.03 n×n matrices above
the inputs against 3.03 before (`benchmarks/results/gptq_memory_cpu-n16384.md`).

Each column is rounded to the nearest code of the stored grid (`nearest_codes`). With a diagonal Hessian nothing
propagates and the result is the codec's RTN with the same parameters; the one exception is llama.cpp's legacy
Q8_0/Q4_0/Q5_0, whose RTN rounds with the fp32 inverse scale before the scale is stored as fp16, so a few codes
(~0.1-1%) differ from it by one step, always to the grid point nearer the weight.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from twinquant.errors import TwinquantError, all_finite
from twinquant.formats.codec import BlockParams
from twinquant.formats.intgrid import nearest_codes
from twinquant.algorithms.rtn import DEFAULT_CLIP_GRID, bind, dequantize, fit_block, has_clip_hook
from twinquant.algorithms.fit_graphs import FitGraphs, graphs_enabled
from twinquant.algorithms.gptq_sweep import fused_sweep, sweep


@dataclass
class GPTQResult:
    codes: torch.Tensor              # [rows, cols] in the original column order, the dtype of codec.codes
    params: list[BlockParams]        # one per codec block, in column order: ready for codec.pack
    dequantized: torch.Tensor        # float32 [rows, cols]
    loss: float                      # ½·Σ err²/[H⁻¹]_ii over columns = ½·tr(ΔW H ΔWᵀ) for the damped H


def accumulate_hessian(H: torch.Tensor | None, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add a batch x [..., in] (flattened to [tokens, in]) to the running `H = 2 XᵀX / n`: returns (H, n).

    Pass (None, 0) first. A running mean keeps H's scale independent of the token count (and of float32 range).
    H lives on the device of the first batch; later batches are moved to it. H is updated in place.
    """
    acc = HessianSum(H, n)
    acc.add(x)
    return acc.H, acc.n


def _triangle_edges(n: int) -> list[int]:
    """Column edges of the blocks `HessianSum` computes: at most 8, none narrower than 512 (smaller products lose
    more speed than the skipped half saves)."""
    b = min(8, max(1, n // 512))
    return [round(i * n / b) for i in range(b + 1)]


class HessianSum:
    """The running `H = 2 XᵀX / n` of `accumulate_hessian`, over batches added one at a time (`add`), for a
    calibration pass. XᵀX is symmetric: each batch updates only the blocks on and above the diagonal, in place
    (one product per row of blocks; 36 of 64 blocks for an 8960-wide input, 0.57x the time of the whole product
    on this project's 2-core CPU, and no temporaries), and `H` mirrors the upper triangle into the lower one when
    read (exactly symmetric).

    Batches of fewer than `min_rows` rows wait and go in together (one 512-token window at a time read and wrote
    the whole H 35 times per block for Qwen2.5-1.5B's calibration: 4 windows at once cut that and the time of an
    8960-wide H by ~20% on the 2-core CPU); `H` adds what waits first.

    `HessianSum(H, n)` continues a full running H (as `accumulate_hessian` returns it)."""

    def __init__(self, H: torch.Tensor | None = None, n: int = 0, min_rows: int = 2048):
        self._H, self._n, self.min_rows = H, n, min_rows
        self._edges = _triangle_edges(H.shape[0]) if H is not None else None
        self._mirrored = True
        self._waiting: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t, cols = x.shape
        if self._H is None:
            self._H = torch.zeros(cols, cols, device=x.device)
            self._edges = _triangle_edges(cols)
        elif self._H.shape != (cols, cols):
            raise TwinquantError(f"hessian: H is {tuple(self._H.shape)} but inputs have {cols} features")
        if t == 0:
            return
        self._waiting.append(x.to(self._H.device))
        if sum(w.shape[0] for w in self._waiting) >= self.min_rows:
            self._flush()

    @property
    def n(self) -> int:
        """Rows (tokens) added so far."""
        return self._n + sum(w.shape[0] for w in self._waiting)

    def _flush(self) -> None:
        if not self._waiting:
            return
        x = self._waiting[0] if len(self._waiting) == 1 else torch.cat(self._waiting)
        self._waiting = []
        t = x.shape[0]
        total = self._n + t
        e = self._edges
        for i in range(len(e) - 1):
            a, z = e[i], e[i + 1]
            self._H[a:z, a:].addmm_(x[:, a:z].T, x[:, a:], beta=self._n / total, alpha=2.0 / total)
        self._n = total
        self._mirrored = False

    @property
    def H(self) -> torch.Tensor | None:
        """The whole symmetric H (None before any batch)."""
        self._flush()
        if not self._mirrored:
            e, H = self._edges, self._H
            for i in range(len(e) - 1):
                a, z = e[i], e[i + 1]
                H[a:z, :a] = H[:a, a:z].T
                d = H[a:z, a:z]         # (a diagonal block is computed whole: rounding makes it nearly symmetric)
                d.copy_(torch.triu(d) + torch.triu(d, 1).T)
            self._mirrored = True
        return self._H


def _rotate_half_turn_(X: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """X[i, j] <- X[n-1-i, n-1-j] in place (X.flip(0, 1) without a second n×n matrix: a block of rows at a time)."""
    n = X.shape[0]
    h = n // 2
    for a in range(0, h, rows):
        b = min(a + rows, h)
        top = X[a:b].clone()
        X[a:b] = X[n - b:n - a].flip(0, 1)
        X[n - b:n - a] = top.flip(0, 1)
    if n % 2:
        X[h] = X[h].flip(0)
    return X


def _cholesky_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper R with R·Rᵀ = H + λI, λ = damp·mean(diag H), as float32 on H's device.

    Factorised in float32, as the GPTQ reference does: a quarter of float64's time on a CPU, half its memory
    (n = 27648: 3 GB a copy), and the only choice on GPUs without fast float64 (mps has none). The damped H is
    well conditioned (λ bounds the smallest eigenvalue); a failure (not positive definite, or a non-finite
    factor) is retried in float64 (on the CPU where the device has no float64), then with tenfold damping, with a
    warning.
    """
    mean = torch.diagonal(H).double().mean().item()
    if not (mean > 0 and all_finite(H)):
        raise TwinquantError("gptq: the Hessian has a non-positive or non-finite diagonal (not 2·XᵀX/n?)")
    dev = H.device
    lam = damp
    for _ in range(10):
        for dtype in (torch.float32, torch.float64):
            # with J the order reversal, J·H·J = L·Lᵀ gives H = R·Rᵀ with R = J·L·J upper (the damping adds to a
            # diagonal the reversal keeps a diagonal: one copy of H, flipped, is all it takes)
            A = H.flip(0, 1).to("cpu" if dev.type == "mps" and dtype == torch.float64 else dev, dtype)
            A.diagonal().add_(lam * mean)
            if A.device.type == "cpu":      # the factor written over A: one n×n buffer fewer where memory is short
                L, info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32)))
            else:
                L, info = torch.linalg.cholesky_ex(A)
            del A
            if info.item() == 0 and all_finite(L):
                return _rotate_half_turn_(L).to(dev, torch.float32)
        more = lam * 10 if lam > 0 else 1e-6
        warnings.warn(f"gptq: Hessian not positive definite with damping {lam:g}; retrying with {more:g}", stacklevel=3)
        lam = more
    raise TwinquantError("gptq: the Hessian is not positive definite even with heavy damping")


_FACTORS: dict | None = None     # (damp, device, act_order) -> (H, (M, rdiag)); on inside reuse_factors()


@contextmanager
def reuse_factors():
    """Within this block a Hessian (the same, unmodified tensor) is factorised once for every quantization that
    uses it: measure quantizes one tensor into a dozen candidate types with one H, and the factorisation of a
    8960-wide H costs seconds each time on a CPU. H must not change inside the block (inference tensors have no
    version counter to tell). The factors are dropped when the block ends."""
    global _FACTORS
    outer, _FACTORS = _FACTORS, {}
    try:
        yield
    finally:
        _FACTORS = outer


def unit_factor(H_source: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool = False):
    """(M, rdiag) with H + λI = R·Rᵀ, rdiag = diag(R), M = R·diag(R)⁻¹ (unit upper), for H prepared from
    `H_source` (dead columns, act-order permutation); reused inside `reuse_factors()`. M is shared: read only."""
    key = (float(damp), str(H.device), act_order)
    hit = _FACTORS.get(key) if _FACTORS is not None else None
    if hit is not None and hit[0] is H_source:          # the very tensor (held here, so its id is not reused)
        return hit[1]
    R = _cholesky_factor(H, damp)
    rdiag = torch.diagonal(R).clone()
    out = (R.div_(rdiag), rdiag)                         # M[k, c] = R[k, c] / R[c, c]
    if _FACTORS is not None:
        _FACTORS.clear()                                 # one H at a time: measure prices tensor by tensor
        _FACTORS[key] = (H_source, out)
    return out


def prepare_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 copy of W and H (read only) on W's device with dead columns (H_ii == 0: an input that is always 0)
    given H_ii = 1 and weight 0, and the mask of those columns. H is copied only where it must change (dead
    columns, another device or dtype): at n = 27648 a copy is 3.1 GB."""
    W = W.float().clone()
    dead = (torch.diagonal(H) == 0).to(W.device)
    if bool(dead.any()):
        H = H.to(W.device, torch.float32, copy=True)
        H[dead, dead] = 1.0
    else:
        H = H.to(W.device, torch.float32)
    W[:, dead] = 0.0
    return W, H, dead


def gptq(W: torch.Tensor, H: torch.Tensor, codec, block_size: int = 128, damp: float = 0.01, act_order: bool = False,
         static_groups: bool = False, importance: torch.Tensor | None = None, clip_search: bool = False,
         grid=DEFAULT_CLIP_GRID) -> GPTQResult:
    """Quantize W [rows, cols] into `codec` minimising the output error under H [cols, cols] (see module doc).

    `importance` ([cols]) goes to the codec's `fit` (llama.cpp's imatrix for GGML formats); `clip_search` fits each
    block with RTN's clip search (codecs with a clip hook) instead of the plain `fit`.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise TwinquantError(f"gptq: W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    if block_size < 1 or damp < 0:
        raise TwinquantError("gptq: block_size must be >= 1 and damp >= 0")
    rows, cols = W.shape
    codec = bind(codec, cols)
    nb, B, sub = cols // codec.block, codec.block, codec.sub
    if act_order and not static_groups and nb > 1:
        raise TwinquantError(f"gptq: act_order with {codec.name} ({nb} blocks per row) needs static_groups=True")
    if importance is not None and importance.numel() != cols:
        raise TwinquantError(f"gptq: importance has {importance.numel()} entries for {cols} columns")
    imp = None if importance is None else importance.to(W.device, torch.float32).reshape(cols)

    dev = W.device
    H_source = H
    W, H, dead = prepare_inputs(W, H)

    graphs = FitGraphs() if graphs_enabled(dev, codec) else None

    def fit(w_block, j):                                 # parameters of block j fitted on w_block [rows, B]
        ib = None if imp is None else imp[j * B:(j + 1) * B]
        return fit_params(codec, w_block, ib, clip_search, grid, graphs)

    params: list[BlockParams | None] = [None] * nb
    # The sweep works on transposed copies ([cols, rows]: a column is a contiguous row). St/Ot hold each column's
    # effective scale/offset in the processing order, filled when its block's parameters are known.
    St = torch.zeros(cols, rows, device=dev)
    Ot = torch.zeros(cols, rows, device=dev)
    static = static_groups or act_order
    if static:
        for j in range(nb):
            params[j] = fit(W[:, j * B:(j + 1) * B], j)
            St[j * B:(j + 1) * B] = params[j].scale.repeat_interleave(sub, 1).T
            Ot[j * B:(j + 1) * B] = params[j].offset.repeat_interleave(sub, 1).T

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H, St, Ot = W[:, perm], H[perm][:, perm], St[perm], Ot[perm]

    # H + λI = R·Rᵀ, R upper. With Δ = W − Q, GPTQ's sequence of updates gives the columns it rounds as
    # W̃_c = W_c + Σ_{k<c} Δ_k·R_kc / R_cc (the LDLQ form of Chee et al. 2023), so the factor is all it needs:
    # no inverse of H (one n³/3 factorisation instead of three), and the loss is ½‖Δ·R‖² = ½·tr(ΔW H ΔWᵀ).
    M, rdiag = unit_factor(H_source, H, damp, act_order)
    del H
    Sd = St.masked_fill(St == 0, float("inf"))           # division scales: a zero-scale block rounds to code 0
    Wt0 = W.T.contiguous()                               # the original columns: Δ is measured against them
    del W
    Wt = Wt0.clone()                                     # the columns with every update so far
    Qt = torch.zeros(cols, rows, device=dev, dtype=torch.uint8 if codec.qmax <= 255 else torch.float32)
    losses = torch.zeros(cols, device=dev)
    fused = fused_sweep(Wt, block_size)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()                           # this batch, updated column by column
        D1 = torch.zeros(i2 - i1, rows, device=dev)      # Δ of the batch's columns, for the updates beyond them
        R1 = torch.empty(i2 - i1, rows, device=dev)      # rounding residuals of the batch (its loss)
        i = 0
        while i < i2 - i1:
            c = i1 + i
            if not static and c % B == 0:
                # a new codec block: fit it on the weights with every update so far; the part of the block
                # beyond this batch has not had this batch's updates yet, so apply them to a copy
                e = min(c + B, cols)
                wb = W1[i:min(e, i2) - i1]
                if e > i2:
                    wb = torch.cat([wb, Wt[i2:e] + M[i1:c, i2:e].T @ D1[:i]], 0)
                j = c // B
                params[j] = fit(wb.T.contiguous(), j)
                St[c:e] = params[j].scale.repeat_interleave(sub, 1).T
                Ot[c:e] = params[j].offset.repeat_interleave(sub, 1).T
                Sd[c:e] = St[c:e].masked_fill(St[c:e] == 0, float("inf"))
            # the columns up to the next block to fit (or the batch's end) need no new parameters: one sweep
            end = i2 - i1 if static else min(i2, (c // B + 1) * B) - i1
            sweep(W1[None], Wt0[None, i1:i2], M[None, i1:i2, i1:i2], St[None, i1:i2], Ot[None, i1:i2],
                  Sd[None, i1:i2], Qt[None, i1:i2], R1[None], D1[None], i, end, codec.qmax, fused)
            i = end
        Wt[i2:].addmm_(M[i1:i2, i2:].T, D1)              # the lazy update of everything after the batch
        losses[i1:i2] = R1.square().sum(1) * rdiag[i1:i2].square() / 2

    Q = Qt.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    dtype = codec.codes(torch.zeros(rows, B, device=dev), params[0]).dtype       # the codec's own code dtype
    codes = Q.to(dtype)
    return GPTQResult(codes, params, dequantize(codes, params, codec), losses.double().sum().item())


def fit_params(codec, w: torch.Tensor, importance: torch.Tensor | None, clip_search: bool, grid,
               graphs: FitGraphs | None = None) -> BlockParams:
    """A block's parameters as GPTQ fits them: `fit_block`, or on a GPU the codec's fit replayed from a captured
    graph (`fit_graphs`: the same bits, without thousands of launches a fit)."""
    if graphs is not None and not (clip_search and has_clip_hook(codec)):
        return graphs.fit(codec, w, importance)
    return fit_block(codec, w, importance, clip_search, grid)


def _rows(p: BlockParams, sl: slice) -> BlockParams:
    """The parameters of some rows of a block (every stored field is per row)."""
    return p.map_tensors(lambda t: t[sl])


def gptq_many(W: torch.Tensor, H: torch.Tensor, codec, block_size: int = 128, damp: float = 0.01,
              importance: torch.Tensor | None = None, clip_search: bool = False,
              grid=DEFAULT_CLIP_GRID, fit_together: bool | None = None) -> list[GPTQResult]:
    """`gptq` of several matrices at once, each with its own Hessian: W [n, rows, cols], H [n, cols, cols],
    importance [n, cols] (a MoE layer's experts). The same sweep, batched: one launch per column for all n
    matrices instead of n (on a GPU the per-column loop, not the arithmetic, is GPTQ's cost; 128 experts of
    768 x 2048 took 120 s one by one on an H200). No act-order / static groups (the executor uses neither).
    `fit_together`: fit a block of every matrix in one call (default: on a GPU)."""
    if W.dim() != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise TwinquantError(f"gptq_many: W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    n, rows, cols = W.shape
    codec = bind(codec, cols)
    nb, B, sub = cols // codec.block, codec.block, codec.sub
    dev = W.device
    imp = None if importance is None else importance.to(dev, torch.float32).reshape(n, cols)
    Ws, Ms, rdiags = [], [], []
    for e in range(n):                                   # dead columns and the factor, matrix by matrix
        We, He, _ = prepare_inputs(W[e], H[e])
        M, rdiag = unit_factor(H[e], He, damp)
        Ws.append(We)
        Ms.append(M)
        rdiags.append(rdiag)
        del He
    M = torch.stack(Ms)
    rdiag = torch.stack(rdiags)
    del Ms
    params: list[list[BlockParams | None]] = [[None] * nb for _ in range(n)]
    # GGML formats fit rows independently: on a GPU all matrices' blocks are fitted in one call (the fits, not the
    # sweep, were most of a Q2_K expert's time); on a CPU each goes to libggml's faster fit (`fit_block`)
    can = not has_clip_hook(codec) and hasattr(codec, "ggml_type")
    together = can and (dev.type != "cpu" if fit_together is None else fit_together)
    St = torch.zeros(n, cols, rows, device=dev)
    Ot = torch.zeros(n, cols, rows, device=dev)
    Sd = torch.zeros(n, cols, rows, device=dev)
    Wt0 = torch.stack([w.T for w in Ws]).contiguous()    # [n, cols, rows]
    del Ws
    Wt = Wt0.clone()
    Qt = torch.zeros(n, cols, rows, device=dev, dtype=torch.uint8 if codec.qmax <= 255 else torch.float32)
    losses = torch.zeros(n, cols, device=dev)
    fused = fused_sweep(Wt, block_size)
    graphs = FitGraphs() if graphs_enabled(dev, codec) else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[:, i1:i2].clone()
        D1 = torch.zeros(n, i2 - i1, rows, device=dev)
        R1 = torch.empty(n, i2 - i1, rows, device=dev)
        i = 0
        while i < i2 - i1:
            c = i1 + i
            if c % B == 0:                               # a new codec block: fitted matrix by matrix, as in gptq
                e2 = min(c + B, cols)
                wb = W1[:, i:min(e2, i2) - i1]
                if e2 > i2:
                    wb = torch.cat([wb, Wt[:, i2:e2] + M[:, i1:c, i2:e2].transpose(1, 2) @ D1[:, :i]], 1)
                j = c // B
                if together:    # one fit over every matrix's rows, each row with its own matrix's importance
                    ib = None if imp is None else imp[:, None, j * B:(j + 1) * B].expand(n, rows, B).reshape(-1, B)
                    p = fit_params(codec, wb.transpose(1, 2).reshape(n * rows, -1), ib, False, grid, graphs)
                    for e in range(n):
                        params[e][j] = _rows(p, slice(e * rows, (e + 1) * rows))
                    St[:, c:e2] = p.scale.view(n, rows, -1).repeat_interleave(sub, 2).transpose(1, 2)
                    Ot[:, c:e2] = p.offset.view(n, rows, -1).repeat_interleave(sub, 2).transpose(1, 2)
                else:
                    for e in range(n):
                        ib = None if imp is None else imp[e, j * B:(j + 1) * B]
                        p = params[e][j] = fit_params(codec, wb[e].T.contiguous(), ib, clip_search, grid, graphs)
                        St[e, c:e2] = p.scale.repeat_interleave(sub, 1).T
                        Ot[e, c:e2] = p.offset.repeat_interleave(sub, 1).T
                Sd[:, c:e2] = St[:, c:e2].masked_fill(St[:, c:e2] == 0, float("inf"))
            end = min(i2, (c // B + 1) * B) - i1
            sweep(W1, Wt0[:, i1:i2], M[:, i1:i2, i1:i2], St[:, i1:i2], Ot[:, i1:i2], Sd[:, i1:i2], Qt[:, i1:i2],
                  R1, D1, i, end, codec.qmax, fused)
            i = end
        Wt[:, i2:].baddbmm_(M[:, i1:i2, i2:].transpose(1, 2), D1)
        losses[:, i1:i2] = R1.square().sum(2) * rdiag[:, i1:i2].square() / 2
    dtype = codec.codes(torch.zeros(rows, B, device=dev), params[0][0]).dtype
    out = []
    for e in range(n):
        codes = Qt[e].T.to(dtype)
        out.append(GPTQResult(codes, params[e], dequantize(codes, params[e], codec), losses[e].double().sum().item()))
    return out
