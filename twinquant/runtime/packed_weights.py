"""Decode from packed weights: a GGUF's K-quant (and, opt-in, i-quant) linears stay as their GGML bytes on the GPU
and the forward multiplies them there (formats/ggml/packed.qlinear), instead of holding float copies: a Q2_K model
takes its file size in GPU memory, and each decode step reads those bytes once."""

from __future__ import annotations

from collections import Counter

from twinquant.formats.ggml.packed import IQ_TYPES, PackedWeight, kernel_for
from twinquant.io.load import load_model
from twinquant.model import roles
from twinquant.model.model import Model


def pack_linears(model: Model, iquants: bool = False) -> Counter:
    """Move every 2-D quantized weight with a kernel on model.device (not the token embedding: it is looked up,
    not multiplied) into `model.packed`; needs the model loaded with keep_quantized. Returns {type: count}.

    The i-quants' kernels (`iquants`) are opt-in: checked against gguf-py through Triton's interpreter, not yet
    compiled and timed on a GPU."""
    embd = roles.name(roles.T.TOKEN_EMBD)
    counts: Counter = Counter()
    for name, q in model.quantized.items():
        shape = roles.expected_shape(model.spec, name)
        t = q.ggml_type.name
        if name == embd or len(shape) != 2 or not kernel_for(t, model.device) or (t in IQ_TYPES and not iquants):
            continue
        model.packed[name] = PackedWeight.from_bytes(t, q.data, shape[-1], model.device)
        model.tensors.pop(name, None)
        counts[t] += 1
    model.fuse_shared_inputs()
    return counts


def load_for_decode(path, dtype, device, kernels: bool = True, iquants: bool = False) -> tuple[Model, Counter]:
    """The model `generate` / `run` decode with: on CUDA (unless kernels=False) its K-quant linears packed (and its
    i-quant ones with `iquants`), every other tensor materialized in `dtype`; with the {type: count} of packed
    weights."""
    packed = kernels and str(device).startswith("cuda")
    model = load_model(path, dtype=dtype, device=device, keep_quantized=packed)
    counts = pack_linears(model, iquants) if packed else Counter()
    return model.materialize(), counts
