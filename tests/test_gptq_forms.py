"""GPTQ's factor-only (LDLQ) form and the block LDLQ of the i-quants against float64 textbook references.

`gptq` no longer inverts H: it uses the Cholesky factor of H itself (W̃_c = W_c + Σ Δ_k·R_kc/R_cc). The textbook
algorithm (Frantar et al.: U = chol(H⁻¹) upper, err = (w − q)/U_cc, W[:, c+1:] −= err·U_c,c+1:) must give the
same codes. `gptq_blocks` quantizes a group of columns at a time: each group's target must be the closed form
W_G + Δ_{<G}·H_{<G,≥G}·H_{≥G,≥G}⁻¹ (the optimal update of every later column given the errors so far).
"""

import gguf
import numpy as np
import pytest
import torch

from twinquant.algorithms.gptq import gptq
from twinquant.algorithms.gptq_blocks import gptq_blocks
from twinquant.formats.ggml import get_codec
from twinquant.formats.ggml._blockwise import BlockwiseCodec
from twinquant.formats.intgrid import IntGrid, nearest_codes


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hessian(cols, seed, tokens=2048):
    mix = torch.randn(cols, cols, generator=_gen(seed)) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=_gen(seed + 1)) @ mix
    return 2 * x.T @ x / tokens


def _damped(H, damp=0.01):
    H = H.double()
    return H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)


def test_factor_form_equals_textbook_gptq():
    c = IntGrid(3, 32, False)
    w = torch.randn(64, 256, generator=_gen(0))
    H = _hessian(256, 1)
    r = gptq(w, H, c, static_groups=True, block_size=64)

    # the textbook sweep in float64 with the same (static) parameters
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(_damped(H))), upper=True)
    W = w.double().clone()
    codes = torch.empty(64, 256, dtype=torch.long)
    for j, p in enumerate(r.params):
        s = p.scale.double().repeat_interleave(c.sub, 1)
        o = p.offset.double().repeat_interleave(c.sub, 1)
        for i in range(32):
            col = j * 32 + i
            q = torch.clamp(torch.round((W[:, col] - o[:, i]) / s[:, i]), 0, c.qmax)
            codes[:, col] = q.long()
            err = (W[:, col] - (s[:, i] * q + o[:, i])) / U[col, col]
            W[:, col + 1:] -= err[:, None] * U[col, col + 1:][None]
    agree = (codes == r.codes.long()).float().mean().item()
    assert agree > 0.995, agree          # float32 vs float64: a few roundings at exact midpoints may flip


class _Q4_1Blockwise(BlockwiseCodec):
    """Q4_1 driven through the block-at-a-time interface (a 32-column group with llama.cpp's own search)."""

    name = "Q4_1"
    ggml_type = gguf.GGMLQuantizationType.Q4_1

    def _quantize_blocks(self, x, qw):
        codec = get_codec("Q4_1")
        if qw is None or bool((qw == qw[0]).all()):
            imp = None if qw is None else qw[0]
            return codec.pack(*codec.quantize(x, imp)).reshape(x.shape[0], self.type_size)
        return np.concatenate([codec.pack(*codec.quantize(x[i:i + 1], qw[i])) for i in range(x.shape[0])])


def test_block_ldlq_targets_are_the_closed_form_update():
    codec = _Q4_1Blockwise()
    rows, cols, G = 24, 192, 32
    w = torch.randn(rows, cols, generator=_gen(2))
    H = _hessian(cols, 3)
    r = gptq_blocks(w, H, codec, damp=0.01, importance=torch.ones(cols))

    Hd = _damped(H)
    W = w.double()
    Q = torch.from_numpy(gguf.quants.dequantize(r.data, gguf.GGMLQuantizationType.Q4_1)).double()
    for a in range(0, cols, G):
        delta = W[:, :a] - Q[:, :a]
        target = W[:, a:] + delta @ Hd[:a, a:] @ torch.linalg.inv(Hd[a:, a:]) if a else W[:, a:]
        ref = codec.quantize_blocks(target[:, :G].float(), torch.ones(rows, G))
        same = (ref == r.data[:, a // G * codec.type_size:(a // G + 1) * codec.type_size]).all(1)
        assert same.mean() > 0.95, (a, same.mean())
    assert torch.equal(r.dequantized, Q.float())
    dw = (w - r.dequantized).double()
    assert r.loss == pytest.approx(0.5 * ((dw @ Hd) * dw).sum().item(), rel=1e-4)


def test_block_ldlq_with_a_diagonal_hessian_is_rtn_and_beats_it_otherwise():
    codec = _Q4_1Blockwise()
    w = torch.randn(8, 256, generator=_gen(4))
    d = torch.rand(256, generator=_gen(5)) + 0.5
    r = gptq_blocks(w, torch.diag(d), codec, damp=0.0)
    assert np.array_equal(r.data, codec.quantize_bytes(w, d))       # nothing to feed forward; diag H weighs

    H = _hessian(256, 6)
    g = gptq_blocks(w, H, codec)
    rtn = codec.dequantize_bytes(codec.quantize_bytes(w, torch.diagonal(H)), 256)
    err = lambda wh: (((w - wh).double() @ H.double()) * (w - wh).double()).sum().item()
    assert err(g.dequantized) < 0.8 * err(rtn)


def test_reuse_factors_factorises_one_hessian_once_and_changes_no_byte(monkeypatch):
    # measure quantizes a tensor into a dozen types with one H: inside reuse_factors() H is factorised once, and
    # every result equals the one without reuse (the shared factor is read only)
    import twinquant.algorithms.gptq as g

    calls = []
    real = g._cholesky_factor
    monkeypatch.setattr(g, "_cholesky_factor", lambda H, damp: calls.append(damp) or real(H, damp))
    w = torch.randn(16, 256, generator=_gen(7))
    H, H2 = _hessian(256, 8), _hessian(256, 9)
    q4k, blockwise = get_codec("Q4_K"), _Q4_1Blockwise()
    alone = [gptq(w, H, q4k, damp=0.5).dequantized, gptq_blocks(w, H, blockwise, damp=0.5).dequantized,
             gptq(w, H2, q4k, damp=0.5).dequantized]
    assert len(calls) == 3
    calls.clear()
    with g.reuse_factors():
        again = [gptq(w, H, q4k, damp=0.5).dequantized, gptq_blocks(w, H, blockwise, damp=0.5).dequantized,
                 gptq(w, H, q4k, damp=0.5).dequantized]
        assert len(calls) == 1                                      # one factorisation for three quantizations
        other = gptq(w, H2, q4k, damp=0.5).dequantized               # another H (or damping) is factorised anew
        gptq(w, H2, q4k, damp=0.1)
        assert len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(alone[:2] + alone[:1], again)) and torch.equal(other, alone[2])
    gptq(w, H, q4k, damp=0.5)
    assert len(calls) == 4                                          # nothing is kept after the block


@pytest.mark.parametrize("together", [False, True])
@pytest.mark.parametrize("fmt", ["Q2_K", "Q4_K", "Q4_0", "Q8_0"])
def test_batched_sweep_of_experts_gives_each_experts_own_gptq(fmt, together):
    """`gptq_many` (a MoE layer's experts swept together, one Hessian each) gives every matrix exactly the codes,
    parameters and loss `gptq` gives it alone, dead input columns included."""
    from twinquant.algorithms.gptq import gptq_many

    torch.manual_seed(1)
    n, rows, cols = 3, 32, 512
    W = torch.randn(n, rows, cols)
    xs = [torch.randn(300, cols) * torch.rand(cols) * (e + 1) for e in range(n)]
    xs[1][:, 7] = 0                                       # an input expert 1 never sees
    H = torch.stack([2 * x.T @ x / 300 for x in xs])
    imp = torch.stack([h.diagonal() for h in H])
    codec = get_codec(fmt)
    many = gptq_many(W, H, codec, damp=0.5, importance=imp, clip_search=True, fit_together=together)
    for e in range(n):
        one = gptq(W[e], H[e], codec, damp=0.5, importance=imp[e].clone(), clip_search=True)
        assert torch.equal(many[e].codes, one.codes), e
        assert np.array_equal(codec.pack(many[e].codes, many[e].params), codec.pack(one.codes, one.params))
        assert many[e].loss == pytest.approx(one.loss, rel=1e-5)
    assert not torch.equal(many[0].codes, gptq(W[0], H[2], codec, damp=0.5, importance=imp[2].clone(),
                                                clip_search=True).codes)     # each its own Hessian


def test_expert_batches_grow_with_free_gpu_memory(monkeypatch):
    """On a GPU the experts' sweep is launch-bound, so a batch takes a quarter of the free memory (4 to 32 GiB);
    on the CPU the fixed 4 GiB."""
    from twinquant.algorithms import backends

    assert backends.expert_batch_bytes("cpu") == backends.EXPERT_BATCH_BYTES
    for free, want in ((8 << 30, 4 << 30), (64 << 30, 16 << 30), (512 << 30, 32 << 30)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 2 * f))
        assert backends.expert_batch_bytes("cuda") == want


@pytest.mark.parametrize("n,rows", [(7, 2), (8, 3), (9, 512), (300, 64)])
def test_half_turn_in_place_is_flip_of_both_axes(n, rows):
    from twinquant.algorithms.gptq import _rotate_half_turn_

    X = torch.randn(n, n, generator=_gen(n))
    want = X.flip(0, 1)
    ptr = X.data_ptr()
    assert torch.equal(_rotate_half_turn_(X, rows=rows), want) and X.data_ptr() == ptr


def test_factor_in_place_equals_the_flipped_factor_and_h_is_copied_only_to_change_it():
    # the memory-lean factorisation (no prepared copy of H without dead columns; the factor written over the damped
    # copy and turned in place) gives the bits of the textbook flip / factor / flip, and never writes the caller's H
    from twinquant.algorithms.gptq import _cholesky_factor, prepare_inputs

    H = _hessian(384, 11)
    mean = torch.diagonal(H).double().mean().item()
    A = H.flip(0, 1).clone()
    A.diagonal().add_(0.01 * mean)
    want = torch.linalg.cholesky_ex(A)[0].flip(0, 1)
    assert torch.equal(_cholesky_factor(H, 0.01), want)
    W = torch.randn(4, 384, generator=_gen(12))
    _, Hp, dead = prepare_inputs(W, H)
    assert not dead.any() and Hp.data_ptr() == H.data_ptr()           # nothing to change: no 3 GB copy at 27648
    H2 = H.clone()
    H2[5, :] = H2[:, 5] = 0.0
    before = H2.clone()
    Wp, Hp, dead = prepare_inputs(W, H2)
    assert dead.tolist() == [i == 5 for i in range(384)] and Hp[5, 5] == 1.0 and (Wp[:, 5] == 0).all()
    assert torch.equal(H2, before)                                      # the caller's H is left as it was
