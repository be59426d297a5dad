"""Recipes: validation, YAML files, command-line overrides, and the `twinquant.quant` record in the GGUF."""

import re
import subprocess
import sys

import pytest
import yaml

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.pipeline.recipe import BUILTIN, Recipe, load_recipe


def test_validation_rejects_impossible_recipes():
    with pytest.raises(TwinquantError, match="method"):
        Recipe(method="awq")
    with pytest.raises(TwinquantError, match="rotation"):
        Recipe(rotation="spin")
    with pytest.raises(TwinquantError, match="either a mix or a format"):
        Recipe(mix="llama.cpp:Q2_K", format="Q4_K")
    with pytest.raises(TwinquantError, match="give a mix"):
        Recipe(mix=None)
    with pytest.raises(TwinquantError, match="REGEX=TYPE"):
        Recipe(tensor_type=["ffn_down"])
    with pytest.raises(TwinquantError, match="unknown field.*bits"):
        Recipe.from_dict({"method": "rtn", "bits": 2})
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(TwinquantError, match="damp"):
            Recipe(damp=bad)
    with pytest.raises(TwinquantError, match="damp is str"):
        Recipe.from_dict({"damp": "lots"})
    assert Recipe.from_dict({"damp": 1}).damp == 1.0 and isinstance(Recipe.from_dict({"damp": 1}).damp, float)
    with pytest.raises(TwinquantError, match="calib_tokens"):
        Recipe(calib_tokens=0)


def test_default_calibration_grows_with_the_widest_input():
    from twinquant.calibration.windows import auto_tokens
    from twinquant.model.spec import ModelSpec

    def spec(h, f, q=None, experts=0, expert_ffn=0, shared_ffn=0, **mla):
        q = q or h
        hd = mla.pop("head_dim", None) or next(d for d in (128, 120, 64) if q % d == 0)
        heads = mla.pop("heads", None) or q // hd
        return ModelSpec("deepseek2" if mla else "qwen2moe" if experts else "qwen2", 4, h, f, heads, heads, hd, 100,
                         1e4, 1e-6, False, False, False, n_experts=experts, n_experts_used=min(experts, 8),
                         expert_ffn=expert_ffn, shared_ffn=shared_ffn, **mla)

    assert BUILTIN["default"].calib_tokens is None and BUILTIN["default"].damp == 0.5
    assert auto_tokens(spec(576, 1536)) == 8192                  # small models keep the floor
    assert auto_tokens(spec(1536, 8960)) == 17920                 # Qwen2.5-1.5B: 2 per ffn_down input
    assert auto_tokens(spec(5120, 27648)) == 55296                # 32B
    assert auto_tokens(spec(4096, 4100), ctx=512) == 8704         # whole windows
    assert auto_tokens(spec(2048, 1024, q=6000)) == 12288         # the widest input may be attn_output's
    # MoE: the experts' widths count, not the config's dense intermediate size (no linear has it)
    assert auto_tokens(spec(2048, 6144, q=4096, experts=128, expert_ffn=768)) == 8192        # Qwen3-30B-A3B
    assert auto_tokens(spec(2048, 5632, experts=60, expert_ffn=1408, shared_ffn=5632)) == 11264   # shared expert
    # DeepSeek-V3: its three dense blocks' FFN (18432) is the widest input; without them attn_output's (128 x 128)
    v3 = dict(heads=128, head_dim=192, q_lora_rank=1536, kv_lora_rank=512, rope_dim=64, v_head_dim=128, n_groups=8,
              groups_used=4, gating="sigmoid")
    assert auto_tokens(spec(7168, 18432, None, 256, 2048, 2048, n_dense_lead=3, **v3)) == 36864
    assert auto_tokens(spec(7168, 18432, None, 256, 2048, 2048, **v3)) == 32768


def test_yaml_file_round_trip_and_builtins(tmp_path):
    r = Recipe("mine", method="rtn", mix=None, format="Q4_K", tensor_type=["ffn_down=Q6_K"], rotation="rh")
    f = tmp_path / "mine.yaml"
    f.write_text(r.to_yaml())
    assert load_recipe(str(f)) == r
    f.write_text("method: rtn\nformat: Q3_K\nmix: null\n")
    assert load_recipe(str(f)).name == "mine" and load_recipe(str(f)).format == "Q3_K"
    f.write_text("method: [unclosed\n")
    with pytest.raises(TwinquantError, match="not a valid YAML recipe"):
        load_recipe(str(f))
    with pytest.raises(TwinquantError, match="no such recipe"):
        load_recipe(str(tmp_path / "missing.yaml"))
    # deep nesting is refused before PyYAML recurses into it (seconds to a RecursionError)
    for deep in ("seed: " + "[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 300))):
        f.write_text(deep)
        with pytest.raises(TwinquantError, match="nested too deeply"):
            load_recipe(str(f))
    assert load_recipe(None) is BUILTIN["default"]
    # rotation `auto`: none where fusing the final norm would untie the head (a second vocab x hidden matrix)
    assert BUILTIN["q2k-gptq-auto"].resolved_rotation(tied_embeddings=True) == "none"
    assert BUILTIN["q2k-gptq-auto"].resolved_rotation(tied_embeddings=False) == "rh"
    assert BUILTIN["default"].mix == "twinquant:Q2_K" and BUILTIN["default"].rotation == "none"
    assert r.replace(method=None, seed=3) == Recipe("mine", method="rtn", mix=None, format="Q4_K",
                                                   tensor_type=["ffn_down=Q6_K"], rotation="rh", seed=3)


def run(*args):
    p = subprocess.run([sys.executable, "-m", "twinquant", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    return p


def test_cli_recipe_overrides_and_metadata(tmp_path):
    d = save_tiny("llama", tmp_path / "m", tokenizer=True, hidden_size=256, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=2)
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({"method": "rtn", "mix": None, "format": "Q4_K", "rotation": "none",
                                 "tensor_type": ["ffn_down=Q6_K"]}))
    p = run("quantize", d, "-o", tmp_path / "x.gguf", "--recipe", f, "--tensor-type", "attn_v=Q8_0", "--dry-run")
    head = yaml.safe_load(p.stdout.split("---")[0])
    assert head["format"] == "Q4_K" and head["tensor_type"] == ["ffn_down=Q6_K", "attn_v=Q8_0"]
    assert "blk.0.ffn_down.weight" in p.stdout and "Q6_K" in p.stdout.split("blk.0.ffn_down.weight")[1][:20]
    assert "Q8_0" in p.stdout.split("blk.0.attn_v.weight")[1][:20]
    # a command-line option replaces the recipe's field: --mix replaces its format
    out = tmp_path / "q.gguf"
    args = ("--recipe", f, "--mix", "llama.cpp:Q3_K_M", "--method", "gptq", "--calib-tokens", 256, "--calib-ctx", 64)
    planned = re.search(r"file about ([\d,]+) bytes", run("quantize", d, "-o", out, *args, "--dry-run").stdout)
    run("quantize", d, "-o", out, *args, "-q")
    # the dry run's size is the file's, but for the metadata a run adds (recipe, calibration hash)
    assert 0 <= out.stat().st_size - int(planned.group(1).replace(",", "")) < 4096
    rec = load_gguf(out).quant_record
    assert rec["recipe"]["mix"] == "llama.cpp:Q3_K_M" and rec["recipe"]["format"] is None
    assert rec["recipe"]["method"] == "gptq" and rec["rotation"] == "none"
    assert rec["calibration"]["tokens"] == 256 and len(rec["calibration"]["sha256"]) == 64
    assert rec["recipe"]["damp"] == 0.5
    # --damp reaches GPTQ: another damping, other weights; recorded in the file
    out2 = tmp_path / "q2.gguf"
    run("quantize", d, "-o", out2, "--recipe", f, "--mix", "llama.cpp:Q3_K_M", "--method", "gptq",
        "--calib-tokens", 256, "--calib-ctx", 64, "--damp", "0.01", "-q")
    assert load_gguf(out2).quant_record["recipe"]["damp"] == 0.01
    from twinquant.io.gguf_read import open_gguf

    def data(path, name="blk.0.ffn_down.weight"):
        return next(bytes(t.data) for t in open_gguf(path).tensors if t.name == name)
    assert data(out) != data(out2)
    # without --calib-tokens a GPTQ file records the grown calibration (the tiny model's floor: 8192, or the text)
    p = run("quantize", d, "-o", tmp_path / "z.gguf", "--recipe", f, "--method", "gptq", "--dry-run")
    assert "8192 tokens of" in p.stdout
