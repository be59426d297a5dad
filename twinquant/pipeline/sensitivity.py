"""`twinquant sensitivity` as a library: which blocks of a quantized GGUF lose the most to their quantization.

    from twinquant.pipeline.sensitivity import SensitivityOptions, sensitivity
    sens = sensitivity("qwen2.5-coder-1.5b", "q.gguf", SensitivityOptions(output="sens"))

Both models are read lazily and measured block by block (`duplication.sensitivity.layer_sensitivity`); the float
model is put in the quantized file's basis first (its recorded padding and rotation). The output locations are
checked before any work starts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twinquant.calibration.windows import calibration_for
from twinquant.duplication.sensitivity import Sensitivity, layer_sensitivity
from twinquant.errors import TwinquantError

@dataclass(frozen=True)
class SensitivityOptions:
    """What `sensitivity` does; the names are the command line's (`calib*` are what `calibration_for` reads)."""

    output: str | None = None        # stem: STEM.json and STEM.png (None: nothing written)
    calib: str | None = None
    calib_tokens: int = 2048
    calib_ctx: int = 512
    dtype: str = "f32"               # compute dtype
    device: str = "cpu"
    quiet: bool = False


def sensitivity(model: str | Path, quantized: str | Path, options: SensitivityOptions = SensitivityOptions(),
                log: Callable[[str], None] | None = None) -> Sensitivity:
    """Per-block sensitivity of the quantized GGUF `quantized` against its float model `model` (HF directory,
    GGUF or a packaged name) on calibration windows; written to `options.output` (.json, .png) when given."""
    from twinquant.io.load import load_model
    from twinquant.pipeline.prepare import same_basis
    from twinquant.pipeline.run import check_writable, torch_dtype

    o = options
    dtype = torch_dtype(o.dtype)
    if o.calib_tokens is not None and o.calib_tokens < o.calib_ctx:
        raise TwinquantError(f"--calib-tokens {o.calib_tokens} is less than one window of {o.calib_ctx}")
    if o.output:
        for suffix in (".json", ".png"):
            check_writable(Path(o.output).with_suffix(suffix))
    say = None if o.quiet else (log or (lambda m: print(m, file=sys.stderr)))
    quant = load_model(quantized, dtype=dtype, device=o.device)
    ref = same_basis(load_model(model, dtype=dtype, device=o.device), quant.quant_record, log=say)
    calib = calibration_for(o, ref)
    sens = layer_sensitivity(ref, quant, calib.windows, progress=not o.quiet)
    sens.meta.update({"model": str(model), "quantized": str(quantized), "calibration_sha256": calib.text_sha256,
                      "calibration_tokens": calib.n_tokens})
    if o.output:
        sens.write(o.output)
    return sens
