"""The plan of a run: the explicit list of steps a recipe turns into, which `quantize --dry-run` prints.

load → [pad] → [fuse norms + rotate] → calibrate → [measure → allocate] → quantize token_embd → per block:
calibrate + quantize + pass on → quantize output → write. The executor (executor.py) runs the block steps in this
order, one block in memory at a time, recording each finished block in the work directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twinquant.model import roles


@dataclass(frozen=True)
class Step:
    kind: str          # load | pad | rotate | calibrate | measure | allocate | quantize | block | write
    what: str


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(f"{i + 1:>3}. {s.kind:<9} {s.what}" for i, s in enumerate(self.steps))


def make_plan(sess, types: dict[str, str], out: Path, target, measures: bool, work: Path) -> Plan:
    recipe, prep, spec, opts = sess.recipe, sess.prep, sess.spec, sess.opts
    steps = [Step("load", f"{sess.source} (lazily: one block at a time)" if opts.stream else f"{sess.source}")]
    if prep.pad:
        steps.append(Step("pad", f"zero channels to a multiple of {prep.pad_multiple} (hidden {spec.hidden}, ffn "
                                 f"{spec.intermediate})"))
    if prep.rotation != "none":
        steps.append(Step("rotate", f"fuse norms, R1 {prep.rotation} (seed {prep.seed}), R2 (seed {prep.seed + 1})"
                                    + (", head untied" if sess.source_model.spec.tied_embeddings
                                       and not spec.tied_embeddings else "")))
    if recipe.method == "gptq":
        from twinquant.calibration.windows import tokens_for

        steps.append(Step("calibrate", f"{tokens_for(recipe, spec)} tokens of {recipe.calib or 'groups_merged.txt'} in "
                                       f"windows of {recipe.calib_ctx}"))
    if target:
        if measures:
            steps.append(Step("measure", f"every candidate type of {len(types)} tensors (resumable JSON)"))
        steps.append(Step("allocate", f"one type per tensor for {target.text()}"))
    emb, out_name = roles.name(roles.T.TOKEN_EMBD), roles.name(roles.T.OUTPUT)
    if emb in types:
        steps.append(Step("quantize", f"{emb} -> {types[emb]} (RTN: no Hessian)"))
    for i in range(spec.n_layers):
        names = [n for n in roles.block_tensor_names(spec, i) if n in types]
        steps.append(Step("block", f"{i}: Hessians, {recipe.method} of {len(names)} tensors "
                                   f"({', '.join(sorted(set(types[n] for n in names)))}), outputs to "
                                   + (f"block {i + 1}" if i + 1 < spec.n_layers else "the head")))
    if out_name in types:
        steps.append(Step("quantize", f"{out_name} -> {types[out_name]} ({recipe.method} on the final-norm "
                                      "activations)"))
    steps.append(Step("write", f"{out} (unquantized 2-D tensors {opts.outtype.upper()})"
                               + (f"; work directory {work} (--resume continues it)" if opts.stream else "")))
    return Plan(steps)
