"""`twinquant rotate` as a library: the `--online` list checked, then `rotate()` computed in float64 on a model
of any dtype and stored back in that dtype, with RO's objective reported."""

from __future__ import annotations

from typing import Callable

import torch

from twinquant.model.model import Model
from twinquant.rotation.rotate import check_online, rotate


def parse_online(text: str | None) -> tuple[str, ...]:
    """The online transforms of a comma-separated list (`"r4,r3"`), lower-cased and checked."""
    online = tuple(o.strip().lower() for o in text.split(",") if o.strip()) if text else ()
    check_online(online)
    return online


def rotate_model(model: Model, rotation: str = "rh", seed: int = 0, r2: bool = True, online: tuple[str, ...] = (),
                 calib_windows: torch.Tensor | None = None, ro_iters: int = 20,
                 log: Callable[[str], None] | None = None) -> Model:
    """Fuse norms and rotate `model` in place as `rotate()` does, exactly (in float64), then back in its dtype;
    `log` gets one line per RO record of the model's history (the objective before and after optimizing)."""
    dtype = model.dtype
    model.to(dtype=torch.float64)
    rotate(model, rotation, seed, r2=r2, online=online, calib_windows=calib_windows, ro_iters=ro_iters)
    model.to(dtype=dtype)
    for r in model.history if log is not None else ():
        if getattr(r, "type", None) == "ro":
            log(f"RO objective: {r.objective_start:.4g} (RH) -> {r.objective:.4g}")
    return model
