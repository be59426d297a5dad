"""Decode from packed weights: a GGUF's K-quant (and, opt-in, i-quant) linears stay as their GGML bytes on the GPU
and the forward multiplies them there (formats/ggml/packed.qlinear), instead of holding float copies: a Q2_K model
takes its file size in GPU memory, and each decode step reads those bytes once."""

from __future__ import annotations

from collections import Counter

from twinquant.formats.ggml.packed import IQ_TYPES, PackedRun, PackedWeight, kernel_for, planes, planes_default
from twinquant.io.load import load_model
from twinquant.model import roles
from twinquant.model.model import Model


def pack_linears(model: Model, iquants: bool = False) -> Counter:
    """Move every 2-D quantized weight with a kernel on model.device (not the token embedding: it is looked up,
    not multiplied) into `model.packed`; needs the model loaded with keep_quantized. Returns {type: count}.

    The i-quants' kernels (`iquants`) are opt-in: exact against gguf-py (interpreter and CUDA) but slow, 1.6-15% of
    copy bandwidth on an H100 (benchmarks/results/kernel_speed_s17-iquants.md); without them an i-quant linear is
    dequantized at load and multiplied by cuBLAS. The types TWINQUANT_PLANES names (Q2_K) are moved into planes
    (`packed.planes`: the same bytes regrouped so the GEMV loads 16 bytes at a time)."""
    embd = roles.name(roles.T.TOKEN_EMBD)
    counts: Counter = Counter()
    for name, q in model.quantized.items():
        shape = roles.expected_shape(model.spec, name)
        t = q.ggml_type.name
        if name == embd or len(shape) != 2 or not kernel_for(t, model.device) or (t in IQ_TYPES and not iquants):
            continue
        w = PackedWeight.from_bytes(t, q.data, shape[-1], model.device)
        model.packed[name] = planes(w) if t in planes_default() else w
        model.tensors.pop(name, None)
        counts[t] += 1
    model.fuse_shared_inputs()
    return counts


def join_shared_inputs(model: Model) -> int:
    """Concatenate the packed members of each shared-input group (q/k/v, gate/up) that follow one another with
    one type, and their biases, so the forward runs one GEMV per run (a decode step's small matrices are bound by
    launch and memory latency, not bytes). Call after `materialize` (the biases must be loaded). Returns the
    number of runs."""
    model.packed_groups.clear()
    for i in range(model.spec.n_layers):
        for group in model._fusable(i):
            runs: list[list[str]] = []
            for n in group:
                w = model.packed.get(n)
                if w is not None and runs and runs[-1][-1] in model.packed and \
                        model.packed[runs[-1][-1]].ggml_type == w.ggml_type:
                    runs[-1].append(n)
                else:
                    runs.append([n])
            for run in (tuple(r) for r in runs if len(r) > 1 and r[0] in model.packed):
                bnames = [n.replace(".weight", ".bias") for n in run]
                biases = [model.tensors[b] for b in bnames] if all(b in model.tensors for b in bnames) else None
                pr = PackedRun.join(run, [model.packed[n] for n in run], biases)
                model.packed.update(zip(run, pr.views))
                if biases is not None:
                    for b, v in zip(bnames, pr.bias_views):
                        model.tensors[b] = v
                model.packed_groups[run[0]] = pr
    return len(model.packed_groups)


def load_for_decode(path, dtype, device, kernels: bool = True, iquants: bool = False) -> tuple[Model, Counter]:
    """The model `generate` / `run` decode with: on CUDA (unless kernels=False) its K-quant linears packed (and its
    i-quant ones with `iquants`), every other tensor materialized in `dtype`; with the {type: count} of packed
    weights."""
    packed = kernels and str(device).startswith("cuda")
    model = load_model(path, dtype=dtype, device=device, keep_quantized=packed)
    counts = pack_linears(model, iquants) if packed else Counter()
    model.materialize()
    if packed:
        join_shared_inputs(model)
    return model, counts
