"""`twinquant imatrix` as a library: llama-imatrix's computation on twinquant's forward.

The text is cut into windows exactly as llama-imatrix does (the file's one trailing newline dropped, tokenized once
with BOS where the model adds it, non-overlapping `ctx` windows whose first token is BOS where the model uses it, at
least two windows' worth of tokens); the written file is llama-imatrix's format, accepted by
`llama-quantize --imatrix`. The CLI (`twinquant imatrix`, llama-imatrix's option names) parses and prints only.
"""

from __future__ import annotations

from pathlib import Path

from twinquant.calibration.imatrix import Imatrix, collect_imatrix
from twinquant.errors import TwinquantError


def check_options(text: str | Path, ctx: int | None, chunks: int | None, output_frequency: int | None) -> Path:
    """Fail fast (before the model loads) on options llama-imatrix would refuse; returns the text's path."""
    if ctx is None or ctx < 8:
        raise TwinquantError(f"--ctx-size {ctx} is too small (at least 8)")
    if chunks is not None and chunks < 1:
        raise TwinquantError(f"--chunks must be positive, got {chunks}")
    if output_frequency is not None and output_frequency < 0:
        raise TwinquantError(f"--output-frequency must be 0 or more, got {output_frequency}")
    text_path = Path(text)
    if not text_path.is_file():
        raise TwinquantError(f"{text_path}: no such text file")
    return text_path


def read_inputs(files, ctx: int, log=None) -> Imatrix | None:
    """The `--in-file` imatrices merged in order (None without any), their chunk size set to `ctx`."""
    base = None
    for f in files or []:
        imx = Imatrix.read(f, chunk_size=ctx)
        if log:
            log(f"loaded imatrix {f}: {len(imx)} entries, {imx.chunk_count} chunks")
        base = imx if base is None else base.merge(imx)
    if base is not None:
        base.chunk_size = ctx
    return base


def save(imx: Imatrix, path: Path, fmt: str, basis: dict | None = None) -> None:
    imx.basis = basis
    if fmt == "dat":
        if basis is not None:
            raise TwinquantError("the legacy .dat format cannot record the rotation / padding the imatrix was "
                                 "computed in: use --output-format gguf")
        imx.write_dat(path)
    else:
        imx.write_gguf(path)


def run_imatrix(model, text: str | Path, out: str | Path, ctx: int = 512, chunks: int | None = None,
                output_frequency: int | None = 10, base: Imatrix | None = None, fmt: str = "gguf",
                process_output: bool = False, progress: bool = True, log=None, basis: dict | None = None) -> Imatrix:
    """Collect the importance matrix of `model` over `text` (merged with `base`), saving it to `out` every
    `output_frequency` chunks and at the end; returns it. `basis`: the preparation `model` had
    (`Preparation.basis`), recorded in the file."""
    from twinquant.eval.perplexity import make_windows

    text_path = check_options(text, ctx, chunks, output_frequency)
    out = Path(out)
    if basis is not None and fmt == "dat":
        raise TwinquantError("the legacy .dat format cannot record the rotation / padding the imatrix is computed "
                             "in: use --output-format gguf")
    if base is not None and base.basis != basis:
        raise TwinquantError(f"--in-file was computed in another basis ({base.basis}) than this run ({basis})")
    if model.tokenizer is None:
        raise TwinquantError("the model has no tokenizer; cannot tokenize the text")
    raw = text_path.read_bytes().decode("utf-8", errors="replace")
    raw = raw.removesuffix("\n")          # llama.cpp's -f drops one trailing newline
    tok = model.tokenizer
    ids = tok.encode(raw)
    if len(ids) < 2 * ctx:
        raise TwinquantError(f"{text_path}: {len(ids)} tokens; llama-imatrix with --ctx-size {ctx} needs at least "
                             f"{2 * ctx}")
    windows = make_windows(ids, ctx, chunks, "llama.cpp", tok.bos_id, tok.add_bos).tokens
    if log:
        log(f"imatrix: {windows.shape[0]} chunks of {ctx} tokens; BOS {'first' if tok.add_bos else 'not used'}")

    def combined(imx):
        imx.basis = basis
        return imx if base is None else base.merge(imx)

    def on_chunk(done: int, snapshot) -> None:
        if output_frequency and done % output_frequency == 0 and done < windows.shape[0]:
            save(combined(snapshot()), out, fmt, basis)

    # a lazily loaded model is run block by block, `output_frequency` windows at a time (a save after each group)
    result = combined(collect_imatrix(model, windows, progress=progress, datasets=[str(text)],
                                      process_output=process_output, on_chunk=on_chunk,
                                      every=output_frequency or None))
    save(result, out, fmt, basis)
    return result
