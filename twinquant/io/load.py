"""One entry point to load a model: an HF directory, a GGUF file, or a packaged model's name."""

from __future__ import annotations

import os

import torch

from twinquant import zoo
from twinquant.errors import TwinquantError
from twinquant.model.model import Model


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
               materialize: bool = False, load_tokenizer: bool = True, keep_quantized: bool = False) -> Model:
    p = zoo.resolve(str(path))
    if p.is_dir():
        from twinquant.io.hf import load_hf_dir

        model = load_hf_dir(p, load_tokenizer=load_tokenizer)
    elif p.is_file():
        from twinquant.io.gguf_read import load_gguf

        model = load_gguf(p, load_tokenizer=load_tokenizer, keep_quantized=keep_quantized)
    else:
        known = ", ".join(zoo.PACKAGED)
        raise TwinquantError(f"{p}: no such file or directory (packaged models: {known})")
    model.dtype, model.device = dtype, torch.device(device)
    return model.materialize() if materialize else model
