"""`--expand-duplicates`: serial copies as physical blocks, so stock llama.cpp runs the duplicated topology.

Stock llama.cpp has no notion of a block executed twice, but a serial copy with α = 1 and plain activations is
just one more block with the same weights: written twice, llama.cpp computes exactly what twinquant's runtime
does (at the cost of the copy's bytes in the file). Where stock semantics cannot follow, the copy is left out
with a warning naming it: α ∉ {0, 1} (the FFN of a scaled block sees the unscaled attention output, which no
weight scaling reproduces), parallel groups (llama.cpp has no parallel blocks; the original block is kept),
per-copy activation quantization or clipping (llama.cpp does not fake-quantize activations). α = 0 copies are
the identity and are dropped exactly.
"""

from __future__ import annotations

import dataclasses
import warnings

from twinquant.model.layout import Layout
from twinquant.model.model import Model


def _rename(name: str, old: int, new: int) -> str:
    prefix = f"blk.{old}."
    return f"blk.{new}." + name[len(prefix):] if name.startswith(prefix) else name


def expand_duplicates(model: Model) -> Model:
    """A plain-layout model with one physical block per kept serial execution; tensors shared by reference."""
    dup = model.dup_params
    model.materialize()
    order: list[int] = []               # old block of each new block
    dropped: list[str] = []
    for s in model.layout.slots:
        if s.parallel:
            dropped.append(f"layer_{s.block} parallel group ({len(s.members)} copies -> the original)")
            order.append(s.block)
            continue
        p = dup.resolve(s.block, s.copy) if dup else None
        if s.copy == 0:
            order.append(s.block)
        elif p is not None and p.alpha == 0.0:
            continue                     # identity: nothing to write
        elif p is not None and (p.alpha != 1.0 or not p.is_identity_transform):
            why = f"alpha {p.alpha:g}" if p.alpha != 1.0 else "activation quantization/clipping"
            dropped.append(f"layer_{s.block} copy {s.copy} ({why})")
        else:
            order.append(s.block)
    if dup is not None and any(not dup.resolve(b, 0).is_identity_transform for b in range(model.spec.n_layers)):
        dropped.append("activation quantization of the original blocks")
    if dropped:
        warnings.warn("--expand-duplicates: stock llama.cpp cannot run " + "; ".join(dropped)
                      + ": written as the base path", stacklevel=2)
    spec = dataclasses.replace(model.spec, n_layers=len(order))
    tensors, quantized, inputs = {}, {}, {}
    globals_ = [n for n in model.tensor_names() if not n.startswith("blk.")]
    for n in globals_:
        tensors[n] = model.get(n)
        if n in model.quantized:
            quantized[n] = model.quantized[n]
    for new, old in enumerate(order):
        for n in (x for x in model.tensor_names() if x.startswith(f"blk.{old}.")):
            m = _rename(n, old, new)
            tensors[m] = model.get(n)
            if n in model.quantized:
                quantized[m] = model.quantized[n]
            if n in model.input_transforms:
                inputs[m] = model.input_transforms[n]
    out = Model(spec=spec, tokenizer=model.tokenizer, layout=Layout.sequential(len(order)), dtype=model.dtype,
                device=model.device, tensors=tensors, input_transforms=inputs, qk_transform=model.qk_transform,
                history=list(model.history), quantized=quantized, quant_record=model.quant_record)
    out.expanded_from = order          # for reports: which original block each physical block repeats
    return out
