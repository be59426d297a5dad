"""Per-tensor GGML types: llama.cpp's quantization mixes, user overrides and shape fallbacks.

`llama_cpp_mix(spec, "Q4_K_M", names)` gives the type stock `llama-quantize` picks for every tensor of a `llama`,
`qwen2` or `qwen3` model (checked against llama.cpp's own quantizer in tests/test_mixes.py); `assign_types` adds
llama-quantize's options (`--tensor-type REGEX=TYPE`, `--output-tensor-type`, `--token-embedding-type`, `--pure`)
and says, per tensor, which rule chose the type (for `--dry-run`).

How llama.cpp decides (src/llama-quant.cpp), restated as the tables below:

* the file type (ftype) names a *default* type (`MIXES[...].default`); 1-D tensors (norms, biases) stay F32;
* `output.weight` — and `token_embd.weight` when the embeddings are tied (no `output.weight` in the file) — gets
  Q8_0 when the default type's block does not divide the row; else the mix's own output type
  (`MIXES[...].output`: Q5_K for the 1- and 2-bit i-quants and IQ3_XXS), else Q6_K, or Q8_0 when the default is
  Q8_0;
* a few roles get other types by *condition rules* (`MIXES[...].rules`): ordered (condition, type) pairs, the
  first true condition wins. Conditions read a per-role counter `i` (how many tensors of that role the rules have
  already seen, in llama.cpp's tensor order: by layer number, then by name) against a total `n` (the number of
  attn_v tensors for attn_v; the layer count for ffn_down / ffn_gate / ffn_up), the GQA ratio
  `n_heads // n_kv_heads`, and whether an importance matrix is given. An untied token_embd has rules of its own
  (Q2_K / IQ3_S for the 1- to 3-bit i-quants, Q4_K for TQ1_0 / TQ2_0 / Q2_0);
* 70B models (llama with 80 layers and GQA; qwen2 with 80 layers) bump attn_v from Q3_K/Q4_K to Q5_K — except
  in the IQ1_* / IQ2_* mixes (`Mix.bump_70b`), whose rules llama.cpp keeps in a branch of their own;
* finally, a type whose block does not divide the row length (the input features, GGML's `ne[0]`) *falls back*
  (`FALLBACK`): Q2_0/Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ* -> IQ4_NL; a 32-block type, or
  a fallback whose 32-block does not divide the row either, becomes F16.

Options, as llama-quantize applies them: `--token-embedding-type` / `--output-tensor-type` set those tensors
outright (a tied token_embd follows `--output-tensor-type`); else the first `--tensor-type` regex found in the
name sets the type and skips the rules (its tensor then does not advance the counters: an override of
`blk\\.0\\.attn_v` makes blk.1's attn_v count as the first); `--pure` skips the rules everywhere. Fallbacks
apply in every case.

Importance matrix (`imatrix=True`): Q4_0 / Q5_0 change — ffn_down of the first n_layers // 8 layers becomes
Q4_1 / Q5_1 — and so do IQ3_XXS (without one, attn_v becomes IQ3_S and ffn_down Q4_K / Q3_K) and IQ4_NL /
IQ4_XS (without one, ffn_down of the first n_layers // 8 layers becomes Q5_K). llama.cpp refuses to write some
types without an imatrix (`needs_imatrix`): IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, and Q2_K in a Q2_K_S
file, except in token_embd / output — so IQ1_*, IQ2_*, IQ3_XXS, IQ3_XS and Q2_K_S need one unless every such
tensor fell back (rows not whole 256-blocks).

Mixture-of-experts models (qwen2moe, qwen3moe): llama.cpp names categories by substring, so the stacked experts
and the shared expert follow the ffn_gate / ffn_up / ffn_down rules (`category`); with more than one expert it
reads a tensor's layer from its name (`RuleContext.i` is the layer), except the 1-/2-bit i-quants' first-eighth
ffn_down rule, which counts tensors (`count`: exps and shexp both count); the 1-/2-bit i-quants give attn_v Q4_K
with four or more experts; eight experts (Mixtral's count) change attn_v, attn_k, attn_output and IQ3_M's ffn_down
(`_eight_experts`). DeepSeek (deepseek2): its latent-attention tensors (attn_q_a, attn_q_b, attn_kv_a_mqa, the
per-head attn_k_b / attn_v_b stacks) are in no category and take the default type; there is no attn_v, so no
attn_v rule applies. Not reproduced: falcon, whose architecture is not supported here.

Deliberate differences from llama-quantize, where it would fail: a `--token-embedding-type` /
`--output-tensor-type` whose block does not divide the row falls back here (llama.cpp aborts); overrides also
apply when the default type is a float type (llama.cpp ignores them then).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import gguf

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.spec import ModelSpec

Q = gguf.GGMLQuantizationType
TensorType = Union[gguf.GGMLQuantizationType, str]     # str: an integer-grid name (int4_g128_asym)


def _role(t: gguf.MODEL_TENSOR) -> str:
    return gguf.TENSOR_NAMES[t].rsplit(".", 1)[-1]


TOKEN_EMBD, OUTPUT = _role(roles.T.TOKEN_EMBD), _role(roles.T.OUTPUT)
ATTN_V, ATTN_OUT, ATTN_K = _role(roles.T.ATTN_V), _role(roles.T.ATTN_OUT), _role(roles.T.ATTN_K)
FFN_DOWN, FFN_GATE, FFN_UP = _role(roles.T.FFN_DOWN), _role(roles.T.FFN_GATE), _role(roles.T.FFN_UP)
OUTPUT_NAME = roles.name(roles.T.OUTPUT)

# whose llama.cpp rules are reproduced
ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "deepseek2")


# --- tensor names -------------------------------------------------------------------------------------------------
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z0-9_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class TensorRef:
    name: str
    layer: int | None       # block index, None for global tensors
    role: str               # attn_v, ffn_down, output, token_embd …
    shape: tuple[int, ...]  # [out, in] for linears: the GGML row length is shape[-1]

    @property
    def quantizable(self) -> bool:
        """llama.cpp quantizes 2-D (and stacked 3-D expert) `*.weight` tensors other than norms and routers."""
        return (self.name.endswith(".weight") and len(self.shape) in (2, 3) and not self.role.endswith("_norm")
                and not roles.keeps_f32(self.name, self.shape))

    @property
    def order(self) -> tuple[int, str]:
        """llama.cpp's tensor order (its loader's map): layer number (-1 for globals), then name."""
        return (-1 if self.layer is None else self.layer, self.name)


def parse_tensor(spec: ModelSpec, name: str) -> TensorRef:
    """`blk.3.attn_v.weight` -> (layer 3, role attn_v, shape)."""
    m = _NAME.match(name)
    if m is None:
        raise TwinquantError(f"{name!r} is not a tensor role name (like blk.0.attn_v.weight)")
    try:
        shape = tuple(roles.expected_shape(spec, name))
    except (KeyError, IndexError):
        raise TwinquantError(f"{name!r}: unknown tensor role") from None
    return TensorRef(name, None if m.group(1) is None else int(m.group(1)), m.group(2), shape)


# --- types ----------------------------------------------------------------------------------------------------
_NOT_WEIGHT_TYPES = {Q.I8, Q.I16, Q.I32, Q.I64, Q.F64}
_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}


def parse_type(text: str) -> TensorType:
    """A GGML type name, case-insensitive like llama-quantize (`q4_k`, `Q8_0`, `f16`); or an integer-grid name."""
    s = str(text).strip()
    if s.lower().startswith("int"):
        from twinquant.formats.intgrid import IntGrid

        return IntGrid.from_name(s).name
    t = Q.__members__.get(s.upper())
    if t is None or t in _NOT_WEIGHT_TYPES:
        raise TwinquantError(f"unknown tensor type {text!r}; e.g. Q4_K, Q6_K, Q8_0, Q4_0, IQ4_NL, F16")
    return t


def type_name(t: TensorType) -> str:
    return t if isinstance(t, str) else t.name


def block_size(t: Q) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


# the type a tensor falls back to when its row length is not a multiple of its type's block (256 -> 32 blocks)
FALLBACK: dict[Q, Q] = {
    **dict.fromkeys((Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS), Q.IQ4_NL),
    **dict.fromkeys((Q.Q2_0, Q.Q2_K, Q.Q3_K, Q.TQ1_0, Q.TQ2_0), Q.Q4_0),
    Q.Q4_K: Q.Q5_0,
    Q.Q5_K: Q.Q5_1,
    Q.Q6_K: Q.Q8_0,
}
LAST_RESORT = Q.F16   # when not even the fallback's block divides the row


def fallback_type(t: TensorType, cols: int) -> TensorType:
    """The type a row of `cols` values can really have, starting from `t` (llama.cpp's fallback)."""
    if isinstance(t, str):
        from twinquant.formats.intgrid import IntGrid

        IntGrid.from_name(t).for_cols(cols)   # integer grids have no fallback: raises if the group does not fit
        return t
    if cols % block_size(t) == 0:
        return t
    if t in FALLBACK:
        fb = FALLBACK[t]
    elif block_size(t) <= 32:
        fb = t
    else:
        raise TwinquantError(f"no fallback type is defined for {t.name} (rows of {cols} are not whole blocks)")
    return fb if cols % block_size(fb) == 0 else LAST_RESORT


# --- llama.cpp's mixes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleContext:
    i: int            # tensors of this role the rules have seen before this one (with experts: ffn_*'s layer)
    n: int            # total of this role (attn_v: attn_v tensors; ffn_down: layers)
    n_gqa: int        # n_heads // n_kv_heads
    imatrix: bool
    n_expert: int = 0
    count: int = 0    # tensors of this role seen before this one, whatever the experts


def category(role: str) -> str:
    """llama.cpp's tensor category: it matches ffn_up, ffn_gate, ffn_down by substring (in that order), so the
    stacked experts (`ffn_down_exps`) and the shared expert (`ffn_down_shexp`) follow the ffn_down rules."""
    return next((c for c in (FFN_UP, FFN_GATE, FFN_DOWN) if role.startswith(c)), role)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer schedule for extra bits: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


CONDITIONS: dict[str, Callable[[RuleContext], bool]] = {
    "": lambda c: True,
    "gqa>=4": lambda c: c.n_gqa >= 4,
    "gqa>=4 or experts>=4": lambda c: c.n_gqa >= 4 or c.n_expert >= 4,
    "first 1/8 tensors": lambda c: c.count < c.n // 8,
    "first 1/8, or 8 experts and more bits": lambda c: c.i < c.n // 8 or (c.n_expert == 8 and use_more_bits(c.i, c.n)),
    "first 2": lambda c: c.i < 2,
    "first 4": lambda c: c.i < 4,
    "first 1/16": lambda c: c.i < c.n // 16,
    "first 1/8": lambda c: c.i < c.n // 8,
    "more bits": lambda c: use_more_bits(c.i, c.n),
    "not first/last 1/8": lambda c: c.n // 8 <= c.i < 7 * c.n // 8,
    "imatrix, first 1/8": lambda c: c.imatrix and c.i < c.n // 8,
    "no imatrix": lambda c: not c.imatrix,
    "no imatrix, first 1/8": lambda c: not c.imatrix and c.i < c.n // 8,
}

Rules = dict[str, tuple[tuple[str, Q], ...]]   # role -> ((condition, type), …): the first true condition wins


@dataclass(frozen=True)
class Mix:
    ftype: str
    default: Q
    rules: Rules = field(default_factory=dict)
    output: Q | None = None     # the output head's type (and a tied token_embd's); None: Q6_K (Q8_0 for Q8_0)
    bump_70b: bool = True       # whether 70B models bump attn_v (BUMP_70B)


def _mix(ftype: str, default: Q, output: Q | None = None, bump_70b: bool = True,
         **rules: tuple[tuple[str, Q], ...]) -> Mix:
    return Mix(ftype, default, dict(rules), output, bump_70b)


MIXES: dict[str, Mix] = {m.ftype: m for m in (
    _mix("Q2_K", Q.Q2_K, attn_v=(("gqa>=4", Q.Q4_K), ("", Q.Q3_K)), ffn_down=(("", Q.Q3_K),),
         attn_output=(("", Q.Q3_K),)),
    _mix("Q2_K_S", Q.Q2_K, attn_v=(("gqa>=4", Q.Q4_K),), ffn_down=(("first 1/8", Q.Q4_K),)),
    _mix("Q3_K_S", Q.Q3_K),
    _mix("Q3_K_M", Q.Q3_K, attn_v=(("first 2", Q.Q5_K), ("", Q.Q4_K)),
         ffn_down=(("first 1/16", Q.Q5_K), ("", Q.Q4_K)), attn_output=(("", Q.Q4_K),)),
    _mix("Q3_K_L", Q.Q3_K, attn_v=(("", Q.Q5_K),), ffn_down=(("", Q.Q5_K),), attn_output=(("", Q.Q5_K),)),
    _mix("Q4_K_S", Q.Q4_K, attn_v=(("first 4", Q.Q5_K),), ffn_down=(("first 1/8", Q.Q5_K),)),
    _mix("Q4_K_M", Q.Q4_K, attn_v=(("more bits", Q.Q6_K),), ffn_down=(("more bits", Q.Q6_K),)),
    _mix("Q5_K_S", Q.Q5_K),
    _mix("Q5_K_M", Q.Q5_K, attn_v=(("more bits", Q.Q6_K),), ffn_down=(("more bits", Q.Q6_K),)),
    _mix("Q6_K", Q.Q6_K),
    _mix("Q8_0", Q.Q8_0),
    _mix("Q4_0", Q.Q4_0, ffn_down=(("imatrix, first 1/8", Q.Q4_1),)),
    _mix("Q4_1", Q.Q4_1),
    _mix("Q5_0", Q.Q5_0, ffn_down=(("imatrix, first 1/8", Q.Q5_1),)),
    _mix("Q5_1", Q.Q5_1),
    # 1- and 2-bit i-quants: one rule set (attn_v, the first eighth of ffn_down, attn_output and token_embd get a
    # larger type; Q5_K output), and no 70B bump
    _mix("IQ2_XXS", Q.IQ2_XXS, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.Q2_K),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.Q2_K)), ffn_down=(("first 1/8 tensors", Q.Q2_K),)),
    _mix("IQ2_XS", Q.IQ2_XS, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.Q2_K),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.Q2_K)), ffn_down=(("first 1/8 tensors", Q.Q2_K),)),
    _mix("IQ2_S", Q.IQ2_XS, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.IQ3_S),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.IQ3_S)), ffn_down=(("first 1/8 tensors", Q.IQ3_S),),
         attn_output=(("", Q.IQ3_S),)),
    _mix("IQ2_M", Q.IQ2_S, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.IQ3_S),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.IQ3_S)), ffn_down=(("first 1/8 tensors", Q.IQ3_S),),
         attn_output=(("", Q.IQ3_S),)),
    _mix("IQ1_S", Q.IQ1_S, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.Q2_K),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.Q2_K)), ffn_down=(("first 1/8 tensors", Q.Q2_K),),
         attn_output=(("", Q.IQ2_XXS),)),
    _mix("IQ1_M", Q.IQ1_M, output=Q.Q5_K, bump_70b=False, token_embd=(("", Q.Q2_K),),
         attn_v=(("gqa>=4 or experts>=4", Q.Q4_K), ("", Q.Q2_K)), ffn_down=(("first 1/8 tensors", Q.Q2_K),),
         attn_output=(("", Q.IQ2_XXS),)),
    # 3- and 4-bit i-quants
    _mix("IQ3_XXS", Q.IQ3_XXS, output=Q.Q5_K, token_embd=(("", Q.IQ3_S),),
         attn_v=(("gqa>=4", Q.Q4_K), ("no imatrix", Q.IQ3_S)), attn_k=(("", Q.IQ2_S),), attn_q=(("", Q.IQ2_S),),
         ffn_down=(("no imatrix, first 1/8", Q.Q4_K), ("no imatrix", Q.Q3_K)), attn_output=(("", Q.IQ3_S),)),
    _mix("IQ3_XS", Q.IQ3_S, attn_v=(("gqa>=4", Q.Q4_K),), attn_k=(("", Q.IQ3_XXS),), attn_q=(("", Q.IQ3_XXS),),
         ffn_gate=(("not first/last 1/8", Q.IQ3_XXS),), ffn_up=(("not first/last 1/8", Q.IQ3_XXS),)),
    _mix("IQ3_S", Q.IQ3_S, attn_v=(("gqa>=4", Q.Q4_K),)),
    _mix("IQ3_M", Q.IQ3_S, attn_v=(("", Q.Q4_K),), ffn_down=(("first 1/8, or 8 experts and more bits", Q.Q4_K),),
         attn_output=(("", Q.Q4_K),)),
    _mix("IQ4_NL", Q.IQ4_NL, attn_v=(("gqa>=4", Q.Q5_K),), ffn_down=(("no imatrix, first 1/8", Q.Q5_K),)),
    _mix("IQ4_XS", Q.IQ4_XS, attn_v=(("gqa>=4", Q.Q5_K),), ffn_down=(("no imatrix, first 1/8", Q.Q5_K),)),
    # 1-bit signs (128-blocks; llama.cpp defines no fallback for them: rows must be multiples of 128)
    _mix("Q1_0", Q.Q1_0),
    # 2-bit {-1, 0, 1, 2}·d in 64-blocks (rows of 576, 896, 4864 fit); token_embd Q4_K as for the ternary types
    _mix("Q2_0", Q.Q2_0, token_embd=(("", Q.Q4_K),)),
    # ternary
    _mix("TQ1_0", Q.TQ1_0, token_embd=(("", Q.Q4_K),)),
    _mix("TQ2_0", Q.TQ2_0, token_embd=(("", Q.Q4_K),)),
)}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}   # llama-quantize's names
# llama.cpp's branch for the 1- and 2-bit i-quants, and the ftypes whose attn_output an 8-expert model raises to Q5_K
IQ2_GROUP = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
EIGHT_EXPERTS_Q5_K_OUTPUT = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                             "IQ3_M", "IQ4_XS"}
LLAMA_CPP_FTYPES = tuple(MIXES)

# roles whose rules count their tensors, and the total each counts against
COUNTED: dict[str, Callable[[ModelSpec, Sequence[TensorRef]], int]] = {
    ATTN_V: lambda spec, refs: sum(r.role == ATTN_V and r.name.endswith(".weight") for r in refs),
    FFN_DOWN: lambda spec, refs: spec.n_layers,
    FFN_GATE: lambda spec, refs: spec.n_layers,
    FFN_UP: lambda spec, refs: spec.n_layers,
}

# llama.cpp's "70B" model type, per architecture, and what it changes
IS_70B: dict[str, Callable[[ModelSpec], bool]] = {
    "llama": lambda s: s.n_layers == 80 and s.n_heads != s.n_kv_heads,
    "qwen2": lambda s: s.n_layers == 80,
}
BUMP_70B: dict[str, dict[Q, Q]] = {ATTN_V: {Q.Q3_K: Q.Q5_K, Q.Q4_K: Q.Q5_K}}


def get_mix(text: str) -> Mix:
    """`llama.cpp:Q4_K_M` (or just `Q4_K_M`; llama-quantize's aliases Q3_K/Q4_K/Q5_K too) -> its `Mix`."""
    s = str(text).strip()
    if s.lower().startswith("llama.cpp:"):
        s = s.split(":", 1)[1]
    s = ALIASES.get(s.upper(), s.upper())
    if s not in MIXES:
        raise TwinquantError(f"unknown mix {text!r}; choose twinquant:Q2_K or llama.cpp:FTYPE with FTYPE one of "
                             f"{', '.join(LLAMA_CPP_FTYPES)}")
    return MIXES[s]


def output_type(default: Q, cols: int, mix_output: Q | None = None) -> tuple[Q, str]:
    """llama.cpp's type for the output head (and a tied token_embd): the mix's (Q5_K), Q6_K, or Q8_0."""
    if cols % block_size(default):
        return Q.Q8_0, f"Q8_0 ({cols} not divisible by {block_size(default)})"
    if mix_output is not None:
        return mix_output, mix_output.name
    return (Q.Q8_0, "Q8_0") if default == Q.Q8_0 else (Q.Q6_K, "Q6_K")


# --- assignment -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TypeChoice:
    name: str
    type: TensorType
    rule: str                                   # which rule chose the type, for --dry-run
    fallback_from: TensorType | None = None     # the type the rules chose, when the row forced a fallback

    @property
    def fell_back(self) -> bool:
        return self.fallback_from is not None


@dataclass(frozen=True)
class Override:
    pattern: str
    regex: re.Pattern
    type: TensorType

    @property
    def text(self) -> str:
        return f"{self.pattern}={type_name(self.type)}"


def parse_override(text: str) -> Override:
    """`REGEX=TYPE` as llama-quantize reads `--tensor-type`: split at the first '=', the regex lower-cased."""
    pattern, sep, tname = str(text).partition("=")
    if not sep:
        raise TwinquantError(f"--tensor-type {text!r}: expected REGEX=TYPE")
    if not pattern:
        raise TwinquantError(f"--tensor-type {text!r}: missing tensor name pattern")
    if not tname:
        raise TwinquantError(f"--tensor-type {text!r}: missing type")
    pattern = pattern.lower()
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise TwinquantError(f"--tensor-type {text!r}: bad regular expression ({e})") from None
    return Override(pattern, rx, parse_type(tname))


class _Rules:
    """llama.cpp's mix rules for one model, with the counters they keep."""

    def __init__(self, spec: ModelSpec, mix: Mix, base: Q, refs: Sequence[TensorRef], imatrix: bool):
        if spec.arch not in ARCHITECTURES:
            raise TwinquantError(f"llama.cpp mixes are reproduced for {', '.join(ARCHITECTURES)}, not {spec.arch!r}")
        self.spec, self.mix, self.base, self.imatrix = spec, mix, base, imatrix
        self.label = f"llama.cpp:{mix.ftype}"
        self.tied = all(r.name != OUTPUT_NAME for r in refs)
        self.totals = {role: total(spec, refs) for role, total in COUNTED.items()}
        self.seen = dict.fromkeys(COUNTED, 0)
        self.bump = BUMP_70B if mix.bump_70b and IS_70B.get(spec.arch, lambda s: False)(spec) else {}

    def choose(self, ref: TensorRef, output_override: TensorType | None) -> tuple[TensorType, str]:
        if ref.role == OUTPUT or (self.tied and ref.role == TOKEN_EMBD):
            what = "token_embd (tied: output rule)" if ref.role == TOKEN_EMBD else "output"
            if output_override is not None:
                return output_override, f"output-tensor-type {type_name(output_override)} ({what})"
            t, why = output_type(self.base, ref.shape[-1], self.mix.output)
            return t, f"{self.label} {what} {why}"
        t, rule = self.base, f"{self.label} default"
        role, s = category(ref.role), self.spec
        gqa = s.n_heads if s.mla else s.n_heads // s.n_kv_heads     # llama.cpp sees latent attention as 1 kv head
        if role in COUNTED:
            count = self.seen[role]
            # with experts llama.cpp reads the layer from the name (its ffn tensors are not one per layer)
            i = ref.layer if s.n_experts > 1 and role != ATTN_V else count
            ctx = RuleContext(i, self.totals[role], gqa, self.imatrix, s.n_experts, count)
            self.seen[role] += 1
        else:
            ctx = RuleContext(0, 0, gqa, self.imatrix, s.n_experts)
        for cond, ct in self.mix.rules.get(role, ()):
            if CONDITIONS[cond](ctx):
                t, rule = ct, f"{self.label} {role}" + (f" {cond}" if cond else "")
                break
        if t in self.bump.get(role, {}):
            t, rule = self.bump[role][t], f"{rule}, 70B bump"
        if s.n_experts == 8 and role in (ATTN_V, ATTN_K, ATTN_OUT):
            t, rule = self._eight_experts(role, t, rule)
        return t, rule

    def _eight_experts(self, role: str, t: Q, rule: str) -> tuple[Q, str]:
        """llama.cpp's rules for 8-expert models, which replace the others for these roles."""
        iq2, ftype = self.mix.ftype in IQ2_GROUP, self.mix.ftype
        if role == ATTN_V:
            return (t, rule) if iq2 else (Q.Q8_0, f"{self.label} attn_v, 8 experts")
        if role == ATTN_K:
            return (Q.Q4_K if iq2 else Q.Q8_0), f"{self.label} attn_k, 8 experts"
        if iq2 or ftype in EIGHT_EXPERTS_Q5_K_OUTPUT:
            return Q.Q5_K, f"{self.label} attn_output, 8 experts"
        return self.base, f"{self.label} default (attn_output, 8 experts)"


def assign_types(spec: ModelSpec, tensor_names: Iterable[str], mix: str | None = "llama.cpp:Q2_K",
                 default: str | None = None, overrides: Sequence[str] = (), output_type: str | None = None,
                 embedding_type: str | None = None, pure: bool = False, imatrix: bool = False) -> list[TypeChoice]:
    """The type of every tensor of `tensor_names` (in that order), as llama-quantize would choose it.

    mix: `llama.cpp:FTYPE` (its rules and default type) or None (no rules: `default` everywhere); twinquant's own
    mixes (`twinquant:FTYPE`) are role_mix.assign's;
    default: the base type instead of the mix's (required without a mix); overrides: `REGEX=TYPE` strings, the
    first regex found in the name wins; output_type / embedding_type: llama-quantize's --output-tensor-type /
    --token-embedding-type; pure: no mix rules; imatrix: whether an importance matrix will be used (Q4_0/Q5_0).
    """
    names = list(tensor_names)
    refs = [parse_tensor(spec, n) for n in names]
    the_mix = get_mix(mix) if mix else None
    if default is None and the_mix is None:
        raise TwinquantError("give a mix (e.g. llama.cpp:Q2_K) or a default type (e.g. Q4_K)")
    base = parse_type(default) if default is not None else the_mix.default
    rules = None
    if the_mix is not None and not pure:
        if isinstance(base, str) or base in _FLOAT_TYPES:
            raise TwinquantError(f"llama.cpp mix rules need a GGML block type as the default, not {type_name(base)}")
        rules = _Rules(spec, the_mix, base, refs, imatrix)
    plain = f"pure {type_name(base)}" if pure else f"default {type_name(base)}"
    pats = [parse_override(o) for o in overrides]
    out_t = parse_type(output_type) if output_type else None
    emb_t = parse_type(embedding_type) if embedding_type else None

    chosen: dict[str, TypeChoice] = {}
    for ref in sorted(refs, key=lambda r: r.order):       # the rules count tensors in llama.cpp's order
        if not ref.quantizable:
            chosen[ref.name] = TypeChoice(ref.name, Q.F32, "not quantized (1-D or router)")
            continue
        hit = next((p for p in pats if p.regex.search(ref.name)), None)
        if ref.role == TOKEN_EMBD and emb_t is not None:
            t, rule = emb_t, f"token-embedding-type {type_name(emb_t)}"
        elif ref.role == OUTPUT and out_t is not None:
            t, rule = out_t, f"output-tensor-type {type_name(out_t)}"
        elif hit is not None:
            t, rule = hit.type, f"override {hit.text}"
        elif rules is not None:
            t, rule = rules.choose(ref, out_t)
        else:
            t, rule = base, plain
        cols = ref.shape[-1]
        fb = fallback_type(t, cols)
        if fb != t:
            chosen[ref.name] = TypeChoice(ref.name, fb, f"{rule}; fallback: {cols} not divisible by "
                                          f"{block_size(t)} -> {type_name(fb)}", fallback_from=t)
        else:
            chosen[ref.name] = TypeChoice(ref.name, t, rule)
    return [chosen[n] for n in names]


def llama_cpp_mix(spec: ModelSpec, ftype: str, tensor_names: Iterable[str],
                  imatrix: bool = False) -> dict[str, TensorType]:
    """The types stock llama-quantize picks for `ftype` (e.g. "Q4_K_M"), per tensor name."""
    return {c.name: c.type for c in assign_types(spec, tensor_names, mix=f"llama.cpp:{ftype}", imatrix=imatrix)}


# types llama.cpp refuses to write without an importance matrix (but in token_embd / output), and Q2_K in Q2_K_S
IMATRIX_TYPES = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS})
IMATRIX_MIX_TYPES: dict[str, frozenset] = {"Q2_K_S": frozenset({Q.Q2_K})}


def needs_imatrix(choices: Iterable[TypeChoice], mix: str | None = None) -> list[str]:
    """The tensors of `choices` that llama.cpp would refuse to quantize without an importance matrix.

    mix: the mix the choices came from (`llama.cpp:Q2_K_S` makes its Q2_K tensors need one too).
    """
    if mix and mix.lower().startswith("twinquant:"):      # sized against (and falling back to) llama.cpp:FTYPE
        mix = "llama.cpp:" + mix.split(":", 1)[1]
    extra = IMATRIX_MIX_TYPES.get(get_mix(mix).ftype, frozenset()) if mix else frozenset()
    return [c.name for c in choices if c.name not in (roles.name(roles.T.TOKEN_EMBD), OUTPUT_NAME)
            and (c.type in IMATRIX_TYPES or c.type in extra)]
