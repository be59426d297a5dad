"""Quantize a model block by block (sequential calibration), into per-tensor types.

For each block in order: run the calibration activations through it, accumulating one Hessian per shared-input
group (q/k/v, o, gate/up, down; `roles.shared_input_groups`) from the inputs the block really sees — the earlier
blocks are already quantized, so their errors feed forward (GPTQ's sequential mode); then quantize the block's
linears (GPTQ with that Hessian, or RTN), each into its assigned type, with the Hessian's diagonal as the
importance (what llama.cpp's imatrix holds); then recompute the block's outputs with the quantized weights as the
next block's inputs. The embedding is quantized first, by RTN (it has no Hessian); the output head last, by GPTQ on
the final-norm activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.forward import block_forward, embed, rms_norm
from twinquant.model.model import Model, QuantizedWeight
from twinquant.progress import Progress

T = roles.T


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, int]
    type: str
    bits_per_weight: float
    rel_error: float            # ‖W − Ŵ‖ / ‖W‖
    out_error: float | None     # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): relative output error on the calibration inputs
    seconds: float


@dataclass
class QuantReport:
    method: str
    tensors: list[TensorReport] = field(default_factory=list)
    seconds_per_block: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds_per_block": self.seconds_per_block,
                "tensors": [t.__dict__ for t in self.tensors]}


class HessianHook:
    """A `LinearHook` accumulating H = mean of 2·xᵀx over the inputs of the named linears (one per input group)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.acc: dict[str, tuple[torch.Tensor, int]] = {}

    def __call__(self, name: str, inp: torch.Tensor) -> None:
        if name in self.names:
            from twinquant.quant.gptq import accumulate_hessian

            H, n = self.acc.get(name, (None, 0))
            self.acc[name] = accumulate_hessian(H, n, inp.reshape(-1, inp.shape[-1]).float())

    def hessian(self, name: str) -> torch.Tensor | None:
        return self.acc.get(name, (None, 0))[0]


def codec_for(type_name: str, cols: int):
    """The codec of a type name (GGML types like Q4_K; integer grids like int4_g128_asym)."""
    if type_name.lower().startswith("int"):
        from twinquant.quant.intgrid import IntGrid

        return IntGrid.from_name(type_name).for_cols(cols)
    from twinquant.quant.ggml import get_codec

    codec = get_codec(type_name)
    codec.check_cols(cols)
    return codec


def _quantize_tensor(model: Model, name: str, type_name: str, quantizer, H: torch.Tensor | None,
                     report: QuantReport, log, importance: torch.Tensor | None = None) -> None:
    t0 = time.perf_counter()
    W = model.get(name).float().cpu()
    codec = codec_for(type_name, W.shape[1])
    imp = importance if importance is not None else (torch.diagonal(H).clone() if H is not None else None)
    if quantizer.needs_hessian and H is None:   # e.g. the embedding: nothing to weigh GPTQ with, so RTN
        from twinquant.quant.backends import get_quantizer

        quantizer = get_quantizer("rtn")
    codes, params, W_hat = quantizer.quantize_weight(W, codec, H=H, importance=imp)
    if getattr(codec, "ggml_type", None) is not None:
        data = codec.pack(codes, params)
        model.set_quantized(name, W_hat, QuantizedWeight(codec.ggml_type, data))
        bpw = 8.0 * data.size / W.numel()
    else:
        model.set(name, W_hat)     # integer grids: fake-quant (no GGUF type), float storage
        bpw = float(getattr(codec, "bits_per_weight", 0.0))
    d = (W - W_hat.float())
    out_err = None
    if H is not None:
        Hf = H.float()
        out_err = float(torch.einsum("ij,jk,ik->", d, Hf, d) / torch.einsum("ij,jk,ik->", W, Hf, W).clamp_min(1e-30))
    rep = TensorReport(name, tuple(W.shape), type_name, bpw, float(d.norm() / W.norm().clamp_min(1e-30)), out_err,
                       time.perf_counter() - t0)
    report.tensors.append(rep)
    if log:
        log(rep)


def quantize_model(model: Model, types: dict[str, str], method: str = "gptq", windows: torch.Tensor | None = None,
                   config: dict | None = None, progress: bool = True, log=None,
                   importance: dict[str, torch.Tensor] | None = None) -> QuantReport:
    """Quantize every tensor named in `types` (name -> type name); others stay float.

    `importance` (name -> [cols], e.g. from an imatrix file) replaces the Hessian diagonal as the weights of the
    block fits for the tensors it names."""
    imps = importance or {}
    from twinquant.quant.backends import get_quantizer

    quantizer = get_quantizer(method, config)
    if quantizer.needs_hessian and windows is None:
        raise TwinquantError(f"method {method!r} needs calibration windows")
    s = model.spec
    report = QuantReport(method)
    emb = roles.name(T.TOKEN_EMBD)
    if emb in types:    # first, so the calibration activations start from the embedding the file will hold
        _quantize_tensor(model, emb, types[emb], quantizer, None, report, log, imps.get(emb))
    x = embed(model, windows).float() if windows is not None else None          # [n, ctx, hidden]
    with Progress(s.n_layers, "quantize", enabled=progress) as bar:
        for layer in range(s.n_layers):
            t0 = time.perf_counter()
            groups = roles.shared_input_groups(layer)
            wanted = [g for g in groups if any(n in types for n in g)]
            hooks = HessianHook({g[0] for g in wanted})
            if x is not None and wanted:
                for i in range(x.shape[0]):
                    block_forward(model, layer, x[i: i + 1].to(model.dtype), hook=hooks)
            for g in wanted:
                H = hooks.hessian(g[0])
                for n in g:
                    if n in types:
                        _quantize_tensor(model, n, types[n], quantizer, H, report, log, imps.get(n))
            if x is not None:   # the next block sees this block's quantized outputs
                x = torch.cat([block_forward(model, layer, x[i: i + 1].to(model.dtype)).float()
                               for i in range(x.shape[0])])
            model.fuse_shared_inputs()
            report.seconds_per_block.append(time.perf_counter() - t0)
            bar.update(layer + 1)
    out = roles.name(T.OUTPUT)
    if out in types:
        H = None
        if x is not None:
            from twinquant.quant.gptq import accumulate_hessian

            h = rms_norm(x.to(model.dtype), model.get(roles.name(T.OUTPUT_NORM)), s.rms_eps).float()
            H, _ = accumulate_hessian(None, 0, h.reshape(-1, s.hidden))
        _quantize_tensor(model, out, types[out], quantizer, H, report, log, imps.get(out))
    return report
