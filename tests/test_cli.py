"""The command line as a user runs it: outputs on the packaged model, and one clear line + exit 2 on bad input."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from tests.paths import WIKI
from tests.tiny_models import save_tiny
from twinquant import zoo


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "twinquant", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def assert_user_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("twinquant: error:"), p.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_inspect_packaged_model(tmp_path):
    p = run("inspect", "smollm2-135m", "--json", tmp_path / "i.json")
    assert "architecture: llama" in p.stdout and "Q4_1" in p.stdout
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["spec"]["hidden"] == 576 and info["params"] == 134_515_008
    assert info["roles"]["attn_q"]["types"] == ["Q4_1"] and info["roles"]["attn_q"]["tensors"] == 30


def test_perplexity_json(tmp_path):
    out = tmp_path / "p.json"
    p = run("perplexity", "smollm2-135m", "-f", WIKI, "-c", 128, "--chunks", 2, "--json", out)
    assert "Final estimate: PPL" in p.stdout
    res = json.loads(out.read_text())
    assert res["chunks"] == 2 and res["tokens_scored"] == 2 * 63 and 1 < res["ppl"] < 1000


def test_generate_streams_text():
    p = run("generate", "smollm2-135m", "-p", "The capital of France is", "-n", 8)
    assert p.stdout.startswith("The capital of France is") and len(p.stdout) > len("The capital of France is")


def test_missing_path():
    assert_user_error(run("inspect", "/nonexistent/model.gguf", ok=False), "/nonexistent/model.gguf")


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(zoo.resolve("smollm2-135m").read_bytes()[:3_000_000])
    assert_user_error(run("inspect", bad, ok=False), "truncated")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"hello world")
    assert_user_error(run("inspect", bad, ok=False), "not a GGUF")


def test_corrupt_safetensors_header(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    st = d / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:40] = b"{this is not json" + b"!" * 15
    st.write_bytes(bytes(data))
    assert_user_error(run("inspect", d, ok=False), "safetensors")


def test_unknown_hf_architecture(tmp_path):
    d = save_tiny("llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("inspect", d, ok=False), "MambaForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM")


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_user_error(run("inspect", path, ok=False), "'mamba'", "llama, qwen2, qwen2moe, qwen3, qwen3moe")


def test_text_shorter_than_a_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_user_error(run("perplexity", "smollm2-135m", "-f", short, "-c", 512, ok=False), "needs at least")


def test_missing_text_file():
    assert_user_error(run("perplexity", "smollm2-135m", "-f", "/no/such.txt", ok=False), "/no/such.txt")


def test_nan_weights_are_refused(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = save_tiny("qwen2", tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    x = tmp_path / "t.txt"
    x.write_text("a " * 100)
    p = run("convert", d, "-o", tmp_path / "o", ok=False)
    assert_user_error(p, "blk.1.ffn_up.weight", "NaN")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    del torch


@pytest.mark.parametrize("args,words", [(("-c", "4"), "too small"), (("--chunks", "0"), "chunks")])
def test_impossible_options(args, words):
    assert_user_error(run("perplexity", "smollm2-135m", "-f", WIKI, *args, ok=False), words)


def test_rotate_and_activations_commands(tmp_path):
    from tests.paths import CALIB
    from twinquant.io.gguf_read import load_gguf
    from twinquant.io.hf import load_hf_dir
    from twinquant.model.forward import forward
    import torch

    d = save_tiny("qwen3", tmp_path / "m", tokenizer=True)
    out = tmp_path / "r.gguf"
    p = run("rotate", d, "-o", out, "--rotation", "ro", "--ro-iters", 3, "--online", "r4", "--calib", CALIB,
            "--calib-tokens", 256, "--calib-ctx", 64, "-q")
    assert "RO objective" in p.stderr and "warning: the model needs online transforms" in p.stderr
    x = torch.randint(0, 320, (1, 20))
    a, b = forward(load_hf_dir(d), x), forward(load_gguf(out), x)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    p = run("activations", d, "--calib", CALIB, "--calib-tokens", 256, "--calib-ctx", 64, "-o",
            tmp_path / "act", "-q")
    report = json.loads((tmp_path / "act.json").read_text())
    assert len(report["layers"]) == 3 and (tmp_path / "act.png").stat().st_size > 1000
    assert_user_error(run("rotate", d, "-o", tmp_path / "hf-out", "--online", "r4", ok=False), "HF directory")
    assert_user_error(run("rotate", d, "-o", tmp_path / "x.gguf", "--online", "r5", ok=False), "r5")
    assert_user_error(run("rotate", d, "-o", "/etc/hostname/x.gguf", ok=False), "cannot write")


def test_quantize_command_with_padding_and_split(tmp_path):
    import gguf as _gguf

    d = save_tiny("llama", tmp_path / "m", tokenizer=True, hidden_size=192, intermediate_size=512,
                  num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "q.gguf"
    p = run("quantize", d, "-o", out, "--mix", "llama.cpp:Q2_K", "--method", "rtn", "--pad", "--split-max-size",
            "200K", "--report", tmp_path / "r.json")
    assert "padded: hidden 192 -> 256" in p.stderr and "bits per weight" in p.stdout
    shards = sorted(tmp_path.glob("q-0000?-of-0000?.gguf"))               # llama.cpp's split naming
    assert len(shards) >= 2 and not out.exists()
    types = {t.tensor_type.name for t in _gguf.GGUFReader(shards[0]).tensors}
    report = json.loads((tmp_path / "r.json").read_text())
    assert {t["type"] for t in report["tensors"]} >= {"Q2_K", "Q3_K"}      # K-quants, not fallbacks
    assert types & {"Q2_K", "Q3_K", "Q4_K", "Q6_K", "F32"}
    assert_user_error(run("quantize", d, "-o", tmp_path / "x.gguf", "--mix", "llama.cpp:IQ9", ok=False), "IQ9")
    assert_user_error(run("quantize", d, "-o", tmp_path / "x.gguf", "--recipe", "nonsense", ok=False), "nonsense")
