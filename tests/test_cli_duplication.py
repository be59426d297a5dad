"""`twinquant sensitivity`, `duplicate` and `run` as a user runs them, on a tiny model."""

import json

import gguf
import yaml

from tests.test_cli import assert_user_error, run
from tests.tiny_models import save_tiny


def test_sensitivity_duplicate_and_run(tmp_path):
    d = save_tiny("llama", tmp_path / "m", tokenizer=True, hidden_size=256, intermediate_size=512,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    q = tmp_path / "q.gguf"
    calib = ["--calib-tokens", 256, "--calib-ctx", 64]
    run("quantize", d, "-o", q, "--recipe", "q2k-rtn", "--rotation", "rh", "-q")
    import time

    t0 = time.perf_counter()        # an output that cannot be written: one line before any work
    assert_user_error(run("sensitivity", d, "--quantized", q, "-o", "/etc/hostname/sens", *calib, ok=False),
                      "cannot write")
    assert time.perf_counter() - t0 < 15
    p = run("sensitivity", d, "--quantized", q, "-o", tmp_path / "sens", *calib)
    assert "rotated the float model" in p.stderr and "rank" in p.stdout
    sens = json.loads((tmp_path / "sens.json").read_text())
    assert len(sens["ranking"]) == 3 and (tmp_path / "sens.png").stat().st_size > 0

    out = tmp_path / "dup.gguf"
    p = run("duplicate", q, "-o", out, "--ref", d, "--sensitivity", tmp_path / "sens.json", "--auto",
            "--budget-layers", 1, "--kind", "serial", "--search", "bayes", "--trials", 4, "--report",
            tmp_path / "dup.json", *calib)
    rep = json.loads((tmp_path / "dup.json").read_text())
    assert len(rep["search"]["trials"]) == 4
    # a copy the search cannot make useful is not written (the tiny model's usually is not)
    assert len(rep["topology"]) == rep["cost"]["extra_layers"] <= 1
    assert rep["topology"] or ("dropped layer_" in p.stderr or "none are kept" in p.stderr)
    topo = tmp_path / "t.yaml"
    topo.write_text(yaml.safe_dump({"layer_1": {"type": "serial", "copies": 2}}))
    p = run("duplicate", q, "-o", out, "--ref", d, "--topology", topo, "--report", tmp_path / "dup.json", *calib)
    rep = json.loads((tmp_path / "dup.json").read_text())
    assert rep["topology"] == {"layer_1": {"type": "serial", "copies": 2}} and rep["cost"]["extra_layers"] == 1
    r = gguf.GGUFReader(out)
    assert "twinquant.dup.topology" in r.fields
    types_in = {t.name: t.tensor_type for t in gguf.GGUFReader(q).tensors}
    assert {t.name: t.tensor_type for t in r.tensors} == types_in       # quantized blocks kept as they were
    p = run("run", out, "-p", "hello", "-n", 4)
    assert p.stdout.startswith("hello")
    run("perplexity", out, "-f", tmp_path / "sens.json", "-c", 64, "--chunks", 2)

    flat = tmp_path / "flat.gguf"
    run("duplicate", q, "-o", flat, "--topology", topo, "--ref", d, "--expand-duplicates", *calib)
    assert gguf.GGUFReader(flat).fields["llama.block_count"].contents() == 4
    assert_user_error(run("duplicate", q, "-o", tmp_path / "x.gguf", "--auto", ok=False), "budget")
    assert_user_error(run("duplicate", q, "-o", tmp_path / "x.gguf", "--auto", "--budget-layers", 1, ok=False),
                      "--ref")
    topo.write_text(yaml.safe_dump({"layer_7": {"type": "serial"}}))
    assert_user_error(run("duplicate", q, "-o", tmp_path / "x.gguf", "--topology", topo, "--ref", d, *calib,
                          ok=False), "layer_7")
    assert not (tmp_path / "x.gguf").exists()
