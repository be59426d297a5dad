"""The streamed pipeline (`twinquant.pipeline`): block by block from a lazy source, resumable.

The in-memory path (`Options(stream=False)`: the model materialized, rotated in place in float64, nothing
released) is the oracle: the streamed file must hold the same bytes for every recipe option. Resuming after a
simulated kill gives the same bytes again; a work directory of another run is one error line; peak memory of a
streamed run stays flat as layers are added (the in-memory run's grows).
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.tiny_models import save_tiny
from twinquant.errors import TwinquantError
from twinquant.pipeline import Options, quantize
from twinquant.pipeline.executor import Interrupted
from twinquant.pipeline.recipe import load_recipe

CAL = dict(calib_tokens=512, calib_ctx=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    kw = dict(tokenizer=True, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=3)
    return {
        "llama": save_tiny("llama", d / "llama", hidden_size=256, **kw),
        "tied": save_tiny("llama-tied", d / "tied", hidden_size=256, **kw),
        "qwen2": save_tiny("qwen2", d / "qwen2", hidden_size=256, **kw),
        "narrow": save_tiny("llama", d / "narrow", hidden_size=192, **{**kw, "intermediate_size": 320}),
    }


CASES = {
    "gptq-q2k-none": ("llama", dict(rotation="none")),
    "gptq-q2k-rh": ("llama", dict(rotation="rh", seed=3)),
    "gptq-rh-tied-unties": ("tied", dict(rotation="rh")),
    "gptq-auto-tied": ("tied", dict(rotation="auto")),
    "gptq-ro": ("qwen2", dict(rotation="ro")),
    "rtn-q4k-rules": ("qwen2", dict(method="rtn", mix=None, format="Q4_K", tensor_type=["ffn_down=Q6_K"],
                                    rotation="rh")),
    "gptq-pad-rh": ("narrow", dict(pad=True, rotation="rh")),
    "gptq-act-order": ("llama", dict(act_order=True, rotation="none")),
}


def _recipe(**changes):
    import dataclasses

    return dataclasses.replace(load_recipe("default"), **{**CAL, **changes})


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory_bit_for_bit(models, tmp_path, case):
    which, changes = CASES[case]
    recipe = _recipe(**changes)
    a = quantize(str(models[which]), tmp_path / "stream.gguf", recipe, Options(quiet=True))
    b = quantize(str(models[which]), tmp_path / "memory.gguf", recipe, Options(quiet=True, stream=False))
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.report.to_dict()["tensors"] == b.report.to_dict()["tensors"] or _same_but_seconds(a, b)
    assert not (tmp_path / "stream.gguf.work").exists()          # the work directory goes once the file exists


def _same_but_seconds(a, b) -> bool:
    strip = lambda r: [{k: v for k, v in t.items() if k != "seconds"} for t in r.to_dict()["tensors"]]  # noqa
    return strip(a.report) == strip(b.report)


def test_target_size_streamed_equals_in_memory(models, tmp_path):
    recipe = _recipe(rotation="none")
    m = str(tmp_path / "m.json")
    opts = dict(quiet=True, target_bpw=4.0, measurement=m, kld_windows=2)
    a = quantize(str(models["llama"]), tmp_path / "a.gguf", recipe, Options(**opts))
    b = quantize(str(models["llama"]), tmp_path / "b.gguf", recipe, Options(**opts, stream=False))
    assert a.allocation.choice == b.allocation.choice
    assert a.path.read_bytes() == b.path.read_bytes()
    assert 8 * a.allocation.total_bytes <= 4.0 * a.n_params


@pytest.mark.parametrize("stop", [0, 1])
def test_resume_after_a_kill_gives_the_same_bytes(models, tmp_path, stop):
    recipe = _recipe(rotation="rh")
    src = str(models["llama"])
    whole = quantize(src, tmp_path / "whole.gguf", recipe, Options(quiet=True))
    out = tmp_path / "resumed.gguf"
    with pytest.raises(Interrupted):
        quantize(src, out, recipe, Options(quiet=True, stop_after_block=stop))
    assert not out.exists()                                      # nothing half-written
    state = json.loads((tmp_path / "resumed.gguf.work" / "state.json").read_text())
    assert state["blocks_done"] == stop + 1
    lines = []
    res = quantize(src, out, recipe, Options(log=lines.append, resume=True))
    assert out.read_bytes() == whole.path.read_bytes()
    assert any("resuming" in s for s in lines)
    redone = [s for s in lines if "blk.0." in s]
    assert not redone, redone                                    # finished blocks are not quantized again
    assert [t.name for t in res.report.tensors] == [t.name for t in whole.report.tensors]


def test_resume_of_another_run_is_one_error_line(models, tmp_path):
    src = str(models["llama"])
    out = tmp_path / "x.gguf"
    with pytest.raises(Interrupted):
        quantize(src, out, _recipe(rotation="rh"), Options(quiet=True, stop_after_block=0))
    with pytest.raises(TwinquantError, match="made for another run .*recipe"):
        quantize(src, out, _recipe(rotation="rh", seed=1), Options(quiet=True, resume=True))
    # from the command line: one line, exit 2, nothing written
    p = subprocess.run([sys.executable, "-m", "twinquant", "quantize", src, "-o", str(out), "--resume",
                        "--calib-tokens", "512", "--calib-ctx", "64", "--rotation", "rh", "--seed", "1", "-q"],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    err = [s for s in p.stderr.splitlines() if s.strip()]
    assert len(err) == 1 and "made for another run" in err[0], p.stderr
    assert not out.exists()
    # without --resume the old work directory is replaced and the run completes
    quantize(src, out, _recipe(rotation="rh", seed=1), Options(quiet=True))
    assert out.is_file()


def test_unwritable_output_fails_before_any_work(models, tmp_path):
    import time

    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "twinquant", "quantize", str(models["llama"]), "-o",
                        "/proc/version/x.gguf", "--calib-tokens", "512", "--calib-ctx", "64"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "cannot write there" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 30


# VmHWM: the peak resident size of this process's own memory (ru_maxrss would inherit the forking parent's)
PEAK = textwrap.dedent("""
    import sys
    from twinquant.pipeline import Options, quantize
    from twinquant.pipeline.recipe import load_recipe
    import dataclasses
    r = dataclasses.replace(load_recipe("default"), method="rtn", mix=None, format="Q8_0", rotation="rh")
    quantize(sys.argv[1], sys.argv[2], r, Options(quiet=True, stream=sys.argv[3] == "1"))
    print(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM:")))
""")


def _peak_kib(model_dir, out, stream: bool, runs: int = 2) -> int:
    # the least of a few runs: the allocator's and the page cache's noise only ever adds (one CI run saw +16 MiB)
    peaks = []
    for _ in range(runs):
        p = subprocess.run([sys.executable, "-c", PEAK, str(model_dir), str(out), "1" if stream else "0"],
                           capture_output=True, text=True, check=True)
        peaks.append(int(p.stdout.split()[-1]))
    return min(peaks)


@pytest.mark.slow
def test_peak_memory_of_a_streamed_run_stays_flat_as_layers_are_added(tmp_path):
    kw = dict(tokenizer=True, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
              num_key_value_heads=4, vocab=320)
    few = save_tiny("llama", tmp_path / "few", num_hidden_layers=2, **kw)
    many = save_tiny("llama", tmp_path / "many", num_hidden_layers=14, **kw)
    per_layer = (4 * 512 * 512 + 3 * 512 * 2048) * 4 / 1024          # KiB of float32 weights per block
    grow_stream = _peak_kib(many, tmp_path / "a.gguf", True) - _peak_kib(few, tmp_path / "b.gguf", True)
    grow_memory = _peak_kib(many, tmp_path / "c.gguf", False) - _peak_kib(few, tmp_path / "d.gguf", False)
    assert grow_memory > 6 * per_layer, (grow_memory, per_layer)    # the in-memory run holds every block
    assert grow_stream < 3 * per_layer, (grow_stream, per_layer)    # the streamed one about one
    assert grow_stream < grow_memory / 4, (grow_stream, grow_memory)


def test_streamed_perplexity_equals_the_windowed_one(models, tmp_path):
    from twinquant.eval.perplexity import evaluate, make_windows, streamable
    from twinquant.io.load import load_model

    q = quantize(str(models["qwen2"]), tmp_path / "q.gguf", _recipe(rotation="rh"), Options(quiet=True)).path
    ids = torch.randint(3, 300, (1200,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = make_windows(ids, 64, 6, "llama.cpp", None, False)
    results = []
    for stream in (True, False):
        model, ref = load_model(str(q), materialize=False), load_model(str(models["qwen2"]), materialize=False)
        assert streamable(model) and streamable(ref)
        r = evaluate(model, windows, ref=ref, progress=False, stream=stream)
        r.pop("seconds")
        results.append(r)
        if stream:                  # nothing of the blocks is left materialized
            assert not any(n.startswith("blk.") for n in model.tensors)
    assert results[0] == results[1]
    assert results[0]["kld_mean"] > 0


def test_dry_run_prints_the_plan_and_writes_nothing(models, tmp_path):
    out = tmp_path / "d.gguf"
    p = subprocess.run([sys.executable, "-m", "twinquant", "quantize", str(models["tied"]), "-o", str(out),
                        "--rotation", "rh", "--dry-run", "--calib-tokens", "512", "--calib-ctx", "64"],
                       capture_output=True, text=True, check=True)
    steps = [ln.split(None, 2) for ln in p.stdout.splitlines() if ln[:4].strip().rstrip(".").isdigit()]
    kinds = [s[1] for s in steps]
    assert kinds[:3] == ["load", "rotate", "calibrate"] and kinds[-1] == "write", kinds
    assert kinds.count("block") == 3 and "head untied" in p.stdout
    assert not out.exists() and not (tmp_path / "d.gguf.work").exists()


def test_row_chunks_bound_cpu_memory_and_keep_one_gpu_sweep():
    from twinquant.pipeline.executor import CHUNK_ROWS, chunk_rows

    assert chunk_rows(151936, 1536, "cpu") == CHUNK_ROWS and chunk_rows(8960, 1536, "cpu") == 8960
    assert chunk_rows(27648, 5120, "cuda") == 27648            # a 32B ffn matrix: one GPTQ column sweep on a GPU
    head = chunk_rows(152064, 5120, torch.device("cuda", 0))
    assert 27648 < head < 152064 and head * 5120 * 4 * 14 <= 24 * 2**30   # the head: few chunks, bounded memory


def test_gptq_gets_llama_quantize_types_with_an_imatrix(tmp_path):
    """GPTQ's calibration is importance data: its type plan is llama-quantize's with --imatrix (Q4_0: the first
    1/8 of ffn_down become Q4_1), so it is compared with llama.cpp's +imatrix file at the same bytes; RTN without
    an imatrix file keeps the plain plan."""
    src = save_tiny("llama", tmp_path / "m8", tokenizer=True, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, num_hidden_layers=8)       # n_layers // 8 = 1 block

    def plan(method):
        res = quantize(str(src), tmp_path / "p.gguf",
                       _recipe(method=method, mix="llama.cpp:Q4_0", rotation="none"), Options(quiet=True, dry_run=True))
        return dict(ln.split()[:2] for ln in res.dry_run_text.splitlines() if ln.startswith("blk.0.ffn_down"))

    assert plan("gptq") == {"blk.0.ffn_down.weight": "Q4_1"}
    assert plan("rtn") == {"blk.0.ffn_down.weight": "Q4_0"}


def test_measure_resumes_at_its_first_unfinished_block(models, tmp_path, monkeypatch):
    """`twinquant.measure` keeps the next block's activations and the Fisher weights in MEASUREMENT.work/: after
    a kill it continues at the first unfinished block without running the blocks before it (or the Fisher pass)
    again, and gives the measurement an uninterrupted run gives; the work directory goes once it is complete."""
    import twinquant
    import twinquant.allocation.fisher as fisher
    import twinquant.calibration.blocks as blocks

    src, recipe = str(models["llama"]), _recipe(rotation="none")
    opts = dict(quiet=True, cost="fisher", sample_rows=8, kld_windows=2)
    full = twinquant.measure(src, tmp_path / "full.json", recipe, Options(**opts))
    assert full.complete and not (tmp_path / "full.json.work").exists()
    part = tmp_path / "part.json"
    got = twinquant.measure(src, part, recipe, Options(**opts, stop_after_block=0))
    assert not got.complete and (tmp_path / "part.json.work" / "x.1.pt").is_file()
    seen = []
    real = blocks.block_pass
    monkeypatch.setattr(blocks, "block_pass", lambda model, layer, *a, **k: seen.append(layer) or
                        real(model, layer, *a, **k))
    monkeypatch.setattr(fisher, "output_fisher", lambda *a, **k: pytest.fail("the Fisher pass ran again"))
    resumed = twinquant.measure(src, part, recipe, Options(**opts))
    assert seen == [1, 2]                               # block 0 was not run again
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(resumed) == strip(full) and resumed.sha256() == full.sha256()
    assert not (tmp_path / "part.json.work").exists()
