"""Command line: `twinquant inspect | perplexity | generate | convert | rotate | activations | models`.

Option names follow llama.cpp's tools where they have one (`-c/--ctx-size`, `--chunks`, `-f`,
`--kl-divergence-base`, `--kl-divergence`, `-n`, `--temp`, `--top-k`, `--top-p`, `--seed`).
A user error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

import twinquant
from twinquant.calibration.windows import calibration_for
from twinquant.errors import TwinquantError

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _load(args, materialize: bool = True):
    from twinquant.io.load import load_model

    return load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, materialize=materialize)


def _write_json(path: str, obj: dict) -> None:
    from twinquant.pipeline.report import write_json

    write_json(path, obj)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# --- imatrix --------------------------------------------------------------------------------------------------
def cmd_imatrix(args) -> None:
    from twinquant.calibration.imatrix import format_statistics
    from twinquant.calibration.imatrix_run import check_options, read_inputs, run_imatrix

    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    check_options(args.text, args.ctx, args.chunks, args.output_frequency)
    out = Path(args.output)
    if args.output_format == "gguf" and out.suffix != ".gguf" and log:
        log(f"twinquant: warning: {out}: saving the imatrix as GGUF with a suffix other than .gguf "
            f"(--output-format dat writes the legacy format)")
    from twinquant.pipeline.prepare import Preparation, apply

    prep = Preparation(args.rotation, args.seed, args.pad, args.pad_multiple)
    if prep.basis() is not None and args.output_format == "dat":
        raise TwinquantError("the legacy .dat format cannot record the rotation / padding: use --output-format gguf")
    base = read_inputs(args.in_files, args.ctx, log)       # read before the model loads, to fail fast
    model = apply(_load(args, materialize=False), prep, log=log)     # lazily: in the basis quantize will use
    result = run_imatrix(model, args.text, out, args.ctx, args.chunks, args.output_frequency, base,
                         args.output_format, args.process_output, progress=not args.quiet, log=log,
                         basis=prep.basis())
    print(f"stored {len(result)} entries after {result.chunk_count} chunks of {args.ctx} tokens in {out}")
    if args.show_statistics:
        print(format_statistics(result))


# --- inspect --------------------------------------------------------------------------------------------------
def cmd_inspect(args) -> None:
    model = _load(args, materialize=False)
    s = model.spec
    per_role: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0, "types": set()})
    for name in model.tensor_names():
        info = model.tensor_info(name)
        parts = name.split(".")
        role = (parts[2] if parts[0] == "blk" else parts[0]) + ("" if parts[-1] == "weight" else "." + parts[-1])
        r = per_role[role]
        n = 1
        for d in info.shape:
            n *= d
        r["tensors"] += 1
        r["params"] += n
        r["bytes"] += info.nbytes
        r["types"].add(info.source_type)
    total_bytes = sum(r["bytes"] for r in per_role.values())
    n_params = model.n_params()
    print(f"model:        {model.source.path if model.source else '(in memory)'}")
    print(f"name:         {s.name}")
    print(f"architecture: {s.arch}")
    print(f"layers {s.n_layers}, hidden {s.hidden}, ffn {s.intermediate}, heads {s.n_heads} / kv {s.n_kv_heads}, "
          f"head_dim {s.head_dim}, vocab {s.vocab}")
    print(f"rope theta {s.rope_theta:g}, rms eps {s.rms_eps:g}, context {s.context_length}, "
          f"tied embeddings {s.tied_embeddings}, qkv bias {s.qkv_bias}, q/k norm {s.qk_norm}")
    if s.moe:
        print(f"experts {s.n_experts}, {s.n_experts_used} per token, expert ffn {s.expert_ffn}"
              + (f", shared expert ffn {s.shared_ffn}" if s.shared_ffn else "")
              + f", {s.gating} scores, top-k weights {'renormalized' if s.norm_topk else 'not renormalized'}"
              + (f" x {s.expert_scale:g}" if s.expert_scale != 1 else "")
              + (", selection bias" if s.expert_bias else "")
              + (f", best {s.groups_used} of {s.n_groups} groups" if s.n_groups > 1 else "")
              + (f", first {s.n_dense_lead} blocks dense" if s.n_dense_lead else ""))
    if s.mla:
        print(f"latent attention: kv rank {s.kv_lora_rank}, q rank {s.q_lora_rank or '- (direct)'}, "
              f"rope dims {s.rope_dim} of {s.head_dim}, value dims {s.v_head_dim}")
    print(f"parameters:   {n_params:,} ({n_params / 1e6:.1f} M)")
    print(f"tensor bytes: {_human(total_bytes)} ({8 * total_bytes / n_params:.2f} bits per weight)")
    if model.tokenizer is not None:
        t = model.tokenizer
        print(f"tokenizer:    vocab {t.vocab_size}, bos {t.bos_id}, eos {t.eos_id}, add_bos {t.add_bos}")
    print()
    print(f"{'role':<16} {'tensors':>7} {'params':>13} {'bytes':>11} {'bpw':>6}  types")
    for role, r in per_role.items():
        print(f"{role:<16} {r['tensors']:>7} {r['params']:>13,} {_human(r['bytes']):>11} "
              f"{8 * r['bytes'] / r['params']:>6.2f}  {', '.join(sorted(r['types']))}")
    if args.json:
        _write_json(args.json, {
            "path": model.source.path if model.source else None, "spec": s.to_dict(), "params": n_params,
            "bytes": total_bytes,
            "roles": {k: {**v, "types": sorted(v["types"])} for k, v in per_role.items()},
        })


# --- perplexity -----------------------------------------------------------------------------------------------
def cmd_perplexity(args) -> None:
    from twinquant.eval.logits_file import LogitsFile, is_logits_file
    from twinquant.eval.perplexity import evaluate, logprob_file_size, windows_for_text
    from twinquant.eval.stats import format_kld

    text_path = Path(args.text)
    if not text_path.is_file():
        raise TwinquantError(f"{text_path}: no such text file")
    if args.kl_divergence and not args.kl_divergence_base:
        raise TwinquantError("--kl-divergence needs --kl-divergence-base FILE (the saved reference)")
    if args.ref and args.kl_divergence_base:
        raise TwinquantError("give either --ref or --kl-divergence-base, not both")
    model = _load(args, materialize=False)     # evaluated block by block (one block in memory)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    windows = windows_for_text(model, text, args.ctx, args.chunks, args.protocol, args.skip_chunks)
    print(f"{windows.describe()}; BOS {'first' if model.tokenizer.add_bos else 'not used'}", file=sys.stderr)

    ref, save = None, None
    ref_path = args.ref or (args.kl_divergence_base if args.kl_divergence else None)
    if ref_path:
        if is_logits_file(ref_path):
            ref = LogitsFile.open(ref_path)
        elif args.kl_divergence:
            raise TwinquantError(f"{ref_path}: not a saved log-prob file")
        else:
            from twinquant.io.load import load_model

            ref = load_model(ref_path, dtype=DTYPES[args.dtype], device=args.device, materialize=False)
            if ref.spec.vocab != model.spec.vocab:
                raise TwinquantError(f"reference vocab {ref.spec.vocab} != model vocab {model.spec.vocab}")
    elif args.kl_divergence_base:
        save = args.kl_divergence_base
        print(f"saving reference log-probs to {save} "
              f"({_human(logprob_file_size(windows, model.spec.vocab))})", file=sys.stderr)

    res = evaluate(model, windows, ref=ref, save_logprobs=save, progress=not args.quiet)
    res["model"] = str(args.model)
    if ref_path:
        res["ref"] = str(ref_path)
    print(f"Final estimate: PPL = {res['ppl']:.4f} +/- {res['ppl_err']:.5f}")
    if ref is not None:
        print(f"Reference:      PPL = {res['ref_ppl']:.4f}")
        print(format_kld(res))
    if args.json:
        _write_json(args.json, res)


# --- generate -------------------------------------------------------------------------------------------------
def cmd_generate(args) -> None:
    from twinquant.runtime.generate import Sampling, generate, stream_text

    from twinquant.runtime.packed_weights import load_for_decode

    model, counts = load_for_decode(args.model, DTYPES[args.dtype], args.device, kernels=not args.no_kernels,
                                    iquants=args.iq_kernels)
    if counts and not args.quiet:       # K-quant linears decode from their GGML bytes on the GPU (Triton kernels)
        print("packed on the GPU: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())), file=sys.stderr)
    tok = model.tokenizer
    if tok is None:
        raise TwinquantError("the model has no tokenizer")
    prompt = args.prompt
    if args.chat:
        prompt = _chat_prompt(tok, prompt)
    ids = tok.encode(prompt)
    if not ids:
        raise TwinquantError("the prompt is empty")
    sampling = Sampling(args.temp, args.top_k, args.top_p, args.seed)
    if not args.chat:
        sys.stdout.write(args.prompt)
    new = generate(model, ids, args.n_predict, sampling, use_cache=not args.no_cache,
                   stop=tok.eog_ids if not args.ignore_eos else frozenset(), graphs=not args.no_graphs)
    for piece in stream_text(tok, (i for i in new if i not in tok.eog_ids)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat_prompt(tok, user: str) -> str:
    if not tok.chat_template:
        raise TwinquantError("--chat: the model has no chat template")
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # the template comes from the file: sandbox it

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
    return env.from_string(tok.chat_template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True, bos_token=bos, eos_token=eos)


# --- convert --------------------------------------------------------------------------------------------------
def cmd_convert(args) -> None:
    from twinquant.pipeline.save import save_model

    model = _load(args, materialize=False)
    save_model(model, args.output, args.outtype, not args.quiet, args.split_max_size)
    print(f"wrote {args.output}")


# --- rotate / activations -------------------------------------------------------------------------------------
def cmd_rotate(args) -> None:
    from twinquant.pipeline.rotate import RotateOptions, rotate

    o = RotateOptions(rotation=args.rotation, seed=args.seed, online=args.online, r2=not args.no_r2,
                      ro_iters=args.ro_iters, outtype=args.outtype, calib=args.calib, calib_tokens=args.calib_tokens,
                      calib_ctx=args.calib_ctx, dtype=args.dtype, device=args.device, quiet=args.quiet)
    rotate(args.model, args.output, o, log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {args.output}")


def cmd_activations(args) -> None:
    from twinquant.rotation.massive import detect_massive

    model = _load(args)
    calib = calibration_for(args, model)
    report = detect_massive(model, calib.windows, args.percentile, args.factor, progress=not args.quiet)
    print(report.table())
    print(f"massive-activation channels: {report.channels() or 'none'}; flagged positions: "
          f"{dict(list(report.positions().items())[:12]) or 'none'}")
    out = Path(args.output)
    report.write_json(out.with_suffix(".json"))
    report.plot(out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


# --- quantize / measure ---------------------------------------------------------------------------------------
def _recipe(args):
    """The recipe named by --recipe (default: `default`), with every option given on the command line on top."""
    import dataclasses

    from twinquant.pipeline.recipe import load_recipe

    r = load_recipe(args.recipe)
    changes = {k: getattr(args, k) for k in ("method", "output_tensor_type", "token_embedding_type", "rotation",
                                              "seed", "pad_multiple", "damp", "calib", "calib_tokens", "calib_ctx")}
    for flag in ("pure", "pad", "act_order"):
        changes[flag] = True if getattr(args, flag) else None
    if args.mix or args.format:    # either replaces both of the recipe's
        r = dataclasses.replace(r, mix=args.mix, format=args.format)
    r = dataclasses.replace(r, tensor_type=list(r.tensor_type) + list(args.tensor_type or []))
    return r.replace(**changes)


def _options(args, **extra):
    from twinquant.pipeline import Options

    names = ("outtype", "split_max_size", "imatrix", "target_size", "target_bpw", "measurement", "kld_windows",
             "kld_skip", "cost", "candidates", "sample_rows", "keep_blocks", "from_measurement", "dry_run", "report",
             "resume", "work_dir", "keep_work")
    kw = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if getattr(args, "exact", False):
        kw["cost"] = "exact"
    kw["min_type"] = tuple(getattr(args, "min_type", None) or ())
    kw["exclude_type"] = tuple(getattr(args, "exclude_type", None) or ())
    if getattr(args, "in_memory", False):
        kw["stream"] = False
    return Options(dtype=DTYPES[args.dtype], device=args.device, quiet=args.quiet, **kw, **extra)


def cmd_measure(args) -> None:
    import time

    from twinquant.pipeline import measure

    t0 = time.perf_counter()
    m = measure(args.model, args.output, _recipe(args), _options(args))
    _print_measurement(m)
    print(f"wrote {args.output} ({time.perf_counter() - t0:.0f} s this run, {m.seconds:.0f} s in all; "
          f"sha256 {m.sha256()[:12]})")


def _print_measurement(m) -> None:
    """Per role: mean predicted KL per candidate type (the table a person reads)."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    types: list[str] = []
    for n, t in m.tensors.items():
        role = n.split(".")[2] if n.startswith("blk.") else n.split(".")[0]
        for ty, c in t["candidates"].items():
            by[role][ty].append(c["cost"])
            if ty not in types:
                types.append(ty)
    print(f"{'role':<14}" + "".join(f"{t:>10}" for t in types))
    for role, d in by.items():
        print(f"{role:<14}" + "".join(f"{sum(d[t]) / len(d[t]):>10.5f}" if t in d else f"{'':>10}" for t in types))


def cmd_quantize(args) -> None:
    from twinquant.pipeline import quantize

    res = quantize(args.model, args.output, _recipe(args), _options(args))
    if args.dry_run:
        print(res.dry_run_text)
        return
    print(f"wrote {args.output}: {res.file_bytes / 2**20:.1f} MiB, {res.bits_per_weight:.3f} bits per weight (file)"
          + (f", predicted KLD {res.allocation.total_cost:.5f}" if res.allocation is not None else "")
          + f", {res.seconds:.0f} s")



def cmd_models(args) -> None:
    from twinquant import zoo

    for name, m in zoo.PACKAGED.items():
        try:
            where = zoo.resolve(name) if (len(m.parts) == 1 or args.assemble) else None
            state = str(where) if where else "installed parts; `twinquant models --assemble` builds the file"
            m.part_paths()
        except TwinquantError as e:
            state = str(e)
        print(f"{name:<20} {state}")


def _generate_options(sp) -> None:
    sp.add_argument("-p", "--prompt", required=True)
    sp.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    sp.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    sp.add_argument("--top-k", type=int, default=40)
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    sp.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    sp.add_argument("--ignore-eos", action="store_true")
    sp.add_argument("--no-kernels", action="store_true", help="on CUDA: dequantize every weight to --dtype instead "
                    "of multiplying K-quant weights from their packed bytes (Triton)")
    sp.add_argument("--iq-kernels", action="store_true", help="on CUDA: multiply i-quant linears from their packed "
                    "bytes too (Triton; exact, but slower than dequantizing them at load)")
    sp.add_argument("--no-graphs", action="store_true", help="on CUDA: launch every decode step's kernels from "
                    "Python instead of replaying one CUDA graph")


# --- roofline -------------------------------------------------------------------------------------------------
def cmd_roofline(args) -> None:
    from twinquant.runtime import roofline as rf

    for d in args.device:
        if d not in rf.DEVICES:
            raise TwinquantError(f"roofline: unknown device {d!r} (known: {', '.join(rf.DEVICES)})")
    if (args.model is None) == (args.shape is None):
        raise TwinquantError("roofline: give a GGUF file, or --shape NAME with --mix (not both)")
    if args.shape and not args.mix:
        raise TwinquantError("roofline: --shape needs --mix (e.g. llama.cpp:IQ2_XS)")
    if args.shape:
        spec = rf.shape_spec(args.shape)
        tb = rf.plan_token_bytes(spec, rf.mix_types(spec, args.mix), args.ctx)
        what = f"{args.shape} in {args.mix}"
    else:
        from twinquant.io.load import load_model

        model = load_model(args.model, load_tokenizer=False)
        spec, tb = model.spec, rf.file_token_bytes(model, args.ctx)
        what = str(args.model)
    preds = [rf.predict(tb, d, args.bandwidth) for d in args.device]
    print(rf.format_report(what, tb, rf.n_weights(spec), preds))
    if args.json:
        _write_json(args.json, {"what": what, "predictions": [p.to_dict() for p in preds]})


# --- duplication ----------------------------------------------------------------------------------------------
def cmd_sensitivity(args) -> None:
    from twinquant.pipeline.sensitivity import SensitivityOptions, sensitivity

    o = SensitivityOptions(output=args.output, calib=args.calib, calib_tokens=args.calib_tokens,
                           calib_ctx=args.calib_ctx, dtype=args.dtype, device=args.device, quiet=args.quiet)
    sens = sensitivity(args.model, args.quantized, o)
    print(f"KLD on {sens.meta['calibration_tokens']} calibration tokens: all quantized {sens.kld_quantized:.5f}")
    print(sens.table(args.top))
    js, png = Path(args.output).with_suffix(".json"), Path(args.output).with_suffix(".png")
    print(f"wrote {js} and {png}")


def cmd_duplicate(args) -> None:
    import dataclasses

    from twinquant.pipeline.duplicate import DuplicateOptions, duplicate

    opts = DuplicateOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DuplicateOptions)})
    res = duplicate(args.model, args.output, opts)
    cost = res.cost
    print(f"topology: {json.dumps(res.topology)}")
    print(f"extra block executions {cost['extra_layers']}, extra compute {cost['extra_flops_pct']:.1f}%, "
          f"extra KV cache {_human(cost['extra_memory'])} at {opts.budget_context} tokens, extra weight bytes 0; "
          f"calibration KLD {res.calibration_kld:.5f}")
    print(f"wrote {res.path}")
    if args.report:
        _write_json(args.report, res.to_dict())


# --- parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinquant", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"twinquant {twinquant.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_model(sp):
        sp.add_argument("model", help="HF directory, GGUF file, or a packaged model name (see `models`)")
        sp.add_argument("--dtype", choices=sorted(DTYPES), default="f32", help="compute dtype (default f32)")
        sp.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
        return sp

    sp = with_model(sub.add_parser("inspect", help="architecture, dimensions, parameters, bytes and types per role"))
    sp.add_argument("--json", help="also write the report as JSON")
    sp.set_defaults(func=cmd_inspect)

    sp = with_model(sub.add_parser("perplexity", help="perplexity, and KL divergence to a reference"))
    sp.add_argument("-f", "--text", "--file", dest="text", required=True, help="evaluation text file")
    sp.add_argument("--ref", help="reference: a model, or a log-prob file saved with --kl-divergence-base")
    sp.add_argument("-c", "--ctx", "--ctx-size", dest="ctx", type=int, default=512, help="window (default 512)")
    sp.add_argument("--chunks", type=int, default=None, help="evaluate at most N windows")
    sp.add_argument("--skip-chunks", type=int, default=0, metavar="N",
                    help="start after the first N windows (a measurement's held-out windows: N = its calibration "
                         "windows)")
    sp.add_argument("--protocol", choices=["llama.cpp", "sliding"], default="llama.cpp")
    sp.add_argument("--kl-divergence-base", help="save this model's log-probs here (or read them, with "
                                                 "--kl-divergence)")
    sp.add_argument("--kl-divergence", action="store_true", help="compare with --kl-divergence-base")
    sp.add_argument("--json", help="write the result as JSON")
    sp.set_defaults(func=cmd_perplexity)

    for cmd, text in (("generate", "generate text (greedy or sampled), streamed"),
                      ("run", "run a twinquant GGUF with its full semantics (duplicated layers, online "
                              "transforms, activation quantization): generate from a prompt")):
        sp = with_model(sub.add_parser(cmd, help=text))
        _generate_options(sp)
        sp.set_defaults(func=cmd_generate)

    sp = with_model(sub.add_parser("convert", help="write the model as a float GGUF (-o X.gguf) or HF directory"))
    sp.add_argument("-o", "--output", required=True)
    sp.add_argument("--split-max-size", help="split the GGUF into llama.cpp shards of at most this size (50M, 2G)")
    sp.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16")
    sp.set_defaults(func=cmd_convert)

    def with_calib(sp, recipe: bool = False):   # recipe: defaults come from the recipe, not from here
        sp.add_argument("--calib", help="calibration text (default ../shared/data/calibration/groups_merged.txt)")
        sp.add_argument("--calib-tokens", type=int, default=None if recipe else 8192,
                        help="calibration tokens (default " + ("the recipe's; `default`: 2 per input of the widest "
                             "linear, at least 8192)" if recipe else "8192)"))
        sp.add_argument("--calib-ctx", type=int, default=None if recipe else 512,
                        help="calibration window (default 512)")
        return sp

    sp = with_calib(with_model(sub.add_parser("rotate", help="fuse norms and rotate (R1 RH/RO, R2, online R3/R4)")))
    sp.add_argument("-o", "--output", required=True, help="X.gguf (float GGUF) or a directory (HF)")
    sp.add_argument("--rotation", choices=["rh", "ro"], default="rh", help="R1: randomized Hadamard or optimized")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--online", default="", help="online transforms, e.g. r4 or r4,r3 (need twinquant's runtime)")
    sp.add_argument("--no-r2", action="store_true", help="skip the per-head R2 rotation")
    sp.add_argument("--ro-iters", type=int, default=20)
    sp.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f32")
    sp.set_defaults(func=cmd_rotate)

    sp = with_calib(with_model(sub.add_parser("activations", help="massive-activation report (JSON + PNG)")))
    sp.add_argument("-o", "--output", default="activations", help="output stem: STEM.json and STEM.png")
    sp.add_argument("--percentile", type=float, default=99.9)
    sp.add_argument("--factor", type=float, default=10.0, help="threshold = factor x percentile (default 10)")
    sp.set_defaults(func=cmd_activations)

    sp = with_calib(with_model(sub.add_parser("quantize", help="quantize into llama.cpp block formats -> GGUF")),
                    recipe=True)
    sp.add_argument("-o", "--output", required=True, help="output .gguf")
    sp.add_argument("--recipe", help="a built-in recipe name or a YAML file (default: `default`); the options "
                    "below override its fields")
    sp.add_argument("--method", choices=["gptq", "rtn", "hqq"],
                    help="gptq, rtn, or hqq (integer grids only); recipe default gptq")
    sp.add_argument("--mix", help="type mix: llama.cpp:FTYPE (the types llama-quantize picks, e.g. llama.cpp:Q2_K) "
                    "or twinquant:Q2_K (measured role rules in llama.cpp Q2_K's bytes)")
    sp.add_argument("--format", help="one type for every 2-D tensor (with llama.cpp's fallbacks), e.g. Q4_K")
    sp.add_argument("--tensor-type", action="append", metavar="REGEX=TYPE", help="per-tensor override (repeatable)")
    sp.add_argument("--output-tensor-type", help="type of output.weight")
    sp.add_argument("--token-embedding-type", help="type of token_embd.weight")
    sp.add_argument("--pure", action="store_true", help="no mix rules: the default type everywhere")
    sp.add_argument("--rotation", choices=["none", "rh", "ro", "auto"],
                    help="R1+R2 before quantizing; auto = rh unless the embeddings are tied or the model has experts")
    sp.add_argument("--seed", type=int)
    sp.add_argument("--act-order", action="store_true", help="GPTQ act-order (with static groups)")
    sp.add_argument("--damp", type=float, help="GPTQ damping: λ = DAMP x mean(diag H) (recipe default 0.5)")
    sp.add_argument("--pad", action="store_true", help="pad hidden / ffn / heads with zeros to a multiple of "
                    "--pad-multiple (exact; lets 576- or 896-wide models use K-quants instead of fallbacks)")
    sp.add_argument("--pad-multiple", type=int)
    sp.add_argument("--split-max-size", help="split the GGUF into llama.cpp shards of at most this size (50M, 2G)")
    sp.add_argument("--dry-run", action="store_true", help="print the recipe and the type of every tensor, and exit")
    sp.add_argument("--report", help="write the per-tensor report as JSON (and a PNG beside it)")
    sp.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16", help="type of unquantized 2-D tensors")
    sp.add_argument("--imatrix", help="importance matrix (llama.cpp imatrix.gguf or legacy .dat, from llama-imatrix "
                    "or `twinquant imatrix`) for the block fits; default: the calibration's own")
    sp.add_argument("--target-size", help="choose each tensor's type from a measurement so the whole file is at "
                    "most this size (85MB, 81.5MiB, bytes)")
    sp.add_argument("--target-bpw", type=float, help="as --target-size, for tensor data per source weight in bits "
                    "(llama.cpp's BPW)")
    sp.add_argument("--measurement", help="measurement JSON for --target-*: reused if it matches, else measured "
                    "(or resumed) and saved there (default OUT.measurement.json)")
    sp.add_argument("--min-type", action="append", metavar="REGEX=TYPE", help="with --target-*: the smallest type "
                    "allowed for matching tensors (repeatable)")
    sp.add_argument("--exclude-type", action="append", metavar="TYPE", help="with --target-*: a type no tensor "
                    "may take (repeatable), e.g. the source's own Q4_K and Q6_K as a control: re-creating a quantized "
                    "source's grid costs almost nothing")
    sp.add_argument("--kld-windows", type=int, default=4, help="calibration windows that price candidates by KL "
                    "when measuring (default 4)")
    sp.add_argument("--cost", choices=["fisher", "anchor", "exact"], help="how a measurement made by this run "
                    "prices candidates (as measure --cost; default anchor)")
    sp.add_argument("--candidates", choices=["all", "k"], help="a measurement made by this run prices all types "
                    "(default: with llama.cpp's i-quants IQ1_S..IQ4_XS) or k (K-quants and legacy types only)")
    sp.add_argument("--sample-rows", type=int, metavar="N", help="a measurement made by this run prices each "
                    "candidate on N rows of each tensor (as measure --sample-rows)")
    sp.add_argument("--from-measurement", action="store_true", help="with --target-*: take each tensor's bytes "
                    "from the measurement's kept blocks (seconds; needs `measure --keep-blocks`) instead of "
                    "quantizing again (sequential GPTQ)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted run from its work directory (the "
                    "next unfinished block; the file is byte-identical to an uninterrupted run's)")
    sp.add_argument("--work-dir", help="where finished blocks are kept while the run lasts (default OUTPUT.work)")
    sp.add_argument("--keep-work", action="store_true", help="keep the work directory after a finished run")
    sp.add_argument("--in-memory", action="store_true", help="hold the whole model in memory instead of streaming "
                    "it block by block (the reference path; same bytes, more memory, no --resume)")
    sp.set_defaults(func=cmd_quantize)

    sp = with_calib(with_model(sub.add_parser("measure", help="price every candidate type of every tensor (KL "
                                                             "divergence added), for quantize --target-size")),
                    recipe=True)
    sp.add_argument("-o", "--output", required=True, help="measurement JSON (resumed if it exists)")
    sp.add_argument("--recipe", help="the recipe the file will be quantized with (rotation, padding, method, "
                    "calibration); default `default`")
    for flag in ("--method", "--rotation"):
        sp.add_argument(flag, choices=["gptq"] if flag == "--method" else ["none", "rh", "ro", "auto"])
    sp.add_argument("--seed", type=int)
    sp.add_argument("--pad", action="store_true")
    sp.add_argument("--pad-multiple", type=int)
    sp.add_argument("--act-order", action="store_true")
    sp.add_argument("--damp", type=float, help="GPTQ damping (as quantize --damp)")
    sp.add_argument("--imatrix", help="importance matrix (as quantize --imatrix)")
    sp.add_argument("--kld-windows", type=int, default=4, help="calibration windows that price candidates by KL "
                    "(default 4; the Hessians use all --calib-tokens)")
    sp.add_argument("--kld-skip", type=int, metavar="N", help="skip N held-out windows before the --kld-windows "
                    "that price: the same measurement on other text, to see how much repeated measurements agree "
                    "(benchmarks/measure_spread.py; default 0)")
    sp.add_argument("--cost", choices=["fisher", "anchor", "exact"], help="how candidates are priced: anchor "
                    "(default: a KL forward per tensor, other types scaled by output error), exact (a KL forward per "
                    "candidate) or fisher (Fisher-weighted output error from one streamed backward pass, no forward "
                    "per tensor: one block in memory, for large models; it ranks tensors of a type well but "
                    "underprices attn_v and a tied embedding, see benchmarks/results/measure_cost_smol.md)")
    sp.add_argument("--exact", action="store_true", help="the same as --cost exact")
    sp.add_argument("--candidates", choices=["all", "k"], help="candidate types: all (default: K-quants, legacy "
                    "types and llama.cpp's i-quants IQ1_S..IQ4_XS, the only types below 2.6 bpw) or k (without the "
                    "i-quants: faster)")
    sp.add_argument("--sample-rows", type=int, metavar="N", help="with --cost fisher: quantize each candidate on N "
                    "rows of each tensor (half the largest Fisher weight, half evenly spaced) and scale the sample's "
                    "relative error to the whole tensor; the embedding on exactly the rows its windows use. About "
                    "rows/N times faster: how a 1.5B model is measured on a CPU (default: every row)")
    sp.add_argument("--keep-blocks", action="store_true", help="keep every candidate's packed bytes beside the "
                    "JSON (OUTPUT.blocks/, ~4x a 5-bit file) for quantize --from-measurement")
    sp.add_argument("--outtype", choices=["f32", "f16", "bf16"], default="f16")
    sp.set_defaults(func=cmd_measure, mix=None, format=None, tensor_type=None, output_tensor_type=None,
                    token_embedding_type=None, pure=False)

    sp = with_calib(with_model(sub.add_parser("sensitivity", help="per-layer quantization sensitivity "
                                                                 "(JSON ranking + PNG bar chart)")))
    sp.add_argument("--quantized", required=True, help="the quantized GGUF of MODEL (from `twinquant quantize`)")
    sp.add_argument("-o", "--output", default="sensitivity", help="output stem: STEM.json and STEM.png")
    sp.add_argument("--top", type=int, default=10, help="rows of the printed ranking")
    sp.set_defaults(func=cmd_sensitivity, calib_tokens=2048)

    sp = with_calib(with_model(sub.add_parser("duplicate", help="duplicate layers (shared weights, per-copy "
                                                               "parameters) of a quantized GGUF")))
    sp.add_argument("-o", "--output", required=True, help="output .gguf")
    sp.add_argument("--ref", help="the float model: calibration KLD is measured against it")
    sp.add_argument("--topology", help="topology file (JSON/YAML, the seed's shape; hybrid entries resolved)")
    sp.add_argument("--auto", action="store_true", help="choose layers within the budget (adaptive, or by "
                    "--sensitivity)")
    sp.add_argument("--sensitivity", help="a `twinquant sensitivity` JSON: pick the most sensitive layers")
    sp.add_argument("--rank-by", choices=["both", "alone", "gain"], default="both")
    sp.add_argument("--kind", choices=["serial", "parallel", "hybrid"], default="hybrid",
                    help="copy type for --auto (hybrid: chosen per layer on calibration KLD)")
    sp.add_argument("--budget-flops", type=float, help="max extra compute per token, in percent")
    sp.add_argument("--budget-layers", type=int, help="max extra block executions")
    sp.add_argument("--budget-memory", help="max extra memory (KV cache of the extra executions), e.g. 64M")
    sp.add_argument("--budget-context", type=int, default=4096, help="context the KV-cache memory is counted at")
    sp.add_argument("--act-bits", type=int, help="quantize every linear input to this many bits (W2A8 / W2A4)")
    sp.add_argument("--search", choices=["grid", "bayes", "evolution"], help="tune the copies' parameters")
    sp.add_argument("--trials", type=int, default=30)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--study-log", help="optuna journal file: an interrupted search resumes from it")
    sp.add_argument("--expand-duplicates", action="store_true", help="write serial copies as physical blocks "
                    "(stock llama.cpp runs them; warns where it cannot)")
    sp.add_argument("--report", help="write topology, parameters, cost and the search log as JSON")
    sp.set_defaults(func=cmd_duplicate, calib_tokens=2048)

    # option names are llama-imatrix's
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
    sp.add_argument("--rotation", choices=["none", "rh"], default="none", help="compute it in the basis a "
                    "`quantize --rotation rh` run quantizes in (recorded in the file; quantize --imatrix checks it)")
    sp.add_argument("--seed", type=int, default=0, help="the rotation's seed (as quantize's --seed)")
    sp.add_argument("--pad", action="store_true", help="in the padded model's basis (as quantize --pad)")
    sp.add_argument("--pad-multiple", type=int, default=256)
    sp.set_defaults(func=cmd_imatrix)

    sp = sub.add_parser("roofline", help="decode speed a GGUF file (or a model shape in a mix) reaches on a device, "
                                         "from the bytes it reads per token")
    sp.add_argument("model", nargs="?", help="GGUF file (or a packaged model name)")
    sp.add_argument("--shape", help="a model by its published shape instead of a file: qwen2.5-32b, qwen2.5-7b, "
                                    "qwen2.5-coder-1.5b")
    sp.add_argument("--mix", help="with --shape: a type mix, e.g. llama.cpp:IQ2_XS or twinquant:Q2_K")
    sp.add_argument("--device", nargs="+", default=["this-cpu", "m1-pro"],
                    help="this-cpu, m1-pro, m2-max, m3-max, h200 (default: this-cpu m1-pro)")
    sp.add_argument("--ctx", type=int, default=512, help="context of the generated token (KV cache read; default 512)")
    sp.add_argument("--bandwidth", type=float, help="GB/s instead of the device's figure (this-cpu: measured)")
    sp.add_argument("--json", help="also write the predictions as JSON")
    sp.set_defaults(func=cmd_roofline)

    sp = sub.add_parser("models", help="list the packaged models and where their files are")
    sp.add_argument("--assemble", action="store_true", help="assemble multi-part models into the cache")
    sp.set_defaults(func=cmd_models)
    return p


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"twinquant: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _warning_line
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TwinquantError as e:
        print(f"twinquant: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable or unwritable paths given by the user
        print(f"twinquant: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (" (finished blocks are kept: run it again with --resume)"
                if args.command == "quantize" and not args.in_memory else "")
        print(f"twinquant: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
