"""Per-tensor type mixes: rules, overrides and fallbacks, with stock llama.cpp's quantizer as the oracle.

Tiny random models (8 layers, so the use_more_bits schedule shows; one of 17 layers for n//16 and layers past 9)
are written as F32 GGUFs once, quantized by llama.cpp's `llama_model_quantize` (llama-cpp-python's binding), and
the type of every tensor in its output is compared with ours. Hidden 256 rows divide every block; hidden 192 rows
need the 32-block fallbacks (IQ* -> IQ4_NL); hidden 200 rows need F16. llama.cpp's i-quant codecs are slow, so
only a few i-quant files are written for real; every ftype on every model, with and without an imatrix, is
compared with llama.cpp's dry run (the same type choice, read from its log, without quantizing), which also
says whether llama.cpp would refuse to quantize without an imatrix.
"""

from __future__ import annotations

import ctypes
import re

import gguf
import pytest

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.spec import ModelSpec
from twinquant.allocation import mixes
from twinquant.allocation.mixes import assign_types, fallback_type, llama_cpp_mix, needs_imatrix

Q = gguf.GGMLQuantizationType

# name: (tiny_models family, config overrides); intermediate 512 keeps ffn_down rows whole 256-blocks
MODELS = {
    "llama-256": ("llama", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "llama-tied-192-gqa4": ("llama-tied", dict(hidden_size=192, num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=48)),
    "llama-200": ("llama", dict(hidden_size=200, num_attention_heads=4, num_key_value_heads=2, head_dim=50)),
    "qwen2-192": ("qwen2", dict(hidden_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=48)),
    "qwen2-tied-256-gqa4": ("qwen2", dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                                          head_dim=32, tie_word_embeddings=True)),
    "qwen3-tied-256": ("qwen3", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                     tie_word_embeddings=True)),
    "qwen3-192": ("qwen3", dict(hidden_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen2-17L-gqa4": ("qwen2", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                     num_hidden_layers=17)),
    # mixture of experts: 8 experts (llama.cpp's Mixtral rules), 4 (the i-quants' attn_v rule); a shared expert
    # whose ffn_down counts beside the experts' (the i-quants' first-eighth ffn_down counts tensors); 17 layers
    "qwen3moe-8e-256": ("qwen3moe", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                         num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256)),
    "qwen2moe-4e-17L-shexp": ("qwen2moe", dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                               head_dim=64, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                               num_hidden_layers=17)),
    "qwen2moe-16e-192": ("qwen2moe", dict(hidden_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
                                          num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                                          shared_expert_intermediate_size=256)),
}
BASE = dict(intermediate_size=512, num_hidden_layers=8, vocab=320)

CORE_FTYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]    # on every model
MORE_FTYPES = ["Q3_K_L", "Q4_K_S", "Q5_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]     # on a 256, a 192 and a 17-layer one
MORE_MODELS = ["llama-256", "qwen2-192", "qwen2-17L-gqa4"]
IMATRIX_FTYPES = ["Q2_K_S", "Q4_0", "Q5_0"]    # Q2_K_S needs an imatrix; Q4_0 / Q5_0 change with one
IMATRIX_MODELS = ["qwen2-192", "qwen2-17L-gqa4"]
# i-quants and ternary types written for real: llama.cpp's i-quant codecs are slow (IQ1_* alone spends ~12 s of
# CPU building its grid), so most run on the 192 model, where only ffn_down (rows of 512) keeps its i-quant and
# the rest falls back (IQ* -> IQ4_NL); every ftype on every model, with and without an imatrix, is checked by
# test_plan_matches_llama_cpp_dry_run instead (the same llama.cpp type choice, without quantizing)
IQ_CASES = ([("qwen2-192", f, True) for f in ["IQ2_XXS", "IQ2_S", "IQ4_NL"]]
            + [("qwen3-192", "IQ2_M", True)]                                  # attn_output rows 256: IQ3_S
            + [("qwen2-192", f, False) for f in ["IQ3_XXS", "IQ3_XS", "TQ1_0", "TQ2_0"]]   # no imatrix-only type
            + [("llama-256", f, False) for f in ["IQ3_M", "IQ4_XS"]])


# --- llama.cpp as the oracle ------------------------------------------------------------------------------------
class F32Models:
    """F32 GGUFs of the tiny models, built on first use."""

    def __init__(self, root):
        self.root, self.built = root, {}

    def get(self, key: str):
        if key not in self.built:
            from twinquant.io.gguf_write import write_gguf
            from twinquant.io.hf import load_hf_dir

            family, over = MODELS[key]
            hf = save_tiny(family, self.root / key, tokenizer=True, **{**BASE, **over})
            model = load_hf_dir(hf)
            path = write_gguf(model, self.root / f"{key}.f32.gguf", "F32")
            self.built[key] = (model.spec, model.tensor_names(), path)
        return self.built[key]


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    import llama_cpp._logger as lcl

    level = lcl.logger.level
    lcl.set_verbose(False)          # llama.cpp's quantizer logs every tensor; keep errors only
    yield F32Models(tmp_path_factory.mktemp("mixes"))
    lcl.logger.setLevel(level)


def llama_quantize(src, dst, ftype: str, imatrix: bool = False, overrides=(), pure=False, output_type=None,
                   embedding_type=None, must_succeed: bool = True) -> dict[str, Q] | None:
    """Quantize with stock llama.cpp; the type of each tensor of the result (None if it refused)."""
    rc = _llama_model_quantize(src, dst, ftype, imatrix, overrides, pure, output_type, embedding_type)
    if rc != 0 and not must_succeed:
        return None
    assert rc == 0, f"llama.cpp failed to quantize {src} to {ftype}"
    return {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(dst).tensors}


# llama.cpp's dry run logs, per tensor: "[  12/  99]  blk.0.attn_v.weight  - [ 256, 128, 1, 1], type =    f32,
# size =   0.125 MiB ->   0.018 MiB (iq2_xxs)" — no "(type)" when the tensor keeps its type
_DRY_RUN_LINE = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^\n(]*(?:\((\w+)\))?")
_DRY_RUN_NEEDS_IMATRIX = "will require an imatrix"


class NoFallback(Exception):
    """llama.cpp refused the model: a row is no whole number of the type's blocks and the type has no fallback."""


def llama_plan(src, ftype: str, imatrix: bool = False) -> tuple[dict[str, Q], bool]:
    """llama.cpp's types without quantizing (its dry run, read from its log), and whether it says an imatrix is
    needed. The same `llama_tensor_get_type` as a real run: seconds for every ftype on every model."""
    import llama_cpp
    import llama_cpp._logger as lcl

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        chunks.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        rc = _llama_model_quantize(src, None, ftype, imatrix, dry_run=True)
    finally:
        llama_cpp.llama_log_set(lcl.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(chunks)
    if rc != 0 and "no tensor type fallback is defined" in log:
        raise NoFallback(log[-300:])
    assert rc == 0, f"llama.cpp's dry run of {ftype} on {src} failed:\n{log[-2000:]}"
    types = {m.group(1): Q[(m.group(3) or m.group(2)).upper()] for m in _DRY_RUN_LINE.finditer(log)}
    return types, _DRY_RUN_NEEDS_IMATRIX in log


_IMATRICES: dict[str, tuple] = {}     # source path -> (pointer, the arrays it points into: kept alive)


def _flat_imatrix(src: str):
    """A flat importance matrix for every 2-D tensor of `src`: only its presence matters. Built once per file."""
    import llama_cpp

    if src in _IMATRICES:
        return _IMATRICES[src][0]
    src_tensors = [t for t in gguf.GGUFReader(src).tensors if len(t.shape) == 2]
    arr = (llama_cpp.llama_model_imatrix_data * (len(src_tensors) + 1))()
    keep = []
    for i, t in enumerate(src_tensors):
        n = int(t.shape[0])
        data = (ctypes.c_float * n)(*([1.0] * n))
        keep += [t.name.encode(), data]
        arr[i].name, arr[i].data, arr[i].size = keep[-2], ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), n
    arr[len(src_tensors)].name = None
    _IMATRICES[src] = (ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), arr, keep)
    return _IMATRICES[src][0]


def _llama_model_quantize(src, dst, ftype: str, imatrix: bool = False, overrides=(), pure=False, output_type=None,
                          embedding_type=None, dry_run: bool = False) -> int:
    """llama.cpp's `llama_model_quantize` with these options; its return code (0: done)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.dry_run = dry_run
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = 2
    p.pure = pure
    if output_type:
        p.output_tensor_type = int(Q[output_type])
    if embedding_type:
        p.token_embedding_type = int(Q[embedding_type])
    keep = []
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, o in enumerate(overrides):
            ov = mixes.parse_override(o)
            keep.append(ov.pattern.encode())
            arr[i].pattern, arr[i].type = keep[-1], int(ov.type)
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    if imatrix:
        p.imatrix = _flat_imatrix(str(src))
    return llama_cpp.llama_model_quantize(str(src).encode(), str(dst or "").encode(), ctypes.byref(p))


def assert_same(ours: dict, theirs: dict):
    assert set(ours) == set(theirs)
    diff = {n: (ours[n].name, theirs[n].name) for n in theirs if ours[n] != theirs[n]}
    assert not diff, f"(ours, llama.cpp) differ: {diff}"


CASES = ([(m, f, False) for m in MODELS for f in CORE_FTYPES]
         + [(m, f, False) for m in MORE_MODELS for f in MORE_FTYPES]
         + [(m, f, True) for m in IMATRIX_MODELS for f in IMATRIX_FTYPES]
         + IQ_CASES + [("llama-256", "Q1_0", False), ("qwen2-tied-256-gqa4", "Q1_0", True)]
         + [("llama-256", "Q2_0", False), ("qwen2-192", "Q2_0", True), ("qwen3-tied-256", "Q2_0", False)])


@pytest.mark.parametrize("model,ftype,imatrix", CASES, ids=[f"{m}-{f}{'-imatrix' if i else ''}" for m, f, i in CASES])
def test_mix_matches_llama_cpp(f32_models, tmp_path, model, ftype, imatrix):
    spec, names, src = f32_models.get(model)
    theirs = llama_quantize(src, tmp_path / "q.gguf", ftype, imatrix=imatrix)
    assert_same(llama_cpp_mix(spec, ftype, names, imatrix=imatrix), theirs)
    if not imatrix:                 # llama.cpp wrote it without one: nothing needed one
        choices = assign_types(spec, names, mix=f"llama.cpp:{ftype}")
        assert needs_imatrix(choices, f"llama.cpp:{ftype}") == []


PLAN_CASES = [(m, f) for m in MODELS for f in mixes.LLAMA_CPP_FTYPES]


@pytest.mark.parametrize("model,ftype", PLAN_CASES, ids=[f"{m}-{f}" for m, f in PLAN_CASES])
def test_plan_matches_llama_cpp_dry_run(f32_models, model, ftype):
    """Every ftype on every model, with and without an imatrix; and whether llama.cpp would need an imatrix."""
    spec, names, src = f32_models.get(model)
    for imatrix in (False, True):
        try:
            theirs, needed = llama_plan(src, ftype, imatrix=imatrix)
        except NoFallback:      # Q1_0 on rows that are no multiple of 128: both refuse the model
            with pytest.raises(TwinquantError, match="no fallback type is defined"):
                llama_cpp_mix(spec, ftype, names, imatrix=imatrix)
            continue
        assert_same(llama_cpp_mix(spec, ftype, names, imatrix=imatrix), theirs)
        if not imatrix:
            ours = needs_imatrix(assign_types(spec, names, mix=f"llama.cpp:{ftype}"), f"llama.cpp:{ftype}")
            assert bool(ours) == needed, f"llama.cpp {'needs' if needed else 'does not need'} an imatrix; {ours}"


# llama.cpp refuses these without an imatrix (it checks every tensor's type before quantizing any: fast)
REFUSED = [("llama-256", f) for f in ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS",
                                      "Q2_K_S"]] + [("qwen2-192", "IQ2_XXS"), ("qwen2-192", "Q2_K_S")]


@pytest.mark.parametrize("model,ftype", REFUSED, ids=[f"{m}-{f}" for m, f in REFUSED])
def test_needs_imatrix_matches_llama_cpp(f32_models, tmp_path, model, ftype):
    spec, names, src = f32_models.get(model)
    assert llama_quantize(src, tmp_path / "q.gguf", ftype, must_succeed=False) is None
    needed = needs_imatrix(assign_types(spec, names, mix=f"llama.cpp:{ftype}"), f"llama.cpp:{ftype}")
    assert needed and not {"token_embd.weight", "output.weight"} & set(needed)


OPTION_CASES = {
    # overridden attn_v tensors do not advance llama.cpp's counter: blk.4's attn_v counts as the first
    "overrides-shift-counter": ("llama-256", "Q4_K_M", dict(overrides=[r"blk\.[0-3]\.attn_v=q8_0", "ffn_down=Q5_K",
                                                                       "attn_k=f16", "ATTN_Q=Q4_K"])),
    "overrides-fallback": ("qwen2-192", "Q3_K_M", dict(overrides=[r"blk\.[0-2]\.ffn_(up|gate)=q6_k", "attn_v=q5_1"])),
    "pure": ("qwen3-192", "Q3_K_M", dict(pure=True)),
    "pure-tied": ("qwen3-tied-256", "Q4_K_M", dict(pure=True)),
    "output-and-embedding": ("llama-256", "Q2_K", dict(output_type="Q5_K", embedding_type="Q4_K")),
    "tied-output-type": ("llama-tied-192-gqa4", "Q4_K_M", dict(output_type="Q5_K")),   # -> token_embd, Q5_1
    "tied-override-beats-output-type": ("qwen2-tied-256-gqa4", "Q3_K_S",
                                        dict(output_type="Q8_0", overrides=["token_embd=q4_k"])),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_llama_cpp(f32_models, tmp_path, case):
    model, ftype, opts = OPTION_CASES[case]
    spec, names, src = f32_models.get(model)
    theirs = llama_quantize(src, tmp_path / "q.gguf", ftype, **opts)
    choices = assign_types(spec, names, mix=f"llama.cpp:{ftype}", overrides=opts.get("overrides", ()),
                           output_type=opts.get("output_type"), embedding_type=opts.get("embedding_type"),
                           pure=opts.get("pure", False))
    assert_same({c.name: c.type for c in choices}, theirs)


# --- rules without llama.cpp --------------------------------------------------------------------------------------
def spec_of(arch="llama", n_layers=30, hidden=576, inter=1536, heads=9, kv=3, head_dim=64, tied=True):
    return ModelSpec(arch, n_layers, hidden, inter, heads, kv, head_dim, 49152, 1e4, 1e-5, tied,
                     arch == "qwen2", arch == "qwen3")


def by_name(choices):
    return {c.name: c for c in choices}


def test_fallbacks():
    assert fallback_type(Q.Q2_K, 576) == Q.Q4_0
    assert fallback_type(Q.Q3_K, 896) == Q.Q4_0
    assert fallback_type(Q.Q4_K, 576) == Q.Q5_0
    assert fallback_type(Q.Q5_K, 576) == Q.Q5_1
    assert fallback_type(Q.Q6_K, 576) == Q.Q8_0
    assert fallback_type(Q.IQ2_XS, 576) == Q.IQ4_NL
    assert fallback_type(Q.Q4_K, 1536) == Q.Q4_K
    assert fallback_type(Q.Q4_K, 200) == Q.F16          # not even the 32-block fallback fits
    assert fallback_type(Q.Q8_0, 200) == Q.F16
    assert fallback_type(Q.Q8_0, 96) == Q.Q8_0
    with pytest.raises(TwinquantError):
        fallback_type(Q.Q8_K, 100)                      # llama.cpp defines no fallback for it


def test_smollm2_like_q2_k_records_fallbacks():
    spec = spec_of()                                    # SmolLM2-135M: hidden 576, tied, 9 / 3 heads
    c = by_name(assign_types(spec, roles.all_tensor_names(spec), "llama.cpp:Q2_K"))
    assert c["token_embd.weight"].type == Q.Q8_0 and not c["token_embd.weight"].fell_back
    assert "tied" in c["token_embd.weight"].rule
    q = c["blk.0.attn_q.weight"]
    assert q.type == Q.Q4_0 and q.fallback_from == Q.Q2_K and "fallback: 576 not divisible by 256" in q.rule
    v = c["blk.3.attn_v.weight"]                        # gqa 3 < 4: Q3_K, then its fallback
    assert v.type == Q.Q4_0 and v.fallback_from == Q.Q3_K and v.rule.startswith("llama.cpp:Q2_K attn_v")
    down = c["blk.0.ffn_down.weight"]                   # rows of 1536 = 6 blocks
    assert down.type == Q.Q3_K and not down.fell_back
    assert c["blk.0.attn_norm.weight"].type == Q.F32


def test_more_bits_schedule():
    spec = spec_of(hidden=512, n_layers=32, tied=False)
    c = by_name(assign_types(spec, roles.all_tensor_names(spec), "llama.cpp:Q4_K_M"))
    six = [i for i in range(32) if c[f"blk.{i}.attn_v.weight"].type == Q.Q6_K]
    assert six == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if c[f"blk.{i}.ffn_down.weight"].type == Q.Q6_K] == six
    assert c["blk.6.attn_v.weight"].rule == "llama.cpp:Q4_K_M attn_v more bits"
    assert c["output.weight"].type == Q.Q6_K and c["token_embd.weight"].type == Q.Q4_K


def test_order_of_names_does_not_matter():
    spec = spec_of(hidden=512, n_layers=12, tied=False)
    names = roles.all_tensor_names(spec)
    a = llama_cpp_mix(spec, "Q3_K_M", names)
    b = llama_cpp_mix(spec, "Q3_K_M", list(reversed(names)))
    assert a == b
    assert a["blk.0.attn_v.weight"] == a["blk.1.attn_v.weight"] == Q.Q5_K    # by layer, not blk.10 before blk.2
    assert a["blk.2.attn_v.weight"] == a["blk.10.attn_v.weight"] == Q.Q4_K


def test_70b_bump():
    llama70 = spec_of(n_layers=80, hidden=8192, inter=28672, heads=64, kv=8, head_dim=128, tied=False)
    c = by_name(assign_types(llama70, roles.all_tensor_names(llama70), "llama.cpp:Q3_K_S"))
    assert c["blk.40.attn_v.weight"].type == Q.Q5_K and "70B" in c["blk.40.attn_v.weight"].rule
    assert c["blk.40.attn_q.weight"].type == Q.Q3_K
    qwen3 = spec_of("qwen3", n_layers=80, hidden=8192, inter=28672, heads=64, kv=8, head_dim=128, tied=False)
    assert llama_cpp_mix(qwen3, "Q3_K_S", roles.all_tensor_names(qwen3))["blk.40.attn_v.weight"] == Q.Q3_K


def test_default_and_pure_rules():
    spec = spec_of()
    names = roles.all_tensor_names(spec)
    c = by_name(assign_types(spec, names, mix=None, default="q4_k"))
    assert c["blk.0.ffn_down.weight"].type == Q.Q4_K and c["blk.0.ffn_down.weight"].rule == "default Q4_K"
    assert c["token_embd.weight"].type == Q.Q5_0 and c["token_embd.weight"].fell_back
    c = by_name(assign_types(spec, names, "llama.cpp:Q6_K", pure=True, overrides=[r"blk\.\d+\.ffn_down=Q4_K"]))
    assert c["blk.5.ffn_down.weight"].type == Q.Q4_K
    assert c["blk.5.ffn_down.weight"].rule == r"override blk\.\d+\.ffn_down=Q4_K"
    assert c["blk.5.attn_v.weight"].type == Q.Q8_0 and c["blk.5.attn_v.weight"].rule.startswith("pure Q6_K")
    assert c["token_embd.weight"].type == Q.Q8_0                        # pure: no output rule, Q6_K falls back


def test_first_override_wins_and_options():
    spec = spec_of(hidden=512, tied=False)
    c = by_name(assign_types(spec, roles.all_tensor_names(spec), "Q4_K_M",
                             overrides=["attn_v=Q8_0", "blk.0.attn_v=F16"], output_type="q8_0",
                             embedding_type="Q6_K"))
    assert c["blk.0.attn_v.weight"].type == Q.Q8_0
    assert c["output.weight"].type == Q.Q8_0 and c["output.weight"].rule == "output-tensor-type Q8_0"
    assert c["token_embd.weight"].type == Q.Q6_K and c["token_embd.weight"].rule == "token-embedding-type Q6_K"


@pytest.mark.parametrize("kwargs,message", [
    (dict(overrides=["blk.(=Q4_K"]), "bad regular expression"),
    (dict(overrides=["attn_v=Q9_K"]), "unknown tensor type"),
    (dict(overrides=["attn_v"]), "REGEX=TYPE"),
    (dict(overrides=["=Q4_K"]), "missing tensor name"),
    (dict(overrides=["attn_v="]), "missing type"),
    (dict(mix="llama.cpp:Q7_K"), "unknown mix"),
    (dict(mix=None), "give a mix"),
    (dict(output_type="nope"), "unknown tensor type"),
    (dict(embedding_type="I32"), "unknown tensor type"),
])
def test_user_errors(kwargs, message):
    spec = spec_of()
    with pytest.raises(TwinquantError, match=re.escape(message)):
        assign_types(spec, roles.all_tensor_names(spec), **kwargs)


def test_unknown_tensor_name():
    with pytest.raises(TwinquantError):
        assign_types(spec_of(), ["blk.0.attn_zz.weight"])


def test_iq_rules_70b_and_schedules():
    llama70 = spec_of(n_layers=80, hidden=8192, inter=28672, heads=64, kv=8, head_dim=128, tied=False)
    names = roles.all_tensor_names(llama70)
    iq2 = by_name(assign_types(llama70, names, "llama.cpp:IQ2_XS"))       # the IQ1/IQ2 rules: no 70B bump
    assert iq2["blk.40.attn_v.weight"].type == Q.Q4_K and "70B" not in iq2["blk.40.attn_v.weight"].rule
    assert iq2["output.weight"].type == Q.Q5_K and iq2["token_embd.weight"].type == Q.Q2_K
    assert [i for i in range(80) if iq2[f"blk.{i}.ffn_down.weight"].type == Q.Q2_K] == list(range(10))
    iq3 = by_name(assign_types(llama70, names, "llama.cpp:IQ3_M"))
    assert iq3["blk.40.attn_v.weight"].type == Q.Q5_K and "70B" in iq3["blk.40.attn_v.weight"].rule
    xs = llama_cpp_mix(llama70, "IQ3_XS", names)
    assert [i for i in range(80) if xs[f"blk.{i}.ffn_up.weight"] == Q.IQ3_S] == [*range(10), *range(70, 80)]
    assert xs["blk.3.attn_q.weight"] == xs["blk.10.ffn_gate.weight"] == Q.IQ3_XXS
    assert xs["blk.9.ffn_gate.weight"] == xs["blk.3.ffn_down.weight"] == Q.IQ3_S
    xxs = llama_cpp_mix(spec_of(hidden=512, inter=1024, n_layers=16, tied=False), "IQ3_XXS",
                        roles.all_tensor_names(spec_of(hidden=512, inter=1024, n_layers=16, tied=False)))
    assert xxs["blk.0.attn_v.weight"] == Q.IQ3_S and xxs["blk.1.ffn_down.weight"] == Q.Q4_K    # no imatrix
    assert xxs["blk.2.ffn_down.weight"] == Q.Q3_K
