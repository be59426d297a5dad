"""The library entry points: `quantize(source, out, recipe, options)` and `measure(source, out, recipe, options)`.

The command line parses its options into a `Recipe` and `Options` and calls these; tests and benchmarks call them
directly. Progress goes to `options.log` (stderr by default, nothing with `quiet`).

quantize = plan → prepare (lazy pad / rotate) → calibration → [measurement → allocation] → the block executor
(streamed, resumable through a work directory) or assembly from a measurement's kept blocks → the GGUF writer
(streaming the packed tensors from the work directory) → the size check → the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.pipeline.plan import Plan, make_plan
from twinquant.pipeline.prepare import Preparation, apply, basis_options, describe_basis
from twinquant.pipeline.recipe import Recipe, load_recipe


@dataclass
class Options:
    """Everything about a run that is not the recipe (where things go, how to run, what to reuse)."""

    outtype: str = "f16"                 # type of unquantized 2-D tensors
    split_max_size: str | None = None
    imatrix: str | None = None           # llama.cpp imatrix.gguf / .dat replacing the calibration's importance
    target_size: str | None = None
    target_bpw: float | None = None
    measurement: str | None = None       # reused if it matches, else measured and saved there
    min_type: tuple[str, ...] = ()
    exclude_type: tuple[str, ...] = ()   # types the allocation never picks (a control: the source's own types)
    kld_windows: int = 4
    kld_skip: int = 0                    # held-out windows skipped before those that price (a repeat on other text)
    cost: str = "anchor"                 # how measure prices candidates (allocation/measure.py COSTS)
    keep_blocks: bool = False
    candidates: str = "all"              # measure's candidate types: "all" (with the i-quants) or "k"
    sample_rows: int | None = None       # measure prices candidates on this many rows a tensor (Fisher cost)
    from_measurement: bool = False
    dry_run: bool = False
    report: str | None = None            # JSON (+ PNG beside it)
    resume: bool = False                 # continue the work directory of an interrupted run
    work_dir: str | None = None          # default OUT.work beside the output
    keep_work: bool = False              # keep the work directory after a finished run
    stream: bool = True                  # False: the whole model in memory (the oracle of the streamed path)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    quiet: bool = False
    log: Callable[[str], None] | None = None
    stop_after_block: int | None = None  # tests: a simulated kill after that block

    def __post_init__(self):
        import gguf

        self.exclude_type = tuple(t.upper() for t in self.exclude_type)
        bad = [t for t in self.exclude_type if t not in gguf.GGMLQuantizationType.__members__]
        if bad:
            raise TwinquantError(f"--exclude-type {bad[0]}: not a GGML type (e.g. Q4_K, IQ2_XS)")
        k = self.kld_skip
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise TwinquantError(f"--kld-skip must be an integer >= 0, not {k!r}")
        n = self.sample_rows
        if n is not None:           # an impossible measurement fails before any model is loaded
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise TwinquantError(f"--sample-rows must be an integer >= 2, not {n!r}")
            if self.cost != "fisher" or self.keep_blocks:
                raise TwinquantError("--sample-rows prices candidates by the Fisher cost alone: give --cost fisher "
                                     "(and no --keep-blocks: a sampled tensor has no whole quantized bytes)")

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        (self.log or (lambda m: print(m, file=sys.stderr)))(msg)


@dataclass
class QuantizeResult:
    path: Path | None                    # the first (or only) file written; None for a dry run
    file_bytes: int
    n_params: int
    plan: Plan
    report: object | None = None         # executor.QuantReport
    allocation: object | None = None
    rotation: str = "none"
    seconds: float = 0.0
    imatrix_coverage: dict | None = None
    dry_run_text: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.file_bytes / self.n_params


def _recipe(recipe: Recipe | str | None) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _type_name(t) -> str:
    return getattr(t, "name", str(t))


def quantized_types(choices) -> dict[str, str]:
    return {c.name: _type_name(c.type) for c in choices if _type_name(c.type) not in ("F32", "F16", "BF16")}


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}   # the command line's names


def torch_dtype(name: str) -> torch.dtype:
    """A compute dtype by its command-line name (f32, bf16, f16)."""
    if name not in DTYPES:
        raise TwinquantError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_writable(path: Path) -> None:
    """Fail before any work when the output cannot be written (not hours later)."""
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    import os

    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise TwinquantError(f"{path}: cannot write there ({probe} is not a writable directory)")
    if path.is_dir():
        raise TwinquantError(f"{path}: is a directory")


def _check_moe(spec, recipe: Recipe, prep: Preparation, opts: Options, stage: str) -> None:
    """What a mixture-of-experts model can be quantized (or measured) with so far (one line, before any work): a
    mix or a format with --tensor-type rules, or a KL-priced measurement and a target size; RTN or GPTQ (per-expert
    Hessians), an imatrix file; RH rotation (R1; R2 where attention is ordinary); no RO, padding, Fisher-priced
    measurement or kept blocks."""
    if stage not in ("quantize", "measure"):
        spec.require_dense(stage)
    from twinquant.rotation.rotate import check_rotatable

    check_rotatable(spec, prep.rotation)
    measured = stage == "measure" or opts.target_size or opts.target_bpw or opts.measurement
    why = [w for bad, w in ((recipe.pad, "padding"),
                            (measured and opts.cost == "fisher", "the Fisher cost (--cost anchor or exact)"),
                            (measured and opts.keep_blocks, "kept measurement blocks"),
                            (recipe.method == "hqq", "hqq"))
           if bad]
    if why:
        raise TwinquantError(f"a mixture-of-experts model ({spec.arch}) cannot be quantized with {', '.join(why)} "
                             "yet")


class Session:
    """One prepared model and what the stages share (calibration, importance); built once per run."""

    def __init__(self, source: str, recipe: Recipe, opts: Options, dry_run: bool = False, stage: str = "quantize"):
        from twinquant.io.load import load_model
        from twinquant.allocation.role_mix import assign as assign_types

        self.source, self.recipe, self.opts, self.stage = str(source), recipe, opts, stage
        model = load_model(self.source, dtype=opts.dtype, device=opts.device, materialize=False)
        self.n_params = model.n_params()   # of the source: bits per weight are counted against the real weights
        self.prep = Preparation.of(recipe, model.spec.tied_embeddings, model.spec.moe)
        if model.spec.moe:
            _check_moe(model.spec, recipe, self.prep, opts, stage)
        from twinquant.io.gguf_write import check_stock_graph

        check_stock_graph(model)       # the file written hours later must be one stock llama.cpp computes

        # llama-quantize's rules "with an imatrix" when there is importance data: an --imatrix file, or GPTQ's
        # calibration (its Hessian diagonal is the imatrix), so a GPTQ file has the types of llama.cpp's +imatrix one
        def types_for(spec):
            return assign_types(spec, roles.all_tensor_names(spec), mix=recipe.mix, default=recipe.format,
                                overrides=recipe.tensor_type, output_type=recipe.output_tensor_type,
                                embedding_type=recipe.token_embedding_type, pure=recipe.pure,
                                imatrix=opts.imatrix is not None or recipe.method == "gptq")

        self.types_for = types_for
        types_for(model.spec)   # a bad mix, type or rule fails here, before any work
        opts.say(f"recipe {recipe.name}: {recipe.method}, {recipe.mix or recipe.format}, rotation "
                 f"{self.prep.rotation}" + (", pad" if recipe.pad else ""))
        self._calib = None
        self.source_model = model
        windows = None
        if self.prep.rotation == "ro" and not dry_run:
            windows = self.calibration(model).windows
        self.model = apply(model, self.prep, windows, stream=opts.stream, rotate=not dry_run, log=opts.say)
        self.spec = self.prep.planned_spec(self.model.spec)
        self.choices = types_for(self.spec)
        self.imp, self.imp_sha, self.coverage = None, None, None

    def calibration(self, model=None):
        if self._calib is None:
            from twinquant.calibration.windows import calibration_for

            # plus the windows measure holds out for its KL prices (nothing else reads them)
            self._calib = calibration_for(self.recipe, model or self.model,
                                          heldout=self.opts.kld_windows + self.opts.kld_skip)
        return self._calib

    def heldout_windows(self, n: int) -> torch.Tensor:
        """`n` calibration windows after the ones the Hessians use (measure's KL prices), after `--kld-skip` more:
        one line and exit if the calibration text ends first."""
        r, calib, skip = self.recipe, self.calibration(), self.opts.kld_skip
        held = calib.heldout
        if held is None or held.shape[0] < skip + n:
            have = 0 if held is None else held.shape[0]
            raise TwinquantError(f"{calib.path}: {calib.n_tokens} calibration tokens leave {have} of the {skip + n} "
                                 f"windows of {r.calib_ctx} that measure holds out for its KL prices; pass fewer "
                                 f"--calib-tokens, --kld-windows or --kld-skip, or a longer --calib text")
        return held[skip: skip + n]

    def quantizer_config(self) -> dict | None:
        cfg = {"damp": self.recipe.damp} if self.recipe.method == "gptq" else {}
        if self.recipe.act_order:
            cfg.update(act_order=True, static_groups=True)
        return cfg or None

    def importance(self, names: list[str]) -> None:
        """--imatrix: per-tensor importance with a coverage report; tensors without data keep the calibration's
        own statistics (with a warning)."""
        path = self.opts.imatrix
        if not path:
            return
        import numpy as np

        from twinquant.calibration.imatrix import Imatrix, coverage

        im = Imatrix.read(path)
        want = self.prep.basis()
        if im.basis != want:      # importance per input column: another basis weighs the wrong columns
            raise TwinquantError(f"{path} was computed on {describe_basis(im.basis)}; this run quantizes "
                                 f"{describe_basis(want)}: compute it in that basis (`twinquant imatrix MODEL -f "
                                 f"TEXT {basis_options(want)}`)")
        names = [n for n in names if n != roles.name(roles.T.TOKEN_EMBD)]   # a lookup: no tool collects it
        cov = coverage(im, names)
        imp, missing = {}, []
        for n in names:
            shape = roles.expected_shape(self.model.spec, n)
            cols = shape[-1]
            if not cov[n]["present"]:
                missing.append(n)
                continue
            v = np.asarray(im.importance(n), dtype=np.float32).reshape(-1)
            if len(shape) == 3:     # stacked experts: one row per expert (1.0 where an expert saw no token)
                if v.size != shape[0] * cols:
                    raise TwinquantError(f"{path}: {n} has {v.size} values of data, the model's {shape[0]} experts "
                                         f"x {cols} inputs {shape[0] * cols}: an imatrix of another model?")
                imp[n] = torch.from_numpy(v.reshape(shape[0], cols))
                continue
            if v.size != cols:
                raise TwinquantError(f"{path}: {n} has {v.size} columns of data, the model {cols}: an imatrix "
                                     "of another model?")
            imp[n] = torch.from_numpy(v)
        self.opts.say(f"imatrix {path}: {len(imp)}/{len(names)} tensors covered, {im.chunk_count} chunks"
                      + (f"; no data for {', '.join(missing[:4])}{' …' if len(missing) > 4 else ''}"
                         if missing else ""))
        for n in missing:
            warnings.warn(f"{n}: no imatrix data; it is quantized with the calibration's own statistics")
        self.imp, self.coverage = imp, cov
        self.imp_sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    # --- measurement ------------------------------------------------------------------------------------------
    def measurement(self, path: str, measure_if_missing: bool = True):
        """A complete measurement for this model and recipe: loaded from `path` if it matches, else measured (or
        resumed) and saved there (unless `measure_if_missing` is False: a dry run never measures)."""
        from twinquant.allocation.measure import FLOAT_BYTES, Measurement, candidate_types, measure
        from twinquant.pipeline.workdir import source_identity
        from twinquant.zoo import resolve

        recipe, opts, model = self.recipe, self.opts, self.model
        calib = self.calibration()
        header = {"model": Path(self.source).name, "source": source_identity(resolve(self.source)),
                  "arch": model.spec.arch, "n_layers": model.spec.n_layers,
                  "hidden": model.spec.hidden, "rotation": self.prep.rotation, "seed": recipe.seed,
                  "pad": recipe.pad, "pad_multiple": recipe.pad_multiple if recipe.pad else None,
                  "act_order": recipe.act_order,
                  "calibration": {"sha256": calib.text_sha256, "tokens": calib.n_tokens, "ctx": recipe.calib_ctx},
                  "imatrix": self.imp_sha, "method": recipe.method, "candidates": opts.candidates}
        if opts.kld_skip:               # (absent otherwise: measurements made before the option still match)
            header["kld_skip"] = opts.kld_skip
        p = Path(path)
        if p.is_file():
            m = Measurement.load(p)
            # how it was measured is the measurement's own choice; what it was measured for must be this run's:
            # the weights, their preparation, the calibration, the quantizer and its settings (another
            # method's or another damping's costs are not this quantizer's)
            full = {**header, **{k: m.header.get(k) for k in ("cost", "fisher_seed", "kld_windows", "kld_scored",
                                                               "kld_source", "kld_skip", "keep_blocks",
                                                               "sample_rows")}}
            from twinquant.algorithms.backends import get_quantizer

            full["config"] = get_quantizer(recipe.method, self.quantizer_config()).config.to_dict()
            m.check_matches(full)
            if m.complete:
                opts.say(f"measurement {p}: {len(m.tensors)} tensors (sha256 {m.sha256()[:12]})")
                return m
        if not measure_if_missing:
            raise TwinquantError(f"{p} is incomplete: a dry run never measures; run `twinquant measure` to finish it")
        if recipe.method != "gptq":
            raise TwinquantError("measuring needs --method gptq (the quantizer whose costs are measured)")
        names = list(quantized_types(self.choices))
        fixed = 0   # informational (quantize recomputes it for its own --outtype): the tensors kept in float
        for n in roles.all_tensor_names(self.spec):
            shape = roles.expected_shape(self.spec, n)
            if n not in names:
                fixed += math.prod(shape) * (4 if len(shape) == 1 else FLOAT_BYTES[opts.outtype.upper()])
        kw = opts.kld_windows
        held = self.heldout_windows(kw)
        n_c = sum(len(candidate_types(roles.expected_shape(model.spec, n)[1], opts.candidates)) for n in names)
        forwards = {"fisher": "one backward pass", "anchor": f"{len(names)} forwards",
                    "exact": f"{n_c} forwards"}[opts.cost]
        rows = f" of {opts.sample_rows} rows each" if opts.sample_rows else ""
        opts.say(f"measuring {len(names)} tensors x their candidate types: {n_c} {recipe.method} quantizations{rows} "
                 f"and {forwards} of {min(kw, held.shape[0])} held-out x {recipe.calib_ctx} tokens ({opts.cost} "
                 f"cost; Hessians from the {calib.n_tokens} tokens before them); saved after every block to {p}")
        if opts.cost != "fisher" or not opts.stream:
            model.materialize()    # KL forwards run every block after the measured one to the logits
        import twinquant
        from twinquant.pipeline.workdir import WorkDir

        # next to the measurement: where its blocks' activations wait for a resumed run (the file is the truth)
        work = WorkDir.open(Path(str(p) + ".work"), {
            "header": header, "cost": opts.cost, "kld_windows": kw, "sample_rows": opts.sample_rows,
            "keep_blocks": opts.keep_blocks, "config": self.quantizer_config(), "twinquant": twinquant.__version__,
            "torch": torch.__version__}, resume=p.is_file())
        m = measure(model, names, calib.windows, kw, header, fixed, self.n_params, recipe.method,
                    self.quantizer_config(), self.imp, cost=opts.cost, path=p, progress=not opts.quiet,
                    log=opts.say, keep_blocks=opts.keep_blocks, stream=opts.stream,
                    candidates=opts.candidates, sample_rows=opts.sample_rows, workdir=work,
                    stop_after_layer=opts.stop_after_block if self.stage == "measure" else None, kld_from=held)
        if m.complete and not opts.keep_work:
            work.remove()
        return m

    def fingerprint_parts(self, types: dict[str, str], calib) -> dict:
        import twinquant
        from twinquant.pipeline.workdir import source_identity
        from twinquant.zoo import resolve

        return {"source": source_identity(resolve(self.source)), "recipe": self.recipe.to_dict(),
                "preparation": self.prep.__dict__, "types": types,
                "calibration": {"sha256": calib.text_sha256, "tokens": calib.n_tokens} if calib else None,
                "imatrix": self.imp_sha, "twinquant": twinquant.__version__, "torch": torch.__version__}


def quantize(source: str, out: str | Path, recipe: Recipe | str | None = None,
             options: Options | None = None) -> QuantizeResult:
    """Quantize `source` (HF directory, GGUF file or packaged model name) into the GGUF `out` as `recipe` (a
    `Recipe`, a built-in name or a YAML path; default `default`) says. See `Options` for the rest."""
    from twinquant.allocation.target import parse_target

    t_start = time.perf_counter()
    opts = options or Options()
    recipe = _recipe(recipe)
    target = parse_target(opts.target_size, opts.target_bpw)
    out = Path(out)
    if out.suffix != ".gguf" and not opts.dry_run:
        raise TwinquantError(f"{out}: the output of quantize is a .gguf file")
    if target and target.kind == "size" and opts.split_max_size:
        raise TwinquantError("--target-size bounds one file; with --split-max-size every shard adds a header: use "
                             "--target-bpw")
    if (opts.measurement or opts.from_measurement) and not target:
        raise TwinquantError("--measurement / --from-measurement are used with --target-size or --target-bpw")
    mpath = (opts.measurement or str(out.with_suffix("")) + ".measurement.json") if target else None
    work = Path(opts.work_dir) if opts.work_dir else out.with_name(out.name + ".work")
    if not opts.dry_run:    # every output location, before any work (not hours later)
        for p in [out, opts.report, mpath, mpath and Path(str(mpath) + ".work") / "state.json"]:
            if p:
                check_writable(Path(p))
        check_writable(work / "state.json")
    elif target and not Path(mpath).is_file():
        raise TwinquantError(f"--dry-run with a target needs a measurement ({mpath} does not exist): a dry run "
                             "never measures; run `twinquant measure` first or give --measurement")
    if opts.from_measurement and not opts.keep_blocks:    # what --from-measurement needs (the caller's
        opts = dataclasses.replace(opts, keep_blocks=True)   # Options object is not changed)
    sess = Session(source, recipe, opts, dry_run=opts.dry_run and not target)
    model, n_params = sess.model, sess.n_params
    types = quantized_types(sess.choices)
    sess.importance(list(types))
    calib = sess.calibration() if recipe.method == "gptq" else None
    calib_rec = ({"file": Path(calib.path).name, "sha256": calib.text_sha256, "tokens": calib.n_tokens,
                  "ctx": recipe.calib_ctx} if calib else None)
    model.quant_record = {"recipe": recipe.to_dict(), "rotation": sess.prep.rotation, "calibration": calib_rec}
    if sess.imp_sha:
        model.quant_record["imatrix"] = {"file": Path(opts.imatrix).name, "sha256": sess.imp_sha}
    alloc, meas, alloc_text = None, None, ""
    fresh = bool(target) and not Path(mpath).is_file()      # the plan shows whether this run measures
    if target:
        from twinquant.allocation.measure import match_rules
        from twinquant.allocation.target import allocate, format_allocation

        meas = sess.measurement(mpath, measure_if_missing=not opts.dry_run)
        names = list(meas.tensors)
        fixed = match_rules(names, list(recipe.tensor_type))
        if recipe.output_tensor_type and "output.weight" in meas.tensors:
            fixed.setdefault("output.weight", recipe.output_tensor_type.upper())
        if recipe.token_embedding_type and "token_embd.weight" in meas.tensors:
            fixed.setdefault("token_embd.weight", recipe.token_embedding_type.upper())
        minimum = match_rules(names, list(opts.min_type or []), "--min-type")
        alloc, record, overhead = allocate(model, meas, target, fixed, minimum, opts.outtype,
                                           exclude=opts.exclude_type)
        model.quant_record["allocation"] = record
        # a rule that keeps a tensor in float leaves it to the writer (--outtype), as the mixes do
        types = {n: c.type for n, c in alloc.choice.items() if c.type not in ("F32", "F16", "BF16")}
        alloc_text = format_allocation(alloc, meas)
        if not opts.dry_run:
            opts.say(alloc_text)
    plan = make_plan(sess, types, out, target, fresh, work)
    if opts.dry_run:
        text = [alloc_text] if target else []
        if target:
            from twinquant.io.gguf_write import file_bytes

            total, _ = file_bytes(model, types, opts.outtype)
            text.append(f"file about {total:,} bytes ({total / 1e6:.2f} MB) for target {target.text()}")
        else:
            text += [recipe.to_yaml().rstrip(), "---", plan.describe(), "---"]
            text += [f"{c.name:<32} {_type_name(c.type):<8} {c.rule}" for c in sess.choices]
            text.append(f"{len(types)} tensors quantized, {len(sess.choices) - len(types)} kept in float")
            # the size the plan gives, before any work (a mix has no target); integer grids are not GGML types
            import gguf

            if model.tokenizer is not None and all(str(t).upper() in gguf.GGMLQuantizationType.__members__
                                                   for t in types.values()):
                from twinquant.io.gguf_write import file_bytes

                total, data = file_bytes(model, types, opts.outtype)
                text.append(f"file about {total:,} bytes ({total / 1e6:.2f} MB), {8 * data / n_params:.3f} bits "
                            f"per weight of tensor data")
        return QuantizeResult(None, 0, n_params, plan, rotation=sess.prep.rotation, dry_run_text="\n".join(text),
                              allocation=alloc)
    workdir = None
    if opts.from_measurement:
        model.materialize()
        _assemble(model, meas, mpath, alloc)
        report = None
    else:
        if not opts.stream:
            model.materialize()
        from twinquant.pipeline.workdir import WorkDir

        if opts.stream:
            workdir = WorkDir.open(work, sess.fingerprint_parts(types, calib), resume=opts.resume)
            if workdir.resumed:
                opts.say(f"resuming {work}: {workdir.state['blocks_done']} of {model.spec.n_layers} blocks done")
        elif opts.resume:
            raise TwinquantError("--resume needs the streamed pipeline (it keeps the work directory)")
        report = _quantize_blocks(sess, model, types, calib, workdir)
    from twinquant.io.split import shard_paths
    from twinquant.io.gguf_write import write_gguf

    first = write_gguf(model, out, opts.outtype.upper(), split_max_size=opts.split_max_size)
    size = sum(p.stat().st_size for p in shard_paths(first)) if opts.split_max_size else first.stat().st_size
    if alloc is not None:
        data = alloc.total_bytes
        over = size > target.value if target.kind == "size" else 8 * data > target.value * n_params
        if over:   # cannot happen if the header estimate is right; never leave a file over the user's budget
            for p in (shard_paths(first) if opts.split_max_size else [first]):
                p.unlink(missing_ok=True)
            raise TwinquantError(f"internal: the written file ({size:,} bytes) exceeds the target {target.text()}; "
                                 "removed")
    if workdir is not None and not opts.keep_work:
        workdir.remove()
    res = QuantizeResult(first, size, n_params, plan, report, alloc, sess.prep.rotation,
                         time.perf_counter() - t_start, sess.coverage)
    if opts.report:
        from twinquant.pipeline.report import write_report

        write_report(opts.report, res, recipe, calib_rec)
    return res


def _coverage(rep) -> str:
    """A stacked expert tensor's calibration coverage: tokens per expert, and how many experts saw fewer tokens
    than they have inputs (their Hessians completed with the pooled one) or none."""
    t = rep.expert_tokens
    if not t:
        return ""
    few = sum(n < rep.shape[-1] for n in t)
    return (f"  experts: tokens {min(t)}..{max(t)}, {few} of {len(t)} below {rep.shape[-1]} (pooled Hessian mixed in)"
            + (f", {t.count(0)} never reached" if 0 in t else ""))


def _quantize_blocks(sess: Session, model, types: dict[str, str], calib, workdir):
    """Block by block GPTQ (or RTN) into `types`, one progress line per tensor like llama-quantize."""
    from twinquant.pipeline.executor import quantize_blocks

    total, opts = len(types), sess.opts
    n_done = [len(workdir.state["report"]) if workdir is not None else 0]

    def log(rep) -> None:
        n_done[0] += 1
        err = f"err {rep.rel_error:.4f}" + (f"  out {rep.out_error:.4f}" if rep.out_error is not None else "")
        opts.say(f"[{n_done[0]:>4}/{total}] {rep.name:<28} {str(list(rep.shape)):>13}  -> {rep.type:<7} "
                 f"{rep.bits_per_weight:5.2f} bpw  {err}  {rep.seconds:.1f}s" + _coverage(rep))

    return quantize_blocks(model, types, sess.recipe.method, calib.windows if calib else None,
                           config=sess.quantizer_config(), progress=False, log=log, importance=sess.imp,
                           stream=opts.stream, workdir=workdir, stop_after_block=opts.stop_after_block)


def _assemble(model, meas, mpath: str, alloc) -> None:
    """--from-measurement: every tensor takes the bytes its measurement kept for the chosen type."""
    import gguf

    from twinquant.model.model import QuantizedWeight
    from twinquant.allocation.measure import FLOAT_BYTES, load_block

    if not meas.header.get("keep_blocks"):
        raise TwinquantError(f"{mpath} kept no blocks: measure with --keep-blocks to use --from-measurement")
    for n, c in alloc.choice.items():
        if c.type in FLOAT_BYTES:
            continue                        # a user rule kept it in float: it stays as the model holds it
        if c.type not in meas.tensors[n]["candidates"]:
            raise TwinquantError(f"{n}: type {c.type} was not measured; --from-measurement has no bytes for it")
        W_hat, data = load_block(mpath, n, c.type, meas.tensors[n]["shape"])
        model.set_quantized(n, W_hat, QuantizedWeight(gguf.GGMLQuantizationType[c.type], data))


def measure(source: str, out: str | Path, recipe: Recipe | str | None = None, options: Options | None = None):
    """Price every candidate type of every tensor of `source` prepared as `recipe` says (see quant/measure.py);
    resumable: an existing matching, incomplete measurement at `out` is continued. Returns the `Measurement`."""
    opts = options or Options()
    recipe = _recipe(recipe)
    check_writable(Path(out))
    check_writable(Path(str(out) + ".work") / "state.json")
    sess = Session(source, recipe, opts, stage="measure")
    sess.importance(list(quantized_types(sess.choices)))
    return sess.measurement(str(out))
