"""The benchmarks' results files: JSON, table and PNG written together (benchmarks/provenance.write_results), and
the PNGs of the speed and memory benchmarks drawn from their committed JSON (`--plot`), so a results file on record
without its picture is a failing test, not a gap found later."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.paths import ROOT

RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_write_results_keeps_a_dotted_tag_and_writes_the_table_and_picture_last(tmp_path, capsys):
    from provenance import results_stem, write_results

    stem = results_stem(tmp_path / "new", "decode_gpu", "qwen2.5-7b")
    drawn = []
    write_results(stem, {"rows": [1]})                                  # a step of a long run: the JSON alone
    assert sorted(p.name for p in stem.parent.iterdir()) == ["decode_gpu_qwen2.5-7b.json"]
    write_results(stem, {"rows": [1, 2]}, "| a |\n", lambda res, path: drawn.append((res["rows"], path.name)))
    assert json.loads((stem.parent / "decode_gpu_qwen2.5-7b.json").read_text()) == {"rows": [1, 2]}
    assert (stem.parent / "decode_gpu_qwen2.5-7b.md").read_text() == "| a |\n"
    assert drawn == [([1, 2], "decode_gpu_qwen2.5-7b.png")]
    assert "| a |" in capsys.readouterr().out


# one committed file of each kind a benchmark's plot must draw: a decode run, a roofline fit, a validation, the
# first session's fit; the launch counts; the profile; the Hadamard slicing experiment; the memory benchmarks
DRAWN = [("decode_gpu.py", "decode_gpu_s23-h100-q8-32b-b"), ("decode_gpu.py", "decode_gpu_s15-h100-roofline-b"),
         ("decode_gpu.py", "decode_gpu_s16-h100-validate"), ("decode_gpu.py", "decode_gpu_s15-h100-roofline"),
         ("decode_launches.py", "decode_launches_s19-cpu"), ("decode_profile.py", "decode_profile_s17-h100"),
         ("hadamard_warps.py", "hadamard_chunks_s16-h100"), ("pipeline_memory.py", "pipeline_memory_qwen15-default-s11"),
         ("gptq_memory.py", "gptq_memory_cpu-n16384")]


@pytest.mark.parametrize("script,name", DRAWN)
def test_plot_draws_a_committed_results_file_again(script, name, tmp_path):
    src = tmp_path / f"{name}.json"
    src.write_text((RESULTS / f"{name}.json").read_text())
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--plot", str(src)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    png = src.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize("prefix", ["decode_gpu_", "decode_launches_", "decode_profile_", "hadamard_warps_",
                                    "gemv_", "kernel_speed_", "q8_handover_", "pipeline_memory_", "gptq_memory_"])
def test_every_committed_speed_or_memory_result_has_its_png(prefix):
    missing = [p.name for p in sorted(RESULTS.glob(f"{prefix}*.json"))
               if not p.with_suffix(".png").exists() and not p.name.startswith("gemv_launches_")]
    assert sorted(RESULTS.glob(f"{prefix}*.json")) and not missing, missing
