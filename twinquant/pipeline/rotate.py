"""`twinquant rotate` as a library: fuse norms and rotate a model (R1 RH or RO, R2, online R3/R4) exactly, in
float64, and write it as a float GGUF or an HF directory. The options are checked before the model is read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from twinquant.errors import TwinquantError


@dataclass(frozen=True)
class RotateOptions:
    """What `rotate` does; the names are the command line's (`calib*` are what `calibration_for` reads)."""

    rotation: str = "rh"             # rh | ro
    seed: int = 0
    online: str = ""                 # e.g. "r4" or "r4,r3"
    r2: bool = True
    ro_iters: int = 20
    outtype: str = "f32"
    calib: str | None = None
    calib_tokens: int = 8192
    calib_ctx: int = 512
    dtype: str = "f32"
    device: str = "cpu"
    quiet: bool = False


def rotate(model: str | Path, out: str | Path, options: RotateOptions = RotateOptions(),
           log: Callable[[str], None] | None = None):
    """Rotate the model at `model` (HF directory, GGUF or a packaged name) into `out`; returns the rotated model."""
    from twinquant.calibration.windows import calibration_for
    from twinquant.io.load import load_model
    from twinquant.pipeline.save import save_model
    from twinquant.pipeline.run import check_writable, torch_dtype
    from twinquant.rotation.rotate import check_rotatable
    from twinquant.rotation.stage import parse_online, rotate_model

    o = options
    if o.rotation not in ("rh", "ro"):
        raise TwinquantError(f"rotation {o.rotation!r}: use rh or ro")
    online = parse_online(o.online)          # the options before any work
    if online and Path(out).suffix != ".gguf":
        raise TwinquantError("online transforms (R3/R4) cannot be stored in an HF directory; write a .gguf")
    check_writable(Path(out) if Path(out).suffix == ".gguf" else Path(out) / "config.json")
    m = load_model(model, dtype=torch_dtype(o.dtype), device=o.device)
    check_rotatable(m.spec, o.rotation, online)      # MoE / latent attention: R1 (RH) only, before any work
    m.materialize()
    if log and not o.quiet:
        log(f"rotating: fuse norms, R1 {o.rotation} (seed {o.seed}), R2"
            + (f", online {', '.join(online)}" if online else ""))
    calib = calibration_for(o, m).windows if o.rotation == "ro" else None
    rotate_model(m, o.rotation, o.seed, r2=o.r2, online=online, calib_windows=calib, ro_iters=o.ro_iters, log=log)
    save_model(m, out, o.outtype, progress=not o.quiet)
    return m
