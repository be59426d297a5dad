"""Quantize a Hugging Face model directory with AutoRound (Intel's SignRound) on CPU into one llama.cpp GGUF.

Run with the python of the venv that benchmarks/setup_autoround.sh makes (not the project's venv):

    PY=$(bash benchmarks/setup_autoround.sh | tail -1)
    $PY benchmarks/autoround_gguf.py HF_DIR OUT.gguf --format gguf:q2_k_s [--iters N] [--nsamples N]
        [--seqlen N] [--batch-size N] [--lr X] [--alg-ext] [--no-amp] [--fallback q4_0] [--calib TEXTFILE]
        [--tokenizer-gguf GGUF] [--threads N] [--keep-work]

Defaults are a CPU budget (2 shared cores: SmolLM2-135M in ~10-15 min, Qwen2.5-0.5B in ~30-40 min): --iters 20
--nsamples 32 --seqlen 512 --batch-size 8 (plain SignRound). AutoRound's own tuning defaults (200 iters, 128 x 2048,
batch 8) cost ~15-20 min per SmolLM2 block on 2 shared cores, i.e. ~8-9 hours. For GGUF K-quants AutoRound itself
recommends --iters 0 ("optimized RTN": calibrated scale search, no SignRound steps; it warns that iters>0 wants
enable_alg_ext), and on SmolLM2 q2_k_s iters 0 came out better than iters 20 in a quick check; --alg-ext
(SignRoundV2) costs ~2x plain SignRound per step.

Calibration is local text only (default ../shared/data/calibration/groups_merged.txt): the file is tokenized once
and cut into --nsamples windows of exactly --seqlen tokens (consecutive, non-overlapping when the text is long
enough, else windows at seeded random offsets), handed to AutoRound as a list of token tensors -- so AutoRound's
own dataset loader (which downloads NeelNanda/pile-10k, or reads only .json/.jsonl) is never used.

Tokenizer: AutoRound needs one (calibration, and its GGUF export writes the vocab from the HF tokenizer files).
`twinquant convert MODEL -o DIR` writes config.json + model.safetensors only, so when HF_DIR has no tokenizer files
pass --tokenizer-gguf with a GGUF of the same model (the packaged one, or the F16 reference): its BPE vocab, merges,
special tokens and chat template are rebuilt as tokenizer.json / tokenizer_config.json in a staging copy of HF_DIR
(symlinks; HF_DIR itself is not touched). Supported: tokenizer.ggml.model 'gpt2' with pre 'smollm', 'qwen2',
'llama-bpe' or 'gpt-2'. The export then checks the rebuilt tokenizer the way llama.cpp does (pre-tokenizer hash).

The GGUF is written atomically: AutoRound exports into a work directory beside OUT, the .gguf found there is
renamed to OUT. Prints the quantize+export time, its average per transformer block and the CPU time (AutoRound's
progress bar shows each block). On failure: one line
`autoround_gguf: error: ...` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

# No hub here: never let transformers / datasets / huggingface_hub reach for the network.
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("AUTO_ROUND_GGUF_AUTO_UPDATE", "0")   # no fetching of llama.cpp's converter from GitHub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CALIB = ROOT.parent / "shared" / "data" / "calibration" / "groups_merged.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")

# Pre-tokenizer regexes of llama.cpp's BPE 'pre' types (as in the models' own tokenizer.json files).
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class Failure(Exception):
    """A failure with a message meant for the user (printed as the one error line)."""


def log(msg: str) -> None:
    print(f"[autoround_gguf {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- tokenizer from a GGUF --------------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def tokenizer_from_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json rebuilt from the tokenizer metadata of a llama.cpp GGUF."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    rd = gguf.GGUFReader(str(gguf_path))
    kind = _field(rd, "tokenizer.ggml.model")
    pre = _field(rd, "tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise Failure(f"{gguf_path}: tokenizer.ggml.model={kind!r}; only BPE ('gpt2') tokenizers can be rebuilt")
    tokens = _field(rd, "tokenizer.ggml.tokens")
    types = _field(rd, "tokenizer.ggml.token_type")
    merges = _field(rd, "tokenizer.ggml.merges")
    if not tokens or not merges or types is None:
        raise Failure(f"{gguf_path}: no tokenizer.ggml.tokens / token_type / merges")
    UNUSED, CONTROL, USER_DEFINED = 5, 3, 4
    # Trailing [PADn] fillers (UNUSED) are not part of the HF vocab; llama.cpp's converter pads them back itself.
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != UNUSED}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
    elif pre in ("qwen2", "llama-bpe"):
        tok.normalizer = normalizers.NFC() if pre == "qwen2" else None
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_RE if pre == "qwen2" else LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("gpt-2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise Failure(f"{gguf_path}: tokenizer.ggml.pre={pre!r} is not one this script can rebuild "
                      "(smollm, qwen2, llama-bpe, gpt-2)")
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, ty in enumerate(types) if ty == CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, ty in enumerate(types) if ty == USER_DEFINED])

    def special(key):
        i = _field(rd, f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(_field(rd, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out_dir / "tokenizer.json"))
    arch = _field(rd, "general.architecture")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "pad_token": special("padding"), "unk_token": special("unknown"), "add_bos_token": add_bos,
           "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": int(_field(rd, f"{arch}.context_length", 2048))}
    tmpl = _field(rd, "tokenizer.chat_template")
    if tmpl:
        cfg["chat_template"] = tmpl
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def stage_model(hf_dir: Path, stage: Path, tokenizer_gguf: Path | None) -> None:
    """A directory of symlinks to HF_DIR's files, plus tokenizer files rebuilt from a GGUF when asked/needed."""
    stage.mkdir()
    for p in hf_dir.iterdir():
        (stage / p.name).symlink_to(p.resolve())
    has_tok = any((hf_dir / f).exists() for f in TOKENIZER_FILES)
    if tokenizer_gguf is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", *TOKENIZER_FILES):
            if (stage / f).is_symlink():
                (stage / f).unlink()
        tokenizer_from_gguf(tokenizer_gguf, stage)
        log(f"tokenizer rebuilt from {tokenizer_gguf.name}")
    elif not has_tok:
        raise Failure(f"{hf_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); AutoRound needs one for "
                      "calibration and for the GGUF vocab: pass --tokenizer-gguf with a GGUF of the same model")


def preflight_gguf(stage: Path, work: Path) -> None:
    """Run the vocab + metadata part of AutoRound's GGUF export (llama.cpp's converter) before any tuning, so
    that a tokenizer / architecture problem fails in seconds rather than after the whole quantization."""
    import gguf
    from auto_round.export.export_to_gguf.config import ModelType
    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    conv = get_conversion(stage, model_type=ModelType.TEXT)
    hparams = conv.ModelBase.load_hparams(stage, False)
    arch = conv.get_model_architecture(hparams, conv.model_type(ModelType.TEXT))
    cls = conv.get_model_class(arch, model_type=ModelType.TEXT)
    inst = cls(dir_model=stage, ftype=gguf.LlamaFileType.MOSTLY_F16, fname_out=work / "preflight.gguf",
               model_name="preflight", dry_run=True, hparams=hparams)
    try:
        inst.set_gguf_parameters()
        inst.set_vocab()
    except (NotImplementedError, ImportError, OSError, KeyError, ValueError) as e:
        raise Failure(f"AutoRound's GGUF export (llama.cpp {cls.__name__}) cannot write this model's vocab/metadata: "
                      f"{type(e).__name__}: {e}".splitlines()[0]) from e
    log(f"GGUF export pre-check ok ({arch} -> {cls.__name__})")


def set_kquant_fallback(qtype: str) -> None:
    """AutoRound stores a K-quant tensor whose input dim is not a multiple of 256 (SmolLM2's 576, Qwen2.5-0.5B's
    896) as Q5_0 (5.5 bpw) for q2_k..q5_k; llama-quantize uses 4.5 bpw (Q4_0 / IQ4_NL) for Q2_K and Q3_K. Make
    AutoRound fall back to `qtype` for q2_k/q3_k instead, so the file sizes compare (tuning follows the choice)."""
    from auto_round.export.formats.backends import gguf as backend

    stock = backend._gguf_type_fallback

    def fallback(gguf_type: str) -> str:
        return f"gguf:{qtype}" if gguf_type.lower() in ("gguf:q2_k", "gguf:q3_k") else stock(gguf_type)

    backend._gguf_type_fallback = fallback


# --- calibration ------------------------------------------------------------------------------------------------
def calibration(tokenizer, path: Path, nsamples: int, seqlen: int, seed: int):
    import torch

    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids)
    if n < seqlen + 1:
        raise Failure(f"{path}: {n} tokens, fewer than --seqlen {seqlen}")
    if n >= nsamples * seqlen:
        starts, how = [i * seqlen for i in range(nsamples)], "consecutive"
    else:
        rng = random.Random(seed)
        starts, how = [rng.randrange(0, n - seqlen) for _ in range(nsamples)], "random (overlapping)"
    ids_t = torch.tensor(ids, dtype=torch.long)
    samples = [ids_t[s:s + seqlen].unsqueeze(0) for s in starts]
    log(f"calibration: {path.name}, {n} tokens -> {nsamples} x {seqlen} {how} windows")
    return samples


# --- main -------------------------------------------------------------------------------------------------------
def find_gguf(export_dir: Path) -> Path:
    found = [p for p in export_dir.rglob("*.gguf") if "mmproj" not in p.name]
    if len(found) != 1:
        listing = sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file())
        raise Failure(f"expected one .gguf in AutoRound's output, found {len(found)}: {listing[:20]}")
    return found[0]


def run(args) -> None:
    hf_dir, out = Path(args.hf_dir).resolve(), Path(args.out).resolve()
    fmt = args.format.lower()
    if not fmt.startswith("gguf:"):
        raise Failure(f"--format {args.format!r}: expected gguf:TYPE, e.g. gguf:q2_k_s")
    if not (hf_dir / "config.json").is_file():
        raise Failure(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    calib = Path(args.calib)
    if not calib.is_file():
        raise Failure(f"calibration text {calib} not found")
    tok_gguf = Path(args.tokenizer_gguf).resolve() if args.tokenizer_gguf else None
    if tok_gguf is not None and not tok_gguf.is_file():
        raise Failure(f"--tokenizer-gguf {tok_gguf} not found")
    out.parent.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"auto-round {auto_round.__version__}, torch {torch.__version__}, {threads} threads; {fmt}, "
        f"iters {args.iters}, nsamples {args.nsamples}, seqlen {args.seqlen}, batch {args.batch_size}")
    work = Path(tempfile.mkdtemp(prefix=f".{out.stem}.autoround-", dir=out.parent))
    try:
        stage = work / "model"
        stage_model(hf_dir, stage, tok_gguf)
        preflight_gguf(stage, work)
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(str(stage))
        model = AutoModelForCausalLM.from_pretrained(str(stage), dtype=torch.float32, device_map="cpu")
        model.eval()
        n_blocks = int(getattr(model.config, "num_hidden_layers", 0) or 0)
        log(f"loaded {hf_dir.name}: {model.config.model_type}, {n_blocks} blocks, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params ({time.perf_counter() - t0:.1f}s)")
        samples = calibration(tokenizer, calib, args.nsamples, args.seqlen, args.seed)

        if args.fallback != "autoround":
            set_kquant_fallback(args.fallback)
        t0, c0 = time.perf_counter(), time.process_time()
        extra = {"lr": args.lr} if args.lr is not None else {}
        if args.alg_ext:
            extra["enable_alg_ext"] = True
        ar = AutoRound(model, tokenizer=tokenizer, scheme=fmt.upper(), dataset=samples, iters=args.iters,
                       nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device_map="cpu",
                       enable_torch_compile=args.compile, seed=args.seed, low_gpu_mem_usage=False, amp=args.amp,
                       **extra)
        export_dir = work / "export"
        ar.quantize_and_save(output_dir=str(export_dir), format=fmt)
        t_quant, c_quant = time.perf_counter() - t0, time.process_time() - c0
        src = find_gguf(export_dir)
        os.replace(src, out)
        size = out.stat().st_size
        per_block = f" = {t_quant / n_blocks:.1f}s per block" if n_blocks else ""
        log(f"wrote {out} ({size / 2**20:.1f} MiB); quantize+export {t_quant:.1f}s{per_block} "
            f"(CPU {c_quant:.0f}s); total {time.perf_counter() - t_all:.1f}s")
    finally:
        if args.keep_work:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("out", help="the GGUF to write")
    ap.add_argument("--format", default="gguf:q2_k_s", help="AutoRound GGUF format (default gguf:q2_k_s)")
    ap.add_argument("--iters", type=int, default=20,
                    help="SignRound steps per block; 0: optimized RTN (AutoRound's default: 200)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (AutoRound's default: 128)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (AutoRound's default: 2048)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per tuning step (AutoRound's default: 8)")
    ap.add_argument("--lr", type=float, default=None, help="SignRound learning rate (AutoRound's default: 1/iters)")
    ap.add_argument("--alg-ext", action="store_true",
                    help="SignRoundV2 (enable_alg_ext): what AutoRound recommends with iters>0 for GGUF K-quants")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast while tuning (AutoRound's default; --no-amp tunes in fp32)")
    ap.add_argument("--fallback", default="autoround", choices=["autoround", "q4_0", "q4_1", "q5_0", "q8_0"],
                    help="type for q2_k/q3_k tensors whose rows are not a multiple of 256 (autoround: its own "
                         "choice, q5_0; llama-quantize uses 4.5 bpw there: q4_0 matches that size)")
    ap.add_argument("--calib", default=str(DEFAULT_CALIB), help="calibration text file (default %(default)s)")
    ap.add_argument("--tokenizer-gguf", help="rebuild the tokenizer from this GGUF (needed when HF_DIR has none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compile", action="store_true", help="let AutoRound use torch.compile (off: slow on CPU)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work directory (staging + export)")
    args = ap.parse_args(argv)
    try:
        run(args)
    except Failure as e:
        print(f"autoround_gguf: error: {e}", file=sys.stderr, flush=True)
        return 1
    except SystemExit as e:   # AutoRound calls sys.exit(-1) after logging some errors
        if e.code in (0, None):
            raise
        print(f"autoround_gguf: error: AutoRound exited with status {e.code} (see its log above)", file=sys.stderr,
              flush=True)
        return 1
    except KeyboardInterrupt:
        print("autoround_gguf: error: interrupted", file=sys.stderr, flush=True)
        return 1
    except Exception as e:   # one clear line; AUTOROUND_GGUF_TRACEBACK=1 re-raises for the traceback
        print(f"autoround_gguf: error: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr, flush=True)
        if os.environ.get("AUTOROUND_GGUF_TRACEBACK"):
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
