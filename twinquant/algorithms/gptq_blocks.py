"""Error feedback into formats that are decided a whole block at a time (llama.cpp's i-quants): block LDLQ.

Column-by-column GPTQ needs a code per weight on a grid known before the column is reached; the i-quants choose
8-weight lattice vectors, signs and scales jointly for a block of 32–256 weights (`BlockwiseCodec`). So the
sweep here goes a codec block (a group G of `codec.block` columns) at a time: G is quantized by the codec's own
search (llama.cpp's algorithm, the imatrix or diag H as its weights) after the error of every earlier group has
been fed into it, and its error is fed forward to every later group — QuIP#'s block LDLQ.

With H + λI = R·Rᵀ (R upper, `gptq._cholesky_factor`) and M = R·diag(R)⁻¹ (unit upper), the columnwise updates of
GPTQ are W̃_c = W_c + Σ_{k<c} Δ_k·M_kc with Δ = W − Q. For groups, H = M_b·D_b·M_bᵀ with M_b block-unit upper,
and M_b = M·blockdiag(M_GG)⁻¹, so the group's target is W̃_G = W_G + (Δ_{<G}·M_{<G,G})·M_GG⁻¹: the lazily
accumulated columnwise update, then one unit-triangular solve per group. The loss ½·tr(ΔW (H+λI) ΔWᵀ) is
computed from the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.algorithms.gptq import prepare_inputs, unit_factor


@dataclass
class BlockGPTQResult:
    data: np.ndarray                 # uint8 [rows, codec.bytes_per_row(cols)]: the GGML bytes
    dequantized: torch.Tensor        # float32 [rows, cols]
    loss: float                      # ½·tr(ΔW (H+λI) ΔWᵀ)


def gptq_blocks(W: torch.Tensor, H: torch.Tensor, codec, damp: float = 0.01,
                importance: torch.Tensor | None = None) -> BlockGPTQResult:
    """Quantize W [rows, cols] into a BlockwiseCodec minimising the output error under H [cols, cols].

    `importance` ([cols], e.g. an imatrix) weighs the codec's search inside each block; by default diag(H)
    (proportional to llama.cpp's imatrix, the mean square of each input)."""
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise TwinquantError(f"gptq: W {tuple(W.shape)} and H {tuple(H.shape)} do not match")
    if damp < 0:
        raise TwinquantError("gptq: damp must be >= 0")
    rows, cols = W.shape
    codec.check_cols(cols)
    G = codec.block
    dev = W.device
    H_source = H
    W0, H, dead = prepare_inputs(W, H)
    if importance is not None:
        if importance.numel() != cols:
            raise TwinquantError(f"gptq: importance has {importance.numel()} entries for {cols} columns")
        qw = importance.to(dev, torch.float32).reshape(cols)
    else:
        qw = torch.diagonal(H).clone()
        qw[dead] = 0.0

    M, rdiag = unit_factor(H_source, H, damp)            # M[k, c] = R[k, c] / R[c, c], unit upper
    del H
    W0t = W0.T.contiguous()                              # [cols, rows]: a group of columns is a contiguous slice
    del W0
    Ut = torch.zeros(cols, rows, device=dev)             # Σ_{k<G} Δ_k·M_kc, accumulated group by group
    Dt = torch.empty(cols, rows, device=dev)             # Δ = W − Q, in the same layout
    Qt = torch.empty(cols, rows, device=dev)             # Q, the dequantized result
    data = np.empty((rows, cols // G, codec.type_size), np.uint8)
    for j, a in enumerate(range(0, cols, G)):
        b = a + G
        # W̃_G = W_G + U_G·M_GG⁻¹ (transposed: M_GGᵀ·X = U_Gᵀ, unit lower triangular)
        X = torch.linalg.solve_triangular(M[a:b, a:b].T, Ut[a:b], upper=False, unitriangular=True)
        target = (W0t[a:b] + X).T.contiguous()           # [rows, G]
        blk = codec.quantize_blocks(target, qw[a:b][None].expand(rows, G))
        data[:, j] = blk
        # dequantized where the sweep runs (iq_dequant): on a GPU the bytes go up, not the values down
        Qt[a:b] = codec.dequantize_blocks(torch.from_numpy(blk).to(dev)).T
        torch.sub(W0t[a:b], Qt[a:b], out=Dt[a:b])
        if b < cols:
            Ut[b:].addmm_(M[a:b, b:].T, Dt[a:b])
    del Ut
    # the loss ½·‖Δ·R‖² = ½·‖(Δ·M)·diag(r)‖², in column chunks of Δᵀ to bound the temporaries
    loss = 0.0
    for a in range(0, cols, 4096):
        P = M[:, a:a + 4096].T @ Dt                      # [chunk, rows] = (Δ·M)ᵀ for these columns
        loss += float((P.square_().sum(1) * rdiag[a:a + 4096].square()).sum()) / 2
    return BlockGPTQResult(data.reshape(rows, -1), Qt.T.contiguous(), loss)
