"""The one forward: a pure-torch decoder that executes a `Model` (llama / qwen2 / qwen3 and their MoE families).

Serves calibration (hooks on every linear input), evaluation, search and the runtime. Weights are in HF
orientation ([out, in]); RoPE uses the rotate-half (NeoX) layout that HF checkpoints use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from twinquant.model import roles
from twinquant.model.model import Model
from twinquant.model.spec import ModelSpec

T = roles.T

# Called with (role name, input tensor [B, T, in]) right before each linear runs; linears of one input group
# (q/k/v, gate/up) receive the same tensor object. A hook with a `tap_output(name, y) -> y` method also sees each
# linear's output (allocation/fisher.py keeps them for their gradients).
LinearHook = Callable[[str, torch.Tensor], None]
# Called with (slot index, residual stream [B, T, hidden]) before each slot runs, and with len(layout) before the
# final norm: where massive activations show.
ResidualHook = Callable[[int, torch.Tensor], None]


@dataclass
class KVCache:
    """Preallocated keys/values per block execution (`Layout.executions`): [B, n_kv_heads, max_len, head_dim]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0
    # the position as a device tensor (int64, 0-dim); when set, attention writes there and attends over the whole
    # cache under a mask, so a decode step has the same shapes at every position (a CUDA graph replays it:
    # runtime/graph_decode.py); `pos` still counts on the host
    at: torch.Tensor | None = None
    step: "StepPositions | None" = None     # set by `forward` for the step it runs with `at`

    @classmethod
    def empty(cls, model: Model, batch: int, max_len: int) -> "KVCache":
        s = model.spec
        # latent attention caches one "head" per position: the normed latent and the RoPE key part (its values are
        # the latent itself, a view of k)
        k_shape = (batch, 1, max_len, s.kv_lora_rank + s.rope_dim) if s.mla else (batch, s.n_kv_heads, max_len,
                                                                                 s.head_dim)
        v_shape = (*k_shape[:3], 0) if s.mla else k_shape
        n = len(model.layout.executions())
        mk = lambda shape: torch.zeros(shape, dtype=model.dtype, device=model.device)  # noqa: E731
        return cls([mk(k_shape) for _ in range(n)], [mk(v_shape) for _ in range(n)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times the original."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE's inverse frequencies (float64), YaRN-mixed when the spec says (transformers' formula, truncated
    correction range)."""
    dim, base = spec.rope_width, spec.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if not spec.yarn_factor:
        return 1.0 / pos

    def corr(rotations: float) -> float:
        return dim * math.log(spec.yarn_orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(spec.yarn_beta_fast)), 0), min(math.ceil(corr(spec.yarn_beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp                      # share of the original (extrapolated) frequency
    return (1.0 / (spec.yarn_factor * pos)) * (1 - keep) + (1.0 / pos) * keep


def rope_attention_factor(spec: ModelSpec) -> float:
    """The factor YaRN scales cos/sin by (1 without scaling)."""
    if not spec.yarn_factor:
        return 1.0
    if spec.yarn_mscale and spec.yarn_mscale_all_dim:
        return yarn_mscale(spec.yarn_factor, spec.yarn_mscale) / yarn_mscale(spec.yarn_factor, spec.yarn_mscale_all_dim)
    return yarn_mscale(spec.yarn_factor)


@dataclass
class _Rope:
    """cos/sin tables for positions [0, n), grown on demand."""

    inv: torch.Tensor          # float64 inverse frequencies [dim / 2]
    scale: float = 1.0         # cos/sin magnitude (YaRN's attention factor)
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    cast: dict = field(default_factory=dict)   # dtype -> (cos, sin): cast once, not in every layer

    def get(self, start: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # the cache outlives its caller: its tables are ordinary tensors even when made under inference_mode, or a
        # later autograd pass (allocation/fisher.py) could not use them
        with torch.inference_mode(False):
            return self._get(start, length, device, dtype)

    def _get(self, start: int, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if self.cos is None or self.cos.shape[0] < end or self.cos.device != device:
            n = max(end, 2 * (self.cos.shape[0] if self.cos is not None else 0), 512)
            ang = torch.outer(torch.arange(n, dtype=torch.float64), self.inv)   # [n, hd/2]
            ang = torch.cat([ang, ang], dim=-1)                                 # rotate-half layout
            self.cos, self.sin = (ang.cos() * self.scale).to(device), (ang.sin() * self.scale).to(device)
            self.cast.clear()
        if dtype not in self.cast:
            self.cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        cos, sin = self.cast[dtype]
        return cos[start:end], sin[start:end]


_ROPE_CACHE: dict[tuple, _Rope] = {}


def _rope_key(spec: ModelSpec) -> tuple:
    return (spec.rope_theta, spec.rope_width, spec.yarn_factor, spec.yarn_orig_ctx, spec.yarn_beta_fast,
            spec.yarn_beta_slow, spec.yarn_mscale, spec.yarn_mscale_all_dim)


def _rope_tables(spec: ModelSpec, start: int, length: int, device, dtype):
    key = _rope_key(spec)
    rope = _ROPE_CACHE.get(key)
    if rope is None:
        rope = _ROPE_CACHE[key] = _Rope(rope_inv_freq(spec), rope_attention_factor(spec))
    return rope.get(start, length, device, dtype)


def _norm_kernel(x: torch.Tensor, w: torch.Tensor, res: torch.Tensor | None = None):
    """model/triton_norm where its kernel takes this norm (Triton runs here and the rows fit), else None."""
    from twinquant.triton_env import runs_triton

    if not runs_triton(x):
        return None
    from twinquant.model import triton_norm

    return triton_norm if triton_norm.fits(x, w, res) else None


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, q8: bool = False) -> torch.Tensor:
    """RMSNorm(x) · w. `q8` (`q8_input`): where the kernel runs, the result also carries its int8 form."""
    # Normalise in float32 (float64 stays float64) whatever the compute dtype, as the reference implementations do.
    kernel = _norm_kernel(x, w)
    if kernel is not None:      # one launch (model/triton_norm.py), the same arithmetic
        return kernel.rms_norm(x, w, eps, q8=q8)
    xf = x if x.dtype == torch.float64 else x.float()
    if xf.is_cuda:      # one fused kernel instead of five (a decode step runs two norms a block)
        xf = F.rms_norm(xf, (xf.shape[-1],), eps=eps)
    else:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float,
                 q8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y, w)): one kernel where Triton runs (a block's residual add and its second norm)."""
    kernel = _norm_kernel(x, w, y)
    if kernel is not None:
        return kernel.rms_norm(x, w, eps, res=y, q8=q8)
    x = x + y
    return x, rms_norm(x, w, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; cos/sin: [T, hd]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def apply_rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3) … (DeepSeek's layout, llama.cpp's "normal" mode). The result is
    laid out de-interleaved (rotated evens, then odds), as transformers does: q·k is the same in either order."""
    half = x.shape[-1] // 2
    c, s_ = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s_, x2 * c + x1 * s_), dim=-1)


def q8_input(model: Model, name: str, x: torch.Tensor, params=None) -> bool:
    """Whether the kernel making x (RMSNorm, SwiGLU, the decode attention) should store x's int8 form too
    (`packed.with_q8`): the linear `name` reading x is a packed type whose GEMV quantizes x first (TWINQUANT_Q8), x
    reaches it unchanged (no online transform, no copy's clipping) and as few rows as a GEMV takes. Saves the GEMV's
    own quantize launch (`packed.q8_handed_over`)."""
    w = model.packed.get(name) if model.packed else None
    if w is None or name in model.input_transforms:
        return False
    from twinquant.formats.ggml.packed import GEMV_MAX_ROWS, q8_default, q8_handed_over

    return (q8_handed_over() and x.numel() // x.shape[-1] <= GEMV_MAX_ROWS
            and w.ggml_type in q8_default() and (params is None or params.is_identity_transform))


def _linear(x: torch.Tensor, model: Model, name: str, hook: LinearHook | None, bias: bool = False, params=None):
    return linears(x, model, (name,), hook, bias, params)[0]


def linear_input(x: torch.Tensor, model: Model, name: str, params=None) -> torch.Tensor:
    """What the linear `name` multiplies for the input x: after its online transform (e.g. R4: the weight was
    pre-multiplied, the input is rotated here) and a duplicated layer's input clipping (`params`, a `CopyParams`)."""
    online = model.input_transforms.get(name)
    if online is not None:
        x = online.apply(x)
    if params is not None and not params.is_identity_transform:
        x = params.apply(x, hidden_width=x.shape[-1] == model.spec.hidden)
    return x


def _packed_linears(x: torch.Tensor, model: Model, names: tuple[str, ...], bs) -> list[torch.Tensor]:
    """The linears of a group with packed members: one GEMV per run of members joined into one weight
    (`runtime.packed_weights.join_shared_inputs`), one product per other member (a group may mix packed and float
    members: a type without a kernel)."""
    from twinquant.formats.ggml.packed import qlinear

    bs = bs or [None] * len(names)
    ys: list[torch.Tensor] = []
    i = 0
    while i < len(names):
        run = model.packed_groups.get(names[i])
        k = len(run.members) if run is not None else 0
        if (run is not None and names[i:i + k] == run.members
                and all(model.packed.get(n) is v for n, v in zip(run.members, run.views))
                and (all(b is None for b in bs[i:i + k])
                     or all(b is v for b, v in zip(bs[i:i + k], run.bias_views)) and len(run.bias_views) == k)):
            ys.extend(run.product(x, bs[i] is not None))
            i += k
            continue
        n, b = names[i], bs[i]
        ys.append(qlinear(x, model.packed[n], b) if n in model.packed else F.linear(x, model.get(n), b))
        i += 1
    return ys


def linears(x: torch.Tensor, model: Model, names: tuple[str, ...], hook: LinearHook | None,
             bias: bool = False, params=None, prepared: bool = False) -> list[torch.Tensor]:
    """Linears that read the same input x; one matmul when the model holds them fused.

    `params` (a duplicated layer's `CopyParams`, or None) clips and fake-quantizes the input first
    (`linear_input`; `prepared`: x already is that)."""
    if not prepared:
        x = linear_input(x, model, names[0], params)
    if hook is not None:
        for n in names:
            hook(n, x)
    bs = [model.get(n.replace(".weight", ".bias")) for n in names] if bias else None
    if model.packed and any(n in model.packed for n in names):     # weights kept as GGML bytes on the GPU
        ys = _packed_linears(x, model, names, bs)
        tap = getattr(hook, "tap_output", None)
        return [tap(n, y) for n, y in zip(names, ys)] if tap is not None else ys
    ws = [model.get(n) for n in names]
    whole = model.fused(names) if len(names) > 1 else None
    if whole is None:
        ys = [F.linear(x, w, b) for w, b in zip(ws, bs or [None] * len(ws))]
    else:
        y = F.linear(x, whole, torch.cat(bs) if bs else None)
        ys = list(y.split([w.shape[0] for w in ws], dim=-1))
    tap = getattr(hook, "tap_output", None)     # a hook may also see each output (the Fisher pass: its gradient)
    return [tap(n, y) for n, y in zip(names, ys)] if tap is not None else ys


class StepPositions:
    """What every block of a device-position step (`KVCache.at`) shares, made once per forward instead of once per
    block (a replayed decode step then launches these few kernels once): the positions, the RoPE rows (and whole
    tables) per dtype, the additive attention mask over the whole cache per dtype."""

    def __init__(self, at: torch.Tensor, L: int, max_len: int):
        self.idx = at + torch.arange(L, device=at.device)      # [L] positions of the step's tokens
        self.max_len = max_len
        self._memo: dict = {}

    def tables(self, spec: ModelSpec, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cos/sin tables [max_len, rope width] in dtype (for a kernel that reads rows by position)."""
        return _rope_tables(spec, 0, self.max_len, self.idx.device, dtype)

    def rope(self, spec: ModelSpec, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", _rope_key(spec), dtype)
        if key not in self._memo:
            self._memo[key] = tuple(t.index_select(0, self.idx) for t in self.tables(spec, dtype))
        return self._memo[key]

    def mask(self, dtype) -> torch.Tensor:
        """[L, max_len]: 0 where a query sees the key (positions up to its own), -inf past it."""
        if ("mask", dtype) not in self._memo:
            seen = torch.arange(self.max_len, device=self.idx.device)[None, :] <= self.idx[:, None]
            self._memo["mask", dtype] = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(
                ~seen, float("-inf"))
        return self._memo["mask", dtype]


def _rope_at(spec: ModelSpec, start: int | torch.Tensor, L: int, cache: KVCache | None, device, dtype):
    """cos/sin for positions start..start+L-1; a device-tensor start (`KVCache.at`) reads the step's rows."""
    if isinstance(start, torch.Tensor):
        return cache.step.rope(spec, dtype)
    return _rope_tables(spec, start, L, device, dtype)


def _remember(cache: KVCache, slot: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor | None):
    """Write L new keys (and values) at start; (keys, values, attn_mask, is_causal) to attend with: the cached
    prefix, or with a device-tensor start the whole cache with the positions past the queries masked off."""
    if isinstance(start, torch.Tensor):
        cache.k[slot].index_copy_(2, cache.step.idx, k)
        if v is not None:
            cache.v[slot].index_copy_(2, cache.step.idx, v)
        return cache.k[slot], cache.v[slot] if v is not None else None, cache.step.mask(k.dtype)[None, None], False
    L = k.shape[2]
    cache.k[slot][:, :, start:start + L] = k
    if v is not None:
        cache.v[slot][:, :, start:start + L] = v
    keys = cache.k[slot][:, :, :start + L]
    return keys, cache.v[slot][:, :, :start + L] if v is not None else None, *_causal(start, L, k.device)


def _causal(start: int, L: int, device) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for L queries at positions start.. over the keys 0..start+L-1: SDPA's own causal mask
    from position 0; after cached positions each query sees the keys up to its own (one query: all of them)."""
    if start == 0:
        return None, L > 1
    if L == 1:
        return None, False
    qpos = torch.arange(start, start + L, device=device)[:, None]
    return torch.arange(start + L, device=device)[None, :] <= qpos, False


def attention(model: Model, layer: int, x: torch.Tensor, start: int, cache: KVCache | None, slot: int,
              hook: LinearHook | None, params=None) -> torch.Tensor:
    o = attention_mix(model, layer, x, start, cache, slot, hook, params)
    return _linear(o, model, roles.name(T.ATTN_OUT, layer), hook, params=params)


def _fused_rope(q: torch.Tensor) -> bool:
    """Whether a device-position step rotates q/k and writes the cache with one Triton kernel (CUDA; the CPU only
    under the tests' interpreter)."""
    from twinquant.triton_env import runs_triton

    return runs_triton(q) and q.dtype != torch.float64 and q.stride(-1) == 1


def _grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√hd + mask)·v for one query token, the query heads grouped over their key/value head (q [B, H,
    1, hd], k/v the cache [B, Hkv, T, hd], mask [1, T]): three launches. SDPA has no fused float32 kernel for GQA;
    its fallback copies the cache per query head and takes ~10 launches, which a replayed step pays per block."""
    B, H, _, hd = q.shape
    hkv, T = k.shape[1], k.shape[2]
    scores = torch.baddbmm(mask, q.reshape(B * hkv, H // hkv, hd), k.reshape(B * hkv, T, hd).transpose(1, 2),
                           alpha=hd ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(B * hkv, T, hd)).reshape(B, H, 1, hd)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepPositions,
                      q8: bool = False) -> torch.Tensor:
    """One query token's attention over the cache [B, 1, H·hd]: one kernel (two where the cache is cut into parts,
    `triton_attention.chunk_for`) that reads only the positions up to the step's, where Triton runs (no mask made; `q8`
    (`q8_input`): the output carries its int8 form); else `_grouped_decode_attention`."""
    from twinquant.triton_env import runs_triton

    B, H, _, hd = q.shape
    if runs_triton(q):
        from twinquant.formats.ggml.packed import q8_of, with_q8
        from twinquant.model import triton_attention

        if triton_attention.fits(q, k, v):
            o = triton_attention.decode_attention(q, k, v, step.idx, q8)
            return with_q8(o.reshape(B, 1, H * hd), q8_of(o))       # the rows the output projection reads
    return _grouped_decode_attention(q, k, v, step.mask(q.dtype)).reshape(B, 1, H * hd)


def attention_mix(model: Model, layer: int, x: torch.Tensor, start: int, cache: KVCache | None, slot: int,
                  hook: LinearHook | None, params=None) -> torch.Tensor:
    """Attention up to the output projection's input: q/k/v, RoPE, the softmax mix of the values [B, L, q_dim]."""
    s = model.spec
    B, L, _ = x.shape
    qkv = tuple(roles.name(t, layer) for t in (T.ATTN_Q, T.ATTN_K, T.ATTN_V))
    q, k, v = linears(x, model, qkv, hook, s.qkv_bias, params)
    q = q.reshape(B, L, s.n_heads, s.head_dim).transpose(1, 2)       # [B, H, L, hd]
    k = k.reshape(B, L, s.n_kv_heads, s.head_dim).transpose(1, 2)    # [B, Hkv, L, hd]
    v = v.reshape(B, L, s.n_kv_heads, s.head_dim).transpose(1, 2)
    if s.qk_norm:
        q = rms_norm(q, model.get(roles.name(T.ATTN_Q_NORM, layer)), s.rms_eps)
        k = rms_norm(k, model.get(roles.name(T.ATTN_K_NORM, layer)), s.rms_eps)
    if isinstance(start, torch.Tensor) and model.qk_transform is None and _fused_rope(q):
        from twinquant.model.triton_rope import rope_into_cache

        q = rope_into_cache(q, k, v, *cache.step.tables(s, q.dtype), cache.step.idx, cache.k[slot], cache.v[slot])
        k, v, causal = cache.k[slot], cache.v[slot], False
        if L == 1 and q.dtype == torch.float32:
            return _decode_attention(q, k, v, cache.step, q8_input(model, roles.name(T.ATTN_OUT, layer), x, params))
        mask = cache.step.mask(q.dtype)[None, None]
    else:
        cos, sin = _rope_at(s, start, L, cache, x.device, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if model.qk_transform is not None:   # R3: q·kᵀ is unchanged, the cached keys are rotated
            q, k = model.qk_transform.apply(q), model.qk_transform.apply(k)
        if cache is not None:
            k, v, mask, causal = _remember(cache, slot, start, k, v)
        else:
            mask, causal = _causal(start, L, x.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       enable_gqa=s.n_heads != s.n_kv_heads)
    return o.transpose(1, 2).reshape(B, L, s.q_dim)


def _per_head(x: torch.Tensor, w: torch.Tensor, name: str, hook) -> torch.Tensor:
    """x [B, H, L, in] through a per-head stack w [H, out, in]; a hook's `expert_input` sees each head's inputs."""
    seen = getattr(hook, "expert_input", None)
    if seen is not None:
        for h in range(w.shape[0]):
            seen(name, h, x[:, h].reshape(-1, x.shape[-1]))
    return torch.einsum("bhli,hoi->bhlo", x, w)


def latent_attention(model: Model, layer: int, x: torch.Tensor, start: int, cache: KVCache | None, slot: int,
                     hook: LinearHook | None) -> torch.Tensor:
    """DeepSeek's multi-head latent attention in the "absorbed" form llama.cpp runs: each head's non-RoPE query
    is mapped into the latent space (attn_k_b), scored against the cached normed latent plus the shared RoPE key
    (one key/value "head" for all heads), and its latent-space output is mapped to the head's value (attn_v_b).
    Equal to expanding keys and values per head (transformers' form) up to rounding."""
    s = model.spec
    B, L, _ = x.shape
    n = lambda t: roles.name(t, layer)   # noqa: E731
    r, rope = s.kv_lora_rank, s.rope_dim
    if s.q_lora_rank:
        q, kv = linears(x, model, (n(T.ATTN_Q_A), n(T.ATTN_KV_A_MQA)), hook)
        q = _linear(rms_norm(q, model.get(n(T.ATTN_Q_A_NORM)), s.rms_eps), model, n(T.ATTN_Q_B), hook)
    else:
        q, kv = linears(x, model, (n(T.ATTN_Q), n(T.ATTN_KV_A_MQA)), hook)
    q = q.reshape(B, L, s.n_heads, s.head_dim).transpose(1, 2)          # [B, H, L, hd]
    q_nope, q_pe = q.split([s.nope_dim, rope], dim=-1)
    latent, k_pe = kv.split([r, rope], dim=-1)
    latent = rms_norm(latent, model.get(n(T.ATTN_KV_A_NORM)), s.rms_eps)[:, None]      # [B, 1, L, r]
    cos, sin = _rope_at(s, start, L, cache, x.device, x.dtype)
    q_pe, k_pe = apply_rope_pairs(q_pe, cos, sin), apply_rope_pairs(k_pe[:, None], cos, sin)
    q = torch.cat((_per_head(q_nope, model.get(n(T.ATTN_K_B)), n(T.ATTN_K_B), hook), q_pe), dim=-1)
    k = torch.cat((latent, k_pe), dim=-1)                               # [B, 1, L, r + rope]
    if cache is not None:
        k, _, mask, causal = _remember(cache, slot, start, k, None)
    else:
        mask, causal = _causal(start, L, x.device)
    scale = s.head_dim ** -0.5
    if s.yarn_factor and s.yarn_mscale_all_dim:     # DeepSeek's YaRN also sharpens the softmax
        scale *= yarn_mscale(s.yarn_factor, s.yarn_mscale_all_dim) ** 2
    o = F.scaled_dot_product_attention(q, k, k[..., :r], attn_mask=mask, is_causal=causal,
                                       scale=scale, enable_gqa=True)      # [B, H, L, r]
    o = _per_head(o, model.get(n(T.ATTN_V_B)), n(T.ATTN_V_B), hook)
    return _linear(o.transpose(1, 2).reshape(B, L, s.attn_out_dim), model, n(T.ATTN_OUT), hook)


def feed_forward(model: Model, layer: int, x: torch.Tensor, hook: LinearHook | None, params=None) -> torch.Tensor:
    return _linear(ffn_mix(model, layer, x, hook, params), model, roles.name(T.FFN_DOWN, layer), hook, params=params)


def ffn_mix(model: Model, layer: int, x: torch.Tensor, hook: LinearHook | None, params=None) -> torch.Tensor:
    """The SwiGLU FFN up to the down projection's input: silu(gate(x)) * up(x)."""
    g, u = linears(x, model, (roles.name(T.FFN_GATE, layer), roles.name(T.FFN_UP, layer)), hook, params=params)
    return silu_mul(g, u, q8_input(model, roles.name(T.FFN_DOWN, layer), g, params))


def silu_mul(g: torch.Tensor, u: torch.Tensor, q8: bool = False) -> torch.Tensor:
    """silu(g) · u: one kernel where Triton runs (model/triton_swiglu.py, the same arithmetic), else torch's two.
    `q8` (`q8_input`): where the kernel runs, the result also carries its int8 form."""
    from twinquant.triton_env import runs_triton

    if runs_triton(g):
        from twinquant.model import triton_swiglu

        if triton_swiglu.fits(g, u):
            return triton_swiglu.silu_mul(g, u, q8)
    return F.silu(g) * u


def route(model: Model, layer: int, x: torch.Tensor, hook: LinearHook | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, chosen experts) [tokens, n_experts_used] for x [tokens, hidden], in float32: softmax or sigmoid
    scores of the router's logits; the choice among the best groups only (if grouped), by the scores plus the
    selection bias (if any); the chosen scores renormalized (`norm_topk`) and scaled (`expert_scale`)."""
    s = model.spec
    logits = _linear(x, model, roles.name(roles.ROUTER, layer), hook).float()
    scores = torch.softmax(logits, dim=-1) if s.gating == "softmax" else torch.sigmoid(logits)
    pick = scores
    if s.expert_bias:
        pick = scores + model.get(roles.name(roles.EXPERT_BIAS, layer, "bias")).float()
    if s.n_groups > 1 and s.groups_used < s.n_groups:
        grouped = pick.reshape(-1, s.n_groups, s.n_experts // s.n_groups)
        score = grouped.max(-1).values if s.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(s.groups_used, dim=-1).indices, True)
        pick = grouped.masked_fill(~keep[..., None], float("-inf")).reshape(pick.shape)
    chosen = pick.topk(s.n_experts_used, dim=-1).indices
    weights = scores.gather(1, chosen)
    if s.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights * s.expert_scale, chosen


def moe_feed_forward(model: Model, layer: int, x: torch.Tensor, hook: LinearHook | None) -> torch.Tensor:
    """Routed experts (+ the shared expert, behind its sigmoid gate in Qwen2-MoE), as the Qwen2/3-MoE and DeepSeek
    families compute them: the `route`'s top `n_experts_used` experts, each a SwiGLU FFN over the tokens routed
    to it, outputs summed with their weights.

    The hook sees the router's and the shared expert's inputs as any linear's; a hook with an
    `expert_input(name, expert, x)` method also sees each routed expert's inputs (the tokens routed to it), under
    the stacked tensor's name (gate_exps for gate and up, down_exps for down): per-expert Hessians."""
    s = model.spec
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    weights, chosen = route(model, layer, flat, hook)
    weights = weights.to(x.dtype)
    names = [roles.name(t, layer) for t in roles.EXPERTS]
    gate, up, down = (model.get(n) for n in names)
    seen = getattr(hook, "expert_input", None)
    routing = getattr(hook, "routing", None)
    if routing is not None:      # the block's routed inputs, kept by a hook that rebuilds expert Hessians later
        routing(names[0], flat, chosen)
    out = torch.zeros_like(flat)
    for e in chosen.unique().tolist():      # experts no token chose cost nothing
        tok, k = (chosen == e).nonzero(as_tuple=True)
        xe = flat[tok]
        if seen is not None:
            seen(names[0], e, xe)
        act = silu_mul(F.linear(xe, gate[e]), F.linear(xe, up[e]))
        if seen is not None:
            seen(names[2], e, act)
        out.index_add_(0, tok, F.linear(act, down[e]) * weights[tok, k, None])
    if s.shared_ffn:
        gate_inp, g_sh, u_sh, d_sh = (roles.name(t, layer) for t in roles.SHARED_EXPERT)
        g, u = linears(flat, model, (g_sh, u_sh), hook)
        shared = _linear(silu_mul(g, u), model, d_sh, hook)
        out = out + (torch.sigmoid(_linear(flat, model, gate_inp, hook)) * shared if roles.shared_gate(s) else shared)
    return out.reshape(shape)


def block_forward(model: Model, layer: int, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                  slot: int = 0, hook: LinearHook | None = None, params=None, pending: torch.Tensor | None = None,
                  defer: bool = False):
    """One residual block: x + attn(norm(x)), then + ffn(norm(.)). x: [B, L, hidden].

    `slot` is the KV-cache entry (the execution index); `params` the copy's parameter set (None: plain).
    `pending`: the previous block's FFN output not yet added to x (added here, with the first norm, in one kernel
    where Triton runs); `defer`: return (x, ffn output) instead of their sum, for the next block to add."""
    eps = model.spec.rms_eps
    w = model.get(roles.name(T.ATTN_NORM, layer))
    q8 = q8_input(model, roles.name(T.ATTN_Q, layer), x, params)
    x, h = add_rms_norm(x, pending, w, eps, q8) if pending is not None else (x, rms_norm(x, w, eps, q8))
    if model.spec.mla:
        a = latent_attention(model, layer, h, start, cache, slot, hook)
    else:
        a = attention(model, layer, h, start, cache, slot, hook, params)
    q8 = not model.spec.moe_layer(layer) and q8_input(model, roles.name(T.FFN_GATE, layer), x, params)
    x, h = add_rms_norm(x, a, model.get(roles.name(T.FFN_NORM, layer)), eps, q8)
    f = moe_feed_forward(model, layer, h, hook) if model.spec.moe_layer(layer) else feed_forward(model, layer, h,
                                                                                                 hook, params)
    return (x, f) if defer else x + f


def run_slots(model: Model, x: torch.Tensor, start: int = 0, cache: KVCache | None = None,
              hook: LinearHook | None = None, residual_hook: ResidualHook | None = None) -> torch.Tensor:
    """Every slot of the layout in order (serial copies scaled by α, parallel groups summed; see layout.py). A plain
    serial block leaves its FFN output for the next block to add with its first norm (one kernel fewer a block)."""
    dup = model.dup_params
    e = 0                                   # execution index = KV-cache entry
    pending = None                          # the last block's FFN output, not yet added to x
    for i, s in enumerate(model.layout.slots):
        if pending is not None and (residual_hook is not None or s.parallel):
            x, pending = x + pending, None
        if residual_hook is not None:
            residual_hook(i, x)
        if s.parallel:
            acc = None
            for c, w in s.members:
                y = block_forward(model, s.block, x, start, cache, e, hook, dup.resolve(s.block, c) if dup else None)
                e += 1
                acc = (y - x) * w if acc is None else acc + (y - x) * w
            x = x + acc
            continue
        p = dup.resolve(s.block, s.copy) if dup else None
        if p is None or p.alpha == 1.0:
            x, pending = block_forward(model, s.block, x, start, cache, e, hook, p, pending, defer=True)
        else:
            if pending is not None:
                x, pending = x + pending, None
            y = block_forward(model, s.block, x, start, cache, e, hook, p)
            x = x + p.alpha * (y - x)
        e += 1
    if pending is not None:
        x = x + pending
    if residual_hook is not None:
        residual_hook(len(model.layout.slots), x)
    return x


def embed(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    return F.embedding(tokens.to(model.device), model.get(roles.name(T.TOKEN_EMBD)))


def head(model: Model, x: torch.Tensor, hook: LinearHook | None = None) -> torch.Tensor:
    """Final norm and output head; logits in float32. x: [B, L, hidden] -> [B, L, vocab]."""
    out = roles.name(T.OUTPUT)
    x = rms_norm(x, model.get(roles.name(T.OUTPUT_NORM)), model.spec.rms_eps, q8_input(model, out, x))
    if hook is not None:
        hook(out, x)
    if out in model.packed:
        from twinquant.formats.ggml.packed import qlinear

        logits = qlinear(x, model.packed[out])
    else:
        logits = F.linear(x, model.output_weight())
    return logits if logits.dtype == torch.float64 else logits.float()


@torch.inference_mode()
def forward(model: Model, tokens: torch.Tensor, cache: KVCache | None = None,
            hook: LinearHook | None = None, logits_for: slice | None = None,
            residual_hook: ResidualHook | None = None) -> torch.Tensor:
    """Logits for `tokens` [B, L]: float32 [B, L, vocab], or only the positions in `logits_for`
    (e.g. `slice(-1, None)` when generating; the head is the costliest matmul of a small model).

    With a cache, tokens continue at `cache.pos` and the cache advances.
    """
    if tokens.ndim == 1:
        tokens = tokens[None]
    start = cache.pos if cache is not None else 0
    if cache is not None and start + tokens.shape[1] > cache.max_len:
        raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {start + tokens.shape[1]}")
    if cache is not None and cache.at is not None:
        start = cache.at                    # the position read on the device (a replayed decode step)
        cache.step = StepPositions(cache.at, tokens.shape[1], cache.max_len)
    try:
        x = run_slots(model, embed(model, tokens), start, cache, hook, residual_hook)
    finally:
        if cache is not None:
            cache.step = None
    if cache is not None:
        cache.pos += tokens.shape[1]
    if logits_for is not None:
        x = x[:, logits_for]
    return head(model, x, hook)


@dataclass
class LinearInputs:
    """Collects the inputs of chosen linears during a forward (calibration). Use as `hook=`."""

    names: set[str] | None = None          # None: every linear
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if self.names is None or name in self.names:
            self.inputs.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
