"""Norm fusion and the rotations R1–R4 on the model representation (QuaRot / SpinQuant placement).

Each function takes a `Model`, changes its weights in place (computing in float64) and returns it; the model
records what it carries (`model.history`, `model.input_transforms`, `model.qk_transform`) so exporters and the
runtime can reproduce it. Orientation: weights are [out, in], activations are row vectors, y = x·Wᵀ.

- fuse_norms: RMSNorm gains go into the linears they feed (W·diag(g)), gains become 1. A tied head must then be
  untied when the final norm's gain is not 1 (the embedding does not see that gain).
- R1 (residual, Q [h, h]): x → x·Q. Embedding E·Q, readers W·Q, writers Qᵀ·W. Needs fused norms (RMSNorm
  commutes with an orthogonal Q only when its gain is 1).
- R2 (per head, Q [hd, hd]): v → v·Q for every kv head (W_v ← Qᵀ·W_v per head, b_v ← b_v·Q), and W_o's column
  block of every q head ← W_o,j·Q.
- R4 (online, ffn_down input, Hadamard of the FFN width): W_down ← W_down·H, the forward computes z·H.
- R3 (online, q/k after RoPE, Hadamard of head_dim): q·kᵀ unchanged; it only matters for KV-cache quantization.
"""

from __future__ import annotations

import dataclasses

import torch

from twinquant.errors import TwinquantError
from twinquant.model import history, roles
from twinquant.model.model import Model
from twinquant.transforms.online import OnlineHadamard

T = roles.T


def _w(model: Model, name: str) -> torch.Tensor:
    return model.get(name).double()


def _readers(model: Model) -> list[str]:
    out = [n for i in range(model.spec.n_layers) for fed in roles.norm_feeds(model.spec, i).values() for n in fed]
    return out + [roles.name(T.OUTPUT)] if not model.spec.tied_embeddings else out


def _writers(model: Model) -> list[str]:
    return [n for i in range(model.spec.n_layers) for n in roles.residual_writers(model.spec, i)]


ROW_CHUNK = 8192    # rows of the embedding / head rotated at once (float64 for one chunk, not the whole matrix)


def rows_matmul(w: torch.Tensor, q: torch.Tensor, out_dtype: torch.dtype = torch.float64,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """(w·diag(scale))·q in float64, row chunk by row chunk, stored as `out_dtype`: the embedding and head of a
    large vocabulary never exist whole in float64. The eager and the lazy rotation both use it (same bits)."""
    out = torch.empty(w.shape[0], q.shape[1], dtype=out_dtype)
    for i in range(0, w.shape[0], ROW_CHUNK):
        c = w[i: i + ROW_CHUNK].double()
        if scale is not None:
            c = c * scale[None, :]
        out[i: i + ROW_CHUNK] = (c @ q).to(out_dtype)
    return out


def untie_head(model: Model) -> Model:
    """Give the model its own output.weight (a copy of the embedding)."""
    if model.spec.tied_embeddings:
        emb = model.get(roles.name(T.TOKEN_EMBD))
        model.spec = dataclasses.replace(model.spec, tied_embeddings=False)
        model.tensors[roles.name(T.OUTPUT)] = emb.clone()
    return model


def fuse_norms(model: Model) -> Model:
    if history.has(model.history, history.FuseNorms):
        return model
    s = model.spec
    for i in range(s.n_layers):
        for norm, fed in roles.norm_feeds(s, i).items():
            g = _w(model, roles.name(norm, i))
            for n in fed:
                model.set(n, _w(model, n) * g)          # [.., out, in] · diag(g): experts' stacks too
            model.set(roles.name(norm, i), torch.ones_like(g))
    g = _w(model, roles.name(T.OUTPUT_NORM))
    if s.tied_embeddings and not torch.all(g == 1):
        untie_head(model)
    if not model.spec.tied_embeddings:
        n = roles.name(T.OUTPUT)
        model.set(n, _w(model, n) * g[None, :])
        model.set(roles.name(T.OUTPUT_NORM), torch.ones_like(g))
    model.history.append(history.FuseNorms())
    return model


def rotate_residual(model: Model, q: torch.Tensor, record: history.Rotation) -> Model:
    """R1 with an orthogonal q [hidden, hidden] (float64)."""
    if not history.has(model.history, history.FuseNorms):
        raise TwinquantError("R1 needs fused norms first (fuse_norms)")
    q = q.double()
    if q.shape != (model.spec.hidden, model.spec.hidden):
        raise TwinquantError(f"R1 matrix is {tuple(q.shape)}, the residual width is {model.spec.hidden}")
    emb, out = roles.name(T.TOKEN_EMBD), roles.name(T.OUTPUT)
    model.set(emb, rows_matmul(model.get(emb), q, model.dtype))
    for n in _readers(model):
        model.set(n, rows_matmul(model.get(n), q, model.dtype) if n == out else _w(model, n) @ q)
    for n in _writers(model):
        model.set(n, q.T @ _w(model, n))
    model.history.append(record)
    return model


def rotate_heads(model: Model, q: torch.Tensor, record: history.Rotation) -> Model:
    """R2 with an orthogonal q [head_dim, head_dim], the same for every head."""
    s = model.spec
    q = q.double()
    if q.shape != (s.head_dim, s.head_dim):
        raise TwinquantError(f"R2 matrix is {tuple(q.shape)}, head_dim is {s.head_dim}")
    for i in range(s.n_layers):
        v = roles.name(T.ATTN_V, i)
        wv = _w(model, v).view(s.n_kv_heads, s.head_dim, s.hidden)
        model.set(v, torch.einsum("dc,kdh->kch", q, wv).reshape(s.kv_dim, s.hidden))
        if s.qkv_bias:
            b = roles.name(T.ATTN_V, i, "bias")
            model.set(b, (_w(model, b).view(s.n_kv_heads, s.head_dim) @ q).reshape(-1))
        o = roles.name(T.ATTN_OUT, i)
        wo = _w(model, o).view(s.hidden, s.n_heads, s.head_dim)
        model.set(o, (wo @ q).reshape(s.hidden, s.q_dim))
    model.history.append(record)
    return model


def add_online_ffn_down(model: Model, seed: int | None = None) -> Model:
    """R4: pre-multiply every ffn_down by the (randomized) Hadamard, rotate its input online."""
    t = OnlineHadamard(model.spec.intermediate, seed)
    h = t.matrix(torch.float64)
    for i in range(model.spec.n_layers):
        n = roles.name(T.FFN_DOWN, i)
        if n in model.input_transforms:
            raise TwinquantError(f"{n} already has an online transform")
        model.set(n, _w(model, n) @ h)
        model.input_transforms[n] = t
    model.history.append(history.Rotation("R4", "hadamard", t.n, t.seed))
    return model


def add_online_qk(model: Model, seed: int | None = None) -> Model:
    """R3: rotate q and k per head after RoPE (exact: q·kᵀ is unchanged)."""
    if model.qk_transform is not None:
        raise TwinquantError("the model already has an R3 transform")
    model.qk_transform = OnlineHadamard(model.spec.head_dim, seed)
    model.history.append(history.Rotation("R3", "hadamard", model.spec.head_dim, seed))
    return model


ROTATIONS = ("rh", "ro")
ONLINE = ("r3", "r4")


# latent attention's values come out of attn_v_b per head from the cached latent; a per-head R2 would have to be
# fused into attn_v_b's rows and attn_output's columns, which is exact but not done yet: recorded, not silent
R2_SKIPPED_MLA = history.Skipped("R2", "latent attention (DeepSeek): per-head value rotation not fused into "
                                       "attn_v_b / attn_output yet")


def check_rotatable(spec, rotation: str, online: tuple[str, ...] = ()) -> None:
    """What a mixture-of-experts or latent-attention model can be rotated with: R1 (RH) is exact through routers,
    experts, shared experts and MLA's q_a / kv_a; R2 where attention is ordinary. RO samples the inputs of attn_q
    and ffn_gate, and R3/R4 are written for dense blocks: refused there in one line."""
    if not (spec.moe or spec.mla):
        return
    if rotation == "ro":
        raise TwinquantError(f"--rotation ro is not available for a mixture-of-experts / latent-attention model "
                             f"({spec.arch}) yet; --rotation rh is")
    if online:
        raise TwinquantError(f"online transforms ({', '.join(online)}) are not available for a mixture-of-experts "
                             f"/ latent-attention model ({spec.arch}) yet")


def check_online(online: tuple[str, ...]) -> None:
    """Refuse an online transform that is not one of `ONLINE` (the first unknown one is named)."""
    bad = [o for o in online if o not in ONLINE]
    if bad:
        raise TwinquantError(f"unknown online transform {bad[0]!r}; choose from {', '.join(ONLINE)}")


def residual_samples(model: Model, windows: torch.Tensor, max_rows: int = 8192, seed: int = 0) -> torch.Tensor:
    """Rows the residual rotation acts on: the (norm-fused) inputs of attn_q and ffn_gate in every block."""
    from twinquant.model.forward import LinearInputs, forward

    names = {roles.name(t, i) for i in range(model.spec.n_layers) for t in (T.ATTN_Q, T.FFN_GATE)}
    rows = []
    for i in range(windows.shape[0]):
        hook = LinearInputs(names)
        forward(model, windows[i: i + 1], hook=hook, logits_for=slice(0, 0))
        rows += [x for xs in hook.inputs.values() for x in xs]
    return subsample_rows(torch.cat(rows).double(), max_rows, seed)


def subsample_rows(x: torch.Tensor, max_rows: int, seed: int) -> torch.Tensor:
    if x.shape[0] > max_rows:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x.shape[0], generator=g)[:max_rows]
        x = x[keep]
    return x


def rotate(model: Model, rotation: str = "rh", seed: int = 0, r2: bool = True, online: tuple[str, ...] = (),
           calib_windows: torch.Tensor | None = None, ro_iters: int = 20, ro_bits: int = 4,
           massive_factor: float = 10.0) -> Model:
    """The rotation recipe: fuse norms, R1 (RH or RO), R2 (RH), then the requested online transforms."""
    from twinquant.transforms.hadamard import RandomizedHadamard

    if rotation not in ROTATIONS:
        raise TwinquantError(f"unknown rotation {rotation!r}; choose {' or '.join(ROTATIONS)}")
    check_online(online)
    s = model.spec
    check_rotatable(s, rotation, online)
    fuse_norms(model)
    rh = RandomizedHadamard(s.hidden, seed)
    q1, record = rh.matrix(torch.float64), history.Rotation("R1", "rh", s.hidden, seed)
    if rotation == "ro":
        if calib_windows is None:
            raise TwinquantError("--rotation ro needs calibration text (--calib)")
        from twinquant.rotation.optimize import optimize_rotation_from_samples

        x = residual_samples(model, calib_windows, seed=seed)
        q1, record = optimize_rotation_from_samples(x, q1, s.hidden, seed, ro_iters, ro_bits, massive_factor)
    rotate_residual(model, q1, record)
    if r2 and s.mla:
        model.history.append(R2_SKIPPED_MLA)
    elif r2:
        rotate_heads(model, RandomizedHadamard(s.head_dim, seed + 1).matrix(torch.float64),
                     history.Rotation("R2", "rh", s.head_dim, seed + 1))
    if "r4" in online:
        add_online_ffn_down(model, seed + 2)
    if "r3" in online:
        add_online_qk(model, seed + 3)
    return model.fuse_shared_inputs()
