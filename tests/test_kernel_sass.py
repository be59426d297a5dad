"""The word-lane GEMV kernels' machine code for a Hopper GPU, compiled here (Triton's LLVM backend and the ptxas /
nvdisasm of its wheel: no GPU needed): their loops must keep every value in the lanes' registers. A tensor loaded
with fewer values than the program has threads gets another layout, and Triton converts it through shared memory
with barriers inside the loop; that cost the int8 Q2_K kernel 12 barriers a step until x's pointers were broadcast
over the rows (benchmarks/results/gemv_limits_s22-h100-c.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.paths import ROOT

# the runtime's launches (`gemv_config`, the shipped table) at the 7B and 32B decode shapes
SHAPES = [(27648, 5120), (5120, 27648), (5120, 5120), (18944, 3584), (3584, 18944)]
SPECS = ["Q2_K:q8planes", "Q2_K:q8words", "Q2_K:words", "Q2_K:planes"]

SCRIPT = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_ptx
from twinquant.formats.ggml.packed import gemv_config
out = []
for spec in {specs!r}:
    for rows, cols in {shapes!r}:
        c = gemv_config(spec, rows, cols // 256)
        out.append([spec, rows, cols, list(c), kernel_ptx.loop_shared_memory_ops(spec, c, rows, cols)])
print(json.dumps(out))
"""


def test_word_lane_q2k_kernels_hold_their_values_in_registers_at_the_runtime_launches():
    """No barrier, shared-memory store or load in the loop of any Q2_K word-lane kernel (float / int8 x, GGUF
    layout / planes) at the launch the runtime takes for each 7B / 32B shape."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # compile for sm_90, not interpret
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(specs=SPECS, shapes=SHAPES)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == len(SPECS) * len(SHAPES)
    bad = [r for r in rows if r[4]]
    assert not bad, f"shared-memory traffic in the loop (spec, rows, cols, launch, SASS ops): {bad}"
