"""Write a float model where the user asked: a GGUF (optionally in llama.cpp shards) or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from twinquant.errors import TwinquantError


def save_model(model, out: str | Path, outtype: str = "f32", progress: bool = True,
               split_max_size: str | None = None) -> None:
    """`out` ending in .gguf: a float GGUF of `outtype` (f32, f16, bf16); else an HF directory (which cannot hold
    online transforms: those need twinquant's runtime and a GGUF)."""
    out = Path(out)
    if out.suffix == ".gguf":
        from twinquant.io.gguf_write import write_gguf
        from twinquant.progress import Progress

        names = model.tensor_names()
        with Progress(len(names), "write", enabled=progress) as bar:
            write_gguf(model, out, outtype.upper(), progress=lambda i, n, name: bar.update(i, name),
                       split_max_size=split_max_size)
        return
    if model.needs_online:
        raise TwinquantError("online transforms (R3/R4) cannot be stored in an HF directory; write a .gguf")
    from twinquant.io.hf import save_hf_dir

    save_hf_dir(model, out)
