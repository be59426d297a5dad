"""Rotation as a lazy view: fused norms, R1 and R2 computed tensor by tensor when a stage asks for one.

`rotate()` (rotate.py) changes a materialized model in place; a 1.5B model in float64 for that is the 24 GB that
killed `quantize`. `rotate_lazy` returns a new `Model` whose `TensorSource` computes each rotated tensor from the
original's on first use (float64 for that one tensor; the embedding and head row chunk by row chunk), so a
block-streamed stage holds one block of rotated weights at a time. The arithmetic is the eager functions',
operation for operation (`rotated_tensor`), so both give the same bits (tested).

RO needs residual samples of the norm-fused model; `streamed_residual_samples` collects them one block at a time.
Online transforms (R3/R4) stay with the eager `rotate`.
"""

from __future__ import annotations

import dataclasses

import torch

from twinquant.errors import TwinquantError
from twinquant.model import history, roles
from twinquant.model.model import Model, TensorInfo
from twinquant.model.spec import ModelSpec
from twinquant.rotation.rotate import ROTATIONS, rows_matmul

T = roles.T


@dataclasses.dataclass(frozen=True)
class RotationPlan:
    """What the lazy view applies: fuse the norms (unless the original already is), R1 `q1` [h, h] and R2 `q2`
    [hd, hd] (float64, either may be None)."""

    fuse: bool
    q1: torch.Tensor | None
    q2: torch.Tensor | None


def _base(name: str) -> tuple[str, int | None]:
    parts = name.split(".")
    return (parts[2], int(parts[1])) if parts[0] == "blk" else (parts[0], None)


class RotatedSource:
    """A `TensorSource` computing the rotated tensors from the original model's, one at a time (not cached)."""

    def __init__(self, original: Model, spec: ModelSpec, plan: RotationPlan, dtype: torch.dtype):
        self.original = original
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.spec = spec
        self.plan = plan
        src = original.source
        self.path = f"{src.path if src is not None else '<memory>'} (rotated)"
        # the eager fuse_norms unties a tied head whose final-norm gain is not 1
        self.untie = plan.fuse and original.spec.tied_embeddings and not spec.tied_embeddings

    def _orig(self, name: str) -> torch.Tensor:
        t = self.original.tensors.get(name)
        if t is None:
            if self.original.source is None:
                raise KeyError(name)
            # as the original model would hold it (its dtype), not cached there: memory stays flat
            return self.original.source.load(name).to(self.original.dtype)
        return t.detach().cpu()

    def load_expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e of a stacked tensor, rotated alone (the stack's operations act on each expert's slice)."""
        return rotated_tensor(self.original.spec, self.plan, name,
                              lambda n: self.original.expert(n, e).detach().cpu() if n == name else self._orig(n),
                              self.untie, self.dtype)

    def release(self) -> None:
        self.original._release_source()

    def info(self, name: str) -> TensorInfo:
        src = roles.name(T.TOKEN_EMBD) if (name == roles.name(T.OUTPUT) and self.untie) else name
        orig = self.original.tensor_info(src)
        return TensorInfo(name, orig.shape, orig.source_type, orig.nbytes)

    def load(self, name: str) -> torch.Tensor:
        return rotated_tensor(self.original.spec, self.plan, name, self._orig, self.untie, self.dtype)


def rotated_tensor(spec: ModelSpec, plan: RotationPlan, name: str, orig, untie: bool,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` after fuse_norms, R1 and R2 as the eager functions compute it; `orig(name)` gives the
    original tensor. Small tensors are computed in float64 and returned in `out_dtype`."""
    base, layer = _base(name)
    q1, q2, s = plan.q1, plan.q2, spec
    d = lambda n: orig(n).double()  # noqa: E731
    if base == "token_embd":
        return rows_matmul(orig(name), q1, out_dtype) if q1 is not None else orig(name).to(out_dtype)
    if base == "output":
        w = orig(roles.name(T.TOKEN_EMBD) if untie else name)
        if plan.fuse:
            g = d(roles.name(T.OUTPUT_NORM))
            return rows_matmul(w, q1, out_dtype, scale=g) if q1 is not None else (w.double() * g[None, :]).to(
                out_dtype)
        return rows_matmul(w, q1, out_dtype) if q1 is not None else w.to(out_dtype)
    if base == "output_norm":
        g = d(name)
        return (torch.ones_like(g) if plan.fuse and (untie or not spec.tied_embeddings) else g).to(out_dtype)
    if base in ("attn_norm", "ffn_norm"):
        g = d(name)
        return (torch.ones_like(g) if plan.fuse else g).to(out_dtype)
    bias = name.endswith(".bias")
    feeds = {n: norm for norm, fed in roles.norm_feeds(s, layer).items() for n in fed}
    if name in feeds:                     # reads the normed residual: q/k/v (or MLA's q_a, kv_a), gate/up, router…
        w = d(name)
        if plan.fuse:
            w = w * d(roles.name(feeds[name], layer))
        if q1 is not None:
            w = w @ q1
        if base == "attn_v" and q2 is not None:
            w = torch.einsum("dc,kdh->kch", q2, w.view(s.n_kv_heads, s.head_dim, s.hidden)).reshape(s.kv_dim,
                                                                                                  s.hidden)
        return w.to(out_dtype)
    if base == "attn_v" and bias and q2 is not None:
        return (d(name).view(s.n_kv_heads, s.head_dim) @ q2).reshape(-1).to(out_dtype)
    if base == "attn_output":
        w = d(name)
        if q1 is not None:
            w = q1.T @ w
        if q2 is not None:
            w = (w.view(s.hidden, s.n_heads, s.head_dim) @ q2).reshape(s.hidden, s.q_dim)
        return w.to(out_dtype)
    if name in roles.residual_writers(s, layer):    # ffn_down, the experts' and the shared expert's down
        w = d(name)
        return (q1.T @ w if q1 is not None else w).to(out_dtype)
    return orig(name).to(out_dtype)          # q/k norms, q/k biases, MLA's inner tensors, expert bias: untouched


def _lazy(model: Model, plan: RotationPlan, records: list, dtype: torch.dtype | None = None) -> Model:
    if model.quantized:
        raise TwinquantError("rotate the model before quantizing it (packed GGML weights cannot be rotated)")
    if model.needs_online:
        raise TwinquantError("the lazy rotation does not compose with online transforms; use rotate()")
    spec = model.spec
    untie = False
    if plan.fuse and spec.tied_embeddings:
        g = model.get(roles.name(T.OUTPUT_NORM)) if roles.name(T.OUTPUT_NORM) in model.tensors else (
            model.source.load(roles.name(T.OUTPUT_NORM)))
        untie = not bool(torch.all(g.double() == 1))
    new_spec = dataclasses.replace(spec, tied_embeddings=False) if untie else spec
    dtype = dtype or model.dtype
    out = Model(spec=new_spec, source=RotatedSource(model, new_spec, plan, dtype), tokenizer=model.tokenizer,
                layout=model.layout, dtype=dtype, device=model.device)
    out.history = [*model.history, *records]
    out.quant_record = model.quant_record
    return out


def fused_lazy(model: Model, dtype: torch.dtype | None = None) -> Model:
    """The norm-fused model as a lazy view in `dtype` (default the model's; the original must not change)."""
    fuse = not history.has(model.history, history.FuseNorms)
    return _lazy(model, RotationPlan(fuse, None, None), [history.FuseNorms()] if fuse else [], dtype)


def rotate_lazy(model: Model, rotation: str = "rh", seed: int = 0, r2: bool = True,
                calib_windows: torch.Tensor | None = None, ro_iters: int = 20, ro_bits: int = 4,
                massive_factor: float = 10.0) -> Model:
    """`rotate(model, rotation, seed, r2)` without online transforms, as a lazy view: the same records and the
    same bits, one tensor at a time (see module doc). The original must not be changed afterwards."""
    from twinquant.rotation.rotate import R2_SKIPPED_MLA, check_rotatable
    from twinquant.transforms.hadamard import RandomizedHadamard

    if rotation not in ROTATIONS:
        raise TwinquantError(f"unknown rotation {rotation!r}; choose {' or '.join(ROTATIONS)}")
    s = model.spec
    check_rotatable(s, rotation)
    fuse = not history.has(model.history, history.FuseNorms)
    q1 = RandomizedHadamard(s.hidden, seed).matrix(torch.float64)
    record = history.Rotation("R1", "rh", s.hidden, seed)
    if rotation == "ro":
        if calib_windows is None:
            raise TwinquantError("--rotation ro needs calibration text (--calib)")
        from twinquant.rotation.optimize import optimize_rotation_from_samples

        # in float64, as the eager path (which rotates a float64 model) samples them
        x = streamed_residual_samples(fused_lazy(model, torch.float64), calib_windows, seed=seed)
        q1, record = optimize_rotation_from_samples(x, q1, s.hidden, seed, ro_iters, ro_bits, massive_factor)
    records = ([history.FuseNorms()] if fuse else []) + [record]
    q2 = None
    if r2 and s.mla:
        records.append(R2_SKIPPED_MLA)
    elif r2:
        q2 = RandomizedHadamard(s.head_dim, seed + 1).matrix(torch.float64)
        records.append(history.Rotation("R2", "rh", s.head_dim, seed + 1))
    return _lazy(model, RotationPlan(fuse, q1, q2), records)


def streamed_residual_samples(model: Model, windows: torch.Tensor, max_rows: int = 8192,
                              seed: int = 0) -> torch.Tensor:
    """`rotate.residual_samples` one block at a time (each block released after use): the same rows in the same
    order (window by window, then block by block)."""
    from twinquant.model.forward import LinearInputs, block_forward, embed

    names = [roles.name(t, i) for i in range(model.spec.n_layers) for t in (T.ATTN_Q, T.FFN_GATE)]
    per_window: list[dict[str, list[torch.Tensor]]] = [dict() for _ in range(windows.shape[0])]
    xs = [embed(model, windows[i: i + 1]) for i in range(windows.shape[0])]
    for layer in range(model.spec.n_layers):
        for i in range(windows.shape[0]):
            hook = LinearInputs(set(names[2 * layer: 2 * layer + 2]))
            xs[i] = block_forward(model, layer, xs[i], hook=hook)
            per_window[i].update(hook.inputs)
        model.release_block(layer)
    rows = [x for d in per_window for n in names if n in d for x in d[n]]
    from twinquant.rotation.rotate import subsample_rows

    return subsample_rows(torch.cat(rows).double(), max_rows, seed)
