"""`twinquant imatrix`: llama-imatrix's command, on twinquant's forward.

Option names are llama-imatrix's: `-f/--file`, `-o/--output`, `-c/--ctx-size`, `--chunks`, `--output-frequency`,
`--in-file` (repeatable), `--output-format {gguf,dat}`, `--process-output`, `--show-statistics`. The text is cut
into windows exactly as llama-imatrix does (the file's one trailing newline dropped, tokenized once with BOS where
the model adds it, non-overlapping `-c` windows whose first token is BOS where the model uses it, at least two
windows' worth of tokens); the written file is llama-imatrix's format, accepted by `llama-quantize --imatrix`.

Wired into the CLI by `build_parser` with `add_parser(sub, with_model)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twinquant.errors import TwinquantError


def add_parser(sub, with_model):
    sp = with_model(sub.add_parser("imatrix", help="importance matrix as llama-imatrix computes it "
                                                  "(imatrix.gguf for llama-quantize --imatrix)"))
    sp.add_argument("-f", "--file", dest="text", required=True, help="calibration text file")
    sp.add_argument("-o", "--output", default="imatrix.gguf", help="output file (default imatrix.gguf)")
    sp.add_argument("-c", "--ctx-size", "--ctx", dest="ctx", type=int, default=512,
                    help="tokens per chunk (default 512)")
    sp.add_argument("--chunks", type=int, default=None, help="process at most N chunks")
    sp.add_argument("--output-frequency", "-ofreq", dest="output_frequency", type=int, default=10,
                    help="save the imatrix every N chunks (default 10; 0: only at the end)")
    sp.add_argument("--in-file", dest="in_files", action="append", default=[], metavar="FILE",
                    help="an existing imatrix (GGUF or legacy .dat) to merge with (repeatable)")
    sp.add_argument("--output-format", choices=["gguf", "dat"], default="gguf",
                    help="imatrix GGUF (default) or llama.cpp's legacy .dat")
    sp.add_argument("--process-output", action="store_true",
                    help="also collect output.weight (llama-imatrix leaves it out by default)")
    sp.add_argument("--show-statistics", action="store_true",
                    help="print per-tensor statistics of the result (as llama-imatrix --show-statistics)")
    sp.set_defaults(func=cmd_imatrix)
    return sp


def _save(imx, path: Path, fmt: str) -> None:
    if fmt == "dat":
        imx.write_dat(path)
    else:
        imx.write_gguf(path)


def cmd_imatrix(args) -> None:
    from twinquant.eval.perplexity import make_windows
    from twinquant.quant.imatrix import Imatrix, collect_imatrix, format_statistics

    quiet = getattr(args, "quiet", False)
    ctx = args.ctx
    if ctx is None or ctx < 8:
        raise TwinquantError(f"--ctx-size {ctx} is too small (at least 8)")
    if args.chunks is not None and args.chunks < 1:
        raise TwinquantError(f"--chunks must be positive, got {args.chunks}")
    if args.output_frequency is not None and args.output_frequency < 0:
        raise TwinquantError(f"--output-frequency must be 0 or more, got {args.output_frequency}")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise TwinquantError(f"{text_path}: no such text file")
    out = Path(args.output)
    fmt = getattr(args, "output_format", "gguf") or "gguf"
    if fmt == "gguf" and out.suffix != ".gguf" and not quiet:
        print(f"twinquant: warning: {out}: saving the imatrix as GGUF with a suffix other than .gguf "
              f"(--output-format dat writes the legacy format)", file=sys.stderr)

    base = None   # the --in-file imatrices, merged in order; read before the model loads, to fail fast
    for f in args.in_files or []:
        imx = Imatrix.read(f, chunk_size=ctx)
        if not quiet:
            print(f"loaded imatrix {f}: {len(imx)} entries, {imx.chunk_count} chunks", file=sys.stderr)
        base = imx if base is None else base.merge(imx)
    if base is not None:
        base.chunk_size = ctx

    from twinquant.cli import _load

    model = _load(args)
    if model.tokenizer is None:
        raise TwinquantError("the model has no tokenizer; cannot tokenize the text")
    text = text_path.read_bytes().decode("utf-8", errors="replace")
    text = text.removesuffix("\n")        # llama.cpp's -f drops one trailing newline
    tok = model.tokenizer
    ids = tok.encode(text)
    if len(ids) < 2 * ctx:
        raise TwinquantError(f"{text_path}: {len(ids)} tokens; llama-imatrix with --ctx-size {ctx} needs at least "
                             f"{2 * ctx}")
    windows = make_windows(ids, ctx, args.chunks, "llama.cpp", tok.bos_id, tok.add_bos).tokens
    if not quiet:
        print(f"imatrix: {windows.shape[0]} chunks of {ctx} tokens; BOS "
              f"{'first' if tok.add_bos else 'not used'}", file=sys.stderr)
    datasets = [str(args.text)]

    def combined(imx):
        return imx if base is None else base.merge(imx)

    def on_chunk(done: int, snapshot) -> None:
        freq = args.output_frequency
        if freq and done % freq == 0 and done < windows.shape[0]:
            _save(combined(snapshot()), out, fmt)

    result = combined(collect_imatrix(model, windows, progress=not quiet, datasets=datasets,
                                      process_output=getattr(args, "process_output", False), on_chunk=on_chunk))
    _save(result, out, fmt)
    print(f"stored {len(result)} entries after {result.chunk_count} chunks of {ctx} tokens in {out}")
    if args.show_statistics:
        print(format_statistics(result))
