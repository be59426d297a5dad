"""Exact block-alignment padding: widen a model with zero channels so llama.cpp's K-quants fit its rows.

K-quant blocks hold 256 values of a row (a linear's input features), so models whose residual width is 576 or 896
fall back to 32-value types (Q4_0, Q5_0 …) for most tensors. `pad_model` returns the same function at a padded
width:

- residual (hidden h -> h'): token_embd gains zero columns; its readers (attn_q/k/v, ffn_gate/up, output) zero
  input columns; its writers (attn_output, ffn_down) zero output rows; so the residual stream is the original
  one followed by h' - h zeros.
- RMSNorm over h' channels of which h' - h are zero: mean'(x²) = (h/h')·mean(x²), so with eps' = eps·h/h'
      x / sqrt(mean'(x²) + eps') = x / (sqrt(h/h')·sqrt(mean(x²) + eps)),
  and the gains g' = g·sqrt(h/h') on the real channels give the original output exactly. A gain that is the same
  on every channel (fused norms) stays uniform (the padded channels get the same value), so it keeps commuting
  with a later residual rotation R1; otherwise the padded channels get gain 0.
- llama.cpp (and our spec) have one rms eps for every norm, so the per-head q/k norms (Qwen3) see eps' too. They
  are made exact by scaling q and k (weights and biases) by c = sqrt(h/h'):
      c·q / sqrt(c²·mean(q²) + eps') = q / sqrt(mean(q²) + eps)   since eps' = c²·eps.
- FFN (`ffn=True`, f -> f'): gate/up zero output rows (silu(0)·0 = 0), ffn_down zero input columns.
- heads (`heads=True`): attn_output reads n_heads·head_dim features; zero query heads are appended to every GQA
  group (attn_q zero rows, attn_output zero columns) until n_heads·head_dim is a multiple. A zero head attends
  uniformly, and its output meets zero columns of attn_output: exact. (For qwen2 always, to exactly h'/head_dim
  heads: llama.cpp's qwen2 graph sizes attn_q and attn_output as hidden x hidden.)

head_dim is unchanged and stays explicit in the file (`{arch}.attention.key_length` / `value_length`), which
llama.cpp honours for llama and qwen3 when hidden / n_heads != head_dim (tested); for qwen2 it sizes q by hidden
(see above), so there n_heads·head_dim = hidden is kept.

The padded model is lazy: its tensors are computed (in float64) from the original's on first use, so the original
must not be changed afterwards. `model.history` gets a `Padding` record (written to the GGUF as
part of `twinquant.rotation` and as `twinquant.padding`).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from twinquant.errors import TwinquantError
from twinquant.model import history, roles
from twinquant.model.model import Model, TensorInfo
from twinquant.model.spec import ModelSpec

# Architectures whose llama.cpp graph sizes attn_q / attn_output as hidden x hidden (it ignores key_length there):
# padding their residual must pad the query heads to exactly hidden / head_dim. (llama and qwen3 size them by
# n_heads·head_dim.) A fact about llama.cpp per family; it would sit well in `model/architectures.py`.
Q_DIM_IS_HIDDEN = frozenset({"qwen2"})


def padded_width(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def padded_heads(spec: ModelSpec, multiple: int) -> int:
    """The fewest query heads >= n_heads, a multiple of n_kv_heads, with n_heads·head_dim a multiple of `multiple`."""
    # n·head_dim % multiple == 0  <=>  n % (multiple / gcd(head_dim, multiple)) == 0; combined with n % n_kv == 0
    need = multiple // math.gcd(spec.head_dim, multiple)
    step = need * spec.n_kv_heads // math.gcd(need, spec.n_kv_heads)
    return padded_width(spec.n_heads, step)


def _base(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


class PaddedSource:
    """A `TensorSource` computing the padded tensors from the original model's, one at a time."""

    def __init__(self, original: Model, spec: ModelSpec, record: dict):
        self.original = original
        self.spec = spec
        self.record = record
        src = original.source
        self.path = f"{src.path if src is not None else '<memory>'} (padded to {spec.hidden})"
        self.s = math.sqrt(record.hidden / record.to)     # gain factor and q/k scale

    def _original(self, name: str) -> torch.Tensor:
        t = self.original.tensors.get(name)
        if t is None:
            if self.original.source is None:
                raise KeyError(name)
            return self.original.source.load(name).double()    # not cached in the original: memory stays flat
        return t.detach().to(device="cpu", dtype=torch.float64)

    def release(self) -> None:
        self.original._release_source()

    def info(self, name: str) -> TensorInfo:
        shape = roles.expected_shape(self.spec, name)
        orig = self.original.tensor_info(name)
        per = orig.nbytes / max(1, math.prod(orig.shape))
        return TensorInfo(name, tuple(shape), orig.source_type, int(per * math.prod(shape)))

    def load(self, name: str) -> torch.Tensor:
        return pad_tensor(self.original.spec, self.spec, name, self._original(name))


def _pad_dim(t: torch.Tensor, dim: int, size: int, value: float = 0.0) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], dim=dim)


def _pad_heads(t: torch.Tensor, dim: int, old: ModelSpec, new: ModelSpec) -> torch.Tensor:
    """Append zero query heads to every GQA group along `dim` (n_heads·head_dim features)."""
    if new.n_heads == old.n_heads:
        return t
    t = t.movedim(dim, 0)
    rest = t.shape[1:]
    g_old, g_new = old.n_heads // old.n_kv_heads, new.n_heads // new.n_kv_heads
    t = _pad_dim(t.reshape(old.n_kv_heads, g_old, old.head_dim, *rest), 1, g_new)
    return t.reshape(new.q_dim, *rest).movedim(0, dim)


def pad_tensor(old: ModelSpec, new: ModelSpec, name: str, t: torch.Tensor) -> torch.Tensor:
    """The padded form of tensor `name` (HF orientation, float64) of a model with spec `old`, for spec `new`."""
    h, h2 = old.hidden, new.hidden
    f2 = new.intermediate
    s = math.sqrt(h / h2)
    base = _base(name)
    bias = name.endswith(".bias")
    if base in ("token_embd", "output"):
        return _pad_dim(t, 1, h2)
    if base in ("attn_norm", "ffn_norm", "output_norm"):
        uniform = bool(torch.all(t == t[0]))
        return _pad_dim(t * s, 0, h2, float(t[0]) * s if uniform else 0.0)
    if base in ("attn_q_norm", "attn_k_norm"):
        return t
    if base in ("attn_q", "attn_k", "attn_v"):
        if base == "attn_q":
            t = _pad_heads(t, 0, old, new)
        if not bias:
            t = _pad_dim(t, 1, h2)
        return t * s if new.qk_norm and base != "attn_v" else t
    if base == "attn_output":
        return _pad_dim(_pad_heads(t, 1, old, new), 0, h2)
    if base in ("ffn_gate", "ffn_up"):
        return _pad_dim(_pad_dim(t, 1, h2), 0, f2)
    if base == "ffn_down":
        return _pad_dim(_pad_dim(t, 0, h2), 1, f2)
    raise TwinquantError(f"padding: no rule for tensor {name!r}")


def pad_model(model: Model, multiple: int = 256, ffn: bool = False, heads: bool = False) -> Model:
    """The same function with the residual width (and, if asked, the FFN width and the query-head count) padded
    with zero channels to a multiple of `multiple`.

    The original is not changed (and must not be afterwards: the padded model computes its tensors from it on
    first use). Returns `model` itself when nothing needs padding. For qwen2 the query heads always follow the
    residual width (llama.cpp's graph needs n_heads·head_dim = hidden). Raises `TwinquantError` for a quantized
    model, a duplicated layout, or an online transform whose input width would change.
    """
    if multiple <= 0:
        raise TwinquantError(f"padding multiple must be positive, got {multiple}")
    model.spec.require_dense("padding")
    if model.quantized:
        raise TwinquantError("pad the model before quantizing it (packed GGML weights cannot be padded)")
    if len(model.layout) != model.spec.n_layers or any(sl.block != i for i, sl in enumerate(model.layout.slots)):
        raise TwinquantError("padding handles the plain layout only (pad before duplicating layers)")
    old = model.spec
    h2 = padded_width(old.hidden, multiple)
    f2 = padded_width(old.intermediate, multiple) if ffn else old.intermediate
    n2 = padded_heads(old, multiple) if heads else old.n_heads
    if old.arch in Q_DIM_IS_HIDDEN:     # query heads follow the residual width (then a multiple itself)
        n2 = h2 // old.head_dim if h2 != old.hidden else old.n_heads
        if h2 != old.hidden and (h2 % old.head_dim or n2 % old.n_kv_heads or n2 < old.n_heads):
            raise TwinquantError(
                f"llama.cpp's {old.arch} needs n_heads·head_dim = hidden: padding hidden {old.hidden} -> {h2} needs "
                f"{h2}/{old.head_dim} query heads, a whole multiple of the {old.n_kv_heads} kv heads; try another "
                f"multiple")
    if (h2, f2, n2) == (old.hidden, old.intermediate, old.n_heads):
        return model
    widened = {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "output"} if h2 != old.hidden else set()
    widened |= {"ffn_down"} if f2 != old.intermediate else set()
    widened |= {"attn_output"} if n2 != old.n_heads else set()
    online = sorted(n for n in model.input_transforms if _base(n) in widened)
    if online:
        raise TwinquantError(f"{online[0]} has an online input transform (e.g. R4) of the unpadded width: padding "
                             f"its input is not exact; pad before adding online transforms")
    eps2 = old.rms_eps * old.hidden / h2
    new = dataclasses.replace(old, hidden=h2, intermediate=f2, n_heads=n2, rms_eps=eps2)
    record = history.Padding(multiple, old.hidden, h2, old.intermediate, f2, old.n_heads, n2, old.rms_eps, eps2,
                             math.sqrt(old.hidden / h2) if old.qk_norm else 1.0)
    out = Model(spec=new, source=PaddedSource(model, new, record), tokenizer=model.tokenizer, dtype=model.dtype,
                device=model.device)
    out.input_transforms = dict(model.input_transforms)
    out.qk_transform = model.qk_transform
    out.history = [*model.history, record]
    return out


def padding_records(model: Model) -> list[history.Padding]:
    """The pad records of a model (empty when it was never padded)."""
    return history.paddings(model.history)
