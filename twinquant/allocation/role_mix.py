"""twinquant's own type mixes: a llama.cpp mix's bytes, spent by role as a measured allocation spent them.

`twinquant:Q2_K` (the `default` recipe's mix) is sized against llama.cpp's Q2_K + imatrix mix of the same model and
never larger. On Qwen2.5-Coder-1.5B the measured allocation (`measure --cost fisher`, then the exact solver at
llama.cpp Q2_K's bytes: benchmarks/results/frontier_qwen15-q2k.md, 0.41x Q2_K + imatrix's KLD) spent those bytes
differently from llama-quantize: the output head at Q3_K, not Q6_K (it is a quarter of that file), and the bytes
freed went to attn_k / attn_v (Q5_K), attn_output (IQ4_XS), and 3-bit i-quants for attn_q, ffn_gate and ffn_up.
`ROLE_MIXES` states that choice as rules, so a model gets it without a measurement of its own:

* the rules below, as `--tensor-type` overrides after the user's own (which win), on top of llama.cpp's Q2_K mix;
* a model where the head is a smaller part of the file (7B: ~1.05x llama.cpp's bytes with every rule) gets
  ffn_gate / ffn_up back at Q2_K layer by layer (`demotion_order`: the layers llama.cpp's schedule gives no extra
  bits first, the middle first) until the file fits;
* where a rule cannot hold — a row that is not whole 256-blocks (576- and 896-wide models fall back to 4.5-bit
  types anyway), experts or latent attention (no measurement of those yet), no importance data (the i-quants
  need one), or no fit even with every layer demoted — the mix is llama.cpp's own, and the rule text says why.

The rules come from one model's measurement; benchmarks/quality.py judges them: on that model, GPTQ into this mix
without rotation has 0.44x the KL divergence of llama.cpp's Q2_K + imatrix file on wiki.test.raw and 0.42x on code,
at 0.994x its bytes (benchmarks/results/quality_qwen15-roles*.md). On other 256-aligned models they are unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


from twinquant.allocation import mixes as M
from twinquant.errors import TwinquantError
from twinquant.formats import tensor_bytes

Q = M.Q


@dataclass(frozen=True)
class RoleMix:
    name: str                                   # twinquant:NAME
    llama_cpp: str                              # the llama.cpp mix whose bytes it spends (and falls back to)
    rules: tuple[tuple[str, str, Q], ...]       # (role, condition in mixes.CONDITIONS' words, type): first wins
    output: Q                                   # the head (and a tied token_embd)
    token_embd: Q
    demote: tuple[str, ...]                     # roles given back to the llama.cpp mix's type, layer by layer


ROLE_MIXES: dict[str, RoleMix] = {m.name: m for m in (
    RoleMix("twinquant:Q2_K", "Q2_K",
            rules=((M.FFN_DOWN, "first 1/8", Q.Q4_K), (M.FFN_DOWN, "", Q.Q3_K), (M.FFN_GATE, "", Q.IQ3_XXS),
                   (M.FFN_UP, "", Q.IQ3_XXS), ("attn_q", "", Q.IQ3_XXS), (M.ATTN_K, "", Q.Q5_K),
                   (M.ATTN_V, "", Q.Q5_K), (M.ATTN_OUT, "", Q.IQ4_XS)),
            output=Q.Q3_K, token_embd=Q.Q3_K, demote=(M.FFN_GATE, M.FFN_UP)),
)}


def is_role_mix(mix: str | None) -> bool:
    return bool(mix) and str(mix).strip().lower().startswith("twinquant:")


def get_role_mix(text: str) -> RoleMix:
    key = "twinquant:" + str(text).strip().split(":", 1)[1].upper()
    if key not in ROLE_MIXES:
        raise TwinquantError(f"unknown mix {text!r}; twinquant's own: {', '.join(ROLE_MIXES)}")
    return ROLE_MIXES[key]


def demotion_order(n_layers: int) -> list[int]:
    """Layers in the order their ffn_gate / ffn_up go back to the base type: those llama.cpp's schedule gives no
    extra bits (`use_more_bits`) first, then the others, each group from the middle outwards."""
    return sorted(range(n_layers), key=lambda i: (M.use_more_bits(i, n_layers), abs(2 * i - (n_layers - 1)), i))


def _bytes(choices: Sequence[M.TypeChoice], refs: dict[str, M.TensorRef]) -> int:
    if any(isinstance(c.type, str) for c in choices):      # integer grids: not in a role mix's budget
        return -1
    return sum(tensor_bytes(c.type.name, refs[c.name].shape) for c in choices)


def _layer_regex(layers: Sequence[int], role: str) -> str:
    return rf"^blk\.({'|'.join(map(str, layers))})\.{role}\.weight$"


def assign(spec, names: Sequence[str], mix: str | None = "llama.cpp:Q2_K", default: str | None = None,
           overrides: Sequence[str] = (), output_type: str | None = None, embedding_type: str | None = None,
           pure: bool = False, imatrix: bool = False) -> list[M.TypeChoice]:
    """The type of every tensor of `names`: `mixes.assign_types` for llama.cpp's mixes (same arguments), the
    role rules for twinquant's own, the user's overrides and options applied first (see the module doc)."""
    names = list(names)
    if not is_role_mix(mix):
        return M.assign_types(spec, names, mix=mix, default=default, overrides=overrides, output_type=output_type,
                              embedding_type=embedding_type, pure=pure, imatrix=imatrix)
    if pure or default is not None:
        raise TwinquantError(f"{mix} is a mix of role rules: --pure and a single format do not apply to it")
    rm = get_role_mix(mix)
    base = f"llama.cpp:{rm.llama_cpp}"
    user = dict(overrides=list(overrides), output_type=output_type, embedding_type=embedding_type, imatrix=imatrix)
    plain = M.assign_types(spec, names, mix=base, **user)

    def llama_cpp(why: str) -> list[M.TypeChoice]:
        return [c if c.type == Q.F32 else M.TypeChoice(c.name, c.type, f"{c.rule} ({rm.name}: {why})", c.fallback_from)
                for c in plain]

    if spec.n_experts > 1 or spec.mla:
        return llama_cpp("no role rules for experts or latent attention yet")
    if not imatrix:
        return llama_cpp("its i-quants need importance data")
    refs = {n: M.parse_tensor(spec, n) for n in names}
    n, low = spec.n_layers, M.get_mix(base).default.name
    said: dict[str, str] = {}           # override text -> what the rule text says
    rules: list[str] = []
    for role, cond, t in rm.rules:
        layers = [i for i in range(n) if M.CONDITIONS[cond](M.RuleContext(i, n, 0, imatrix, 0, i))]
        if layers:
            rules.append(f"{_layer_regex(layers, role)}={t.name}")
            said[rules[-1]] = f"{rm.name} {role}" + (f" {cond}" if cond else "")
    budget = _bytes(plain, refs)
    if budget < 0:
        return llama_cpp("an integer-grid override has no GGML size to budget")
    tied = M.OUTPUT_NAME not in refs        # a tied token_embd is the head: the user's output type is its type
    emb = embedding_type or (None if tied and output_type else rm.token_embd.name)
    order = demotion_order(n) if rm.demote else []
    for k in range(len(order) + 1):
        demoted = [f"{_layer_regex(sorted(order[:k]), role)}={low}" for role in rm.demote] if k else []
        said.update({d: f"{rm.name} {role}, {k} of {n} layers back at {low} to fit"
                     for d, role in zip(demoted, rm.demote)})
        chosen = M.assign_types(spec, names, mix=base, overrides=[*overrides, *demoted, *rules],
                                output_type=output_type or rm.output.name,
                                embedding_type=emb, imatrix=imatrix)
        if any(c.fell_back for c in chosen):
            return llama_cpp("rows that are not whole 256-blocks")
        size = _bytes(chosen, refs)
        if 0 <= size <= budget:
            return [c if c.rule == p.rule else M.TypeChoice(c.name, c.type, _said(c.rule, rm, said), c.fallback_from)
                    for c, p in zip(chosen, plain)]
    return llama_cpp(f"larger than llama.cpp:{rm.llama_cpp} even with every layer's ffn_gate/up demoted")


def _said(rule: str, rm: RoleMix, said: dict[str, str]) -> str:
    """The dry-run text of a rule of ours (`override REGEX=TYPE` -> `twinquant:Q2_K attn_k`)."""
    if rule.startswith("override ") and rule[len("override "):] in said:
        return said[rule[len("override "):]]
    for opt, what in (("output-tensor-type", "output"), ("token-embedding-type", "token_embd")):
        if rule.startswith(opt):
            return f"{rm.name} {what}{rule[len(opt):]}"
    return rule
