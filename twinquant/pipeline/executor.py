"""Quantize a model block by block (sequential calibration), into per-tensor types; streamed and resumable.

For each block in order, one shared-input group at a time (q/k/v, o, gate/up, down; `roles.shared_input_groups`):
run the calibration activations up to the group's input and accumulate its Hessian from the inputs the block
really sees — the earlier blocks and the block's earlier groups are already quantized, so their errors feed
forward (GPTQ's "true sequential" mode); then quantize the group's linears (GPTQ with that Hessian, or RTN), each
into its assigned type, with the Hessian's diagonal as the importance (what llama.cpp's imatrix holds); then
compute their outputs with the quantized weights (`calibration.blocks.staged_block`: every linear runs once). The
block's outputs are the next block's inputs. A mixture-of-experts block goes expert-major with one batch of
experts' weights in memory (`calibration.moe_blocks.staged_moe_block`: DeepSeek-V3's stacks are 45 GB in float32);
the dense blocks of latent attention collect every group's Hessian in one pass with the float weights, then
quantize, then run again. The embedding is quantized first, by RTN (it has no Hessian); the output head last, by GPTQ on
the final-norm activations. Tensors of more than `CHUNK_ABOVE` rows (a large vocabulary's embedding and head) are
quantized row chunk by row chunk: rows are independent in every codec and in GPTQ.

`stream=True` bounds memory by about one block: each block's tensors are released once its outputs exist (a lazy
model reloads nothing of it again), the embedding's float copy is dropped once the activations exist, and with a
`WorkDir` every packed tensor goes to disk and is memory-mapped back. With a `WorkDir` the run also records its
progress after every block, and a run opened with `resume` continues at the first unfinished block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.model import roles
from twinquant.model.forward import embed, rms_norm
from twinquant.model.model import Model, QuantizedWeight
from twinquant.calibration.blocks import block_hessians, block_pass, staged_block, stages
from twinquant.calibration.moe_blocks import staged_moe_block
from twinquant.calibration.spill import spill_directory
from twinquant.algorithms.backends import experts_per_batch, quantize_experts_to_format, quantize_to_format
from twinquant.formats import codec_for
from twinquant.progress import Progress

T = roles.T
# On the CPU a tensor of more rows than CHUNK_ABOVE (a large vocabulary's embedding and head) is quantized CHUNK_ROWS
# rows at a time: the codec fits and GPTQ hold several row-sized temporaries (~1.7 GB at 32768 x 1536 for GPTQ).
# On a GPU every chunk repeats GPTQ's column sweep (launch-bound: ~1 ms a column on an H200), so chunks there are as
# large as GPU_CHUNK_BYTES of those temporaries allow (about 14 float32 copies of the chunk, measured on the CPU).
CHUNK_ABOVE = 16384
CHUNK_ROWS = 8192
GPU_CHUNK_BYTES = 24 * 2**30
OUT_ERROR_ROWS = 256        # rows a report's output error is taken over (a diagnostic: ~3% off the whole)


def chunk_rows(rows: int, cols: int, device) -> int:
    """Rows quantized at a time for a [rows, cols] tensor on `device` (rows are independent in every codec)."""
    if torch.device(device).type == "cpu":
        return CHUNK_ROWS if rows > CHUNK_ABOVE else rows
    return max(CHUNK_ROWS, min(rows, GPU_CHUNK_BYTES // (14 * 4 * cols)))


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, int]
    type: str
    bits_per_weight: float
    rel_error: float            # ‖W − Ŵ‖ / ‖W‖
    out_error: float | None     # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): relative output error on the calibration inputs
    #                             (over about OUT_ERROR_ROWS evenly spread rows)
    seconds: float
    expert_tokens: list[int] | None = None    # a stacked expert tensor: calibration tokens routed to each expert


@dataclass
class QuantReport:
    method: str
    tensors: list[TensorReport] = field(default_factory=list)
    seconds_per_block: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "seconds_per_block": self.seconds_per_block,
                "tensors": [t.__dict__ for t in self.tensors]}


class Interrupted(Exception):
    """Raised by `stop_after_block` (tests of resuming: a simulated kill after a finished block)."""


def _parts(quantizer, W: torch.Tensor, codec, H, imp, expert_hessians):
    """(weights, Hessian, (bytes, dequantized)) pieces: a stacked expert tensor's experts, each with its own Hessian
    (quantized together where the quantizer can: `quantize_experts_to_format`); else row chunks of a large tensor
    (rows are independent in every codec and in GPTQ), quantized as they are asked for."""
    if W.ndim == 3:     # (each expert's Hessian asked for right after its result: a chunk is built once)
        done = quantize_experts_to_format(quantizer, W, codec, expert_hessians, imp)
        for e, res in enumerate(done):
            yield W[e], (expert_hessians[e] if expert_hessians is not None else None), res
        return
    step = chunk_rows(W.shape[0], W.shape[1], W.device)
    for r in range(0, W.shape[0], step):
        Wc = W[r: r + step]
        yield Wc, H, quantize_to_format(quantizer, Wc, codec, H=H, importance=imp)


class _Tally:
    """A tensor's error sums as its parts (row chunks, experts) arrive: ‖ΔW‖², ‖W‖², and tr(ΔW H ΔWᵀ), tr(W H Wᵀ)
    over evenly spread rows (the whole costs rows·cols², as much as GPTQ's own sweep)."""

    def __init__(self):
        self.dd = self.ww = self.dhd = self.whw = 0.0

    def add(self, W: torch.Tensor, hat: torch.Tensor, H: torch.Tensor | None) -> None:
        d = W - hat.float()
        self.dd += float(d.square().sum())      # (float32 sums are pairwise: as exact as float64 here, 4x faster)
        self.ww += float(W.square().sum())
        if H is not None:
            Hf, step = H.float(), max(1, W.shape[0] // OUT_ERROR_ROWS)
            self.dhd += float(torch.einsum("ij,jk,ik->", d[::step], Hf, d[::step]))
            self.whw += float(torch.einsum("ij,jk,ik->", W[::step], Hf, W[::step]))

    def report(self, name, shape, type_name, bpw, seconds, expert_tokens=None) -> TensorReport:
        out_err = self.dhd / max(self.whw, 1e-30) if self.whw > 0 else None
        return TensorReport(name, tuple(shape), type_name, bpw, (self.dd / max(self.ww, 1e-60)) ** 0.5, out_err,
                            seconds, expert_tokens)


class StackQuantizer:
    """One stacked expert tensor [experts, rows, cols] quantized a batch of experts at a time
    (`calibration.moe_blocks.staged_moe_block`): each batch's packed bytes go into one [experts, rows, bytes] array
    (llama.cpp's expert-major layout), and the float stack is never held; `finish` ends the tensor in the model
    and returns its report. (A grid with no GGML type has no bytes: its dequantized stack is kept instead.)"""

    def __init__(self, model: Model, name: str, type_name: str, quantizer, importance=None, then=None):
        self.model, self.name, self.type_name, self.quantizer, self.then = model, name, type_name, quantizer, then
        self.shape = roles.expected_shape(model.spec, name)
        self.codec = codec_for(type_name, self.shape[-1])
        self.ggml = getattr(self.codec, "ggml_type", None) is not None
        self.importance, self.data, self.floats = importance, None, None
        self.tally, self.seconds = _Tally(), 0.0     # the seconds of its own batches (gate's and up's interleave)

    def batch(self, first: int, W: torch.Tensor, hessians) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        imp = self.importance[first: first + W.shape[0]] if self.importance is not None else None
        hats = []
        for j, (data, hat) in enumerate(quantize_experts_to_format(self.quantizer, W, self.codec, hessians, imp)):
            if self.ggml:
                data = np.asarray(data).reshape(self.shape[1], -1)
                if self.data is None:
                    self.data = np.empty((self.shape[0], *data.shape), dtype=np.uint8)
                self.data[first + j] = data
            else:
                if self.floats is None:
                    self.floats = torch.empty(self.shape, dtype=torch.float32)
                self.floats[first + j] = hat.cpu()
            self.tally.add(W[j], hat, hessians[j] if hessians is not None else None)
            hats.append(hat)
        self.seconds += time.perf_counter() - t0
        return hats

    def finish(self, expert_tokens: list[int] | None = None) -> TensorReport:
        m = self.model
        if self.ggml:
            m.tensors.pop(self.name, None)      # the forward reads it back from its bytes
            m.quantized[self.name] = QuantizedWeight(self.codec.ggml_type, self.data)
            bpw = 8.0 * self.data.size / int(np.prod(self.shape))
            self.data = None        # the model's (or the work directory's mapped copy) from here
        else:
            m.set(self.name, self.floats)
            bpw = float(getattr(self.codec, "bits_per_weight", 0.0))
        rep = self.tally.report(self.name, self.shape, self.type_name, bpw, self.seconds, expert_tokens)
        if self.then is not None:
            self.then(rep)
        return rep

    def alone(self) -> TensorReport:
        """The whole stack without calibration (RTN, or an imatrix's importance), a batch of experts at a time."""
        n, rows, cols = self.shape
        step = experts_per_batch(rows, cols, self.model.device)
        for e0 in range(0, n, step):
            self.batch(e0, torch.stack([self.model.expert(self.name, e).float() for e in range(e0, min(n, e0 + step))]),
                       None)
        return self.finish()


def quantize_tensor(model: Model, name: str, type_name: str, quantizer, H: torch.Tensor | None,
                    importance: torch.Tensor | None = None, expert_hessians: list[torch.Tensor] | None = None,
                    expert_tokens: list[int] | None = None) -> TensorReport:
    """Quantize one tensor of `model` in place (packed bytes to `model.quantized`, its dequantization to
    `model.tensors`); row chunk by row chunk when it is large, expert by expert (`expert_hessians`) when it is a
    stacked expert tensor [experts, out, in]."""
    t0 = time.perf_counter()
    W = model.get(name).float()          # on the model's device: GPTQ and the codecs' block fits run there
    codec = codec_for(type_name, W.shape[-1])
    imp = importance if importance is not None else (torch.diagonal(H).clone() if H is not None else None)
    if quantizer.needs_hessian and H is None and expert_hessians is None:   # the embedding: nothing to weigh GPTQ
        from twinquant.algorithms.backends import get_quantizer             # with, so RTN

        quantizer = get_quantizer("rtn")
    ggml = getattr(codec, "ggml_type", None) is not None
    packed = []
    W_hat = None
    tally = _Tally()
    done_rows = 0
    for Wc, Hc, (data, hat) in _parts(quantizer, W, codec, H, imp, expert_hessians):
        if ggml:
            packed.append(data)
        if W_hat is None:
            W_hat = hat if Wc.shape == W.shape else torch.empty(W.shape, dtype=hat.dtype, device=hat.device)
        if W_hat is not hat:
            W_hat.view(-1, W.shape[-1])[done_rows: done_rows + Wc.shape[0]] = hat
        done_rows += Wc.shape[0]
        tally.add(Wc, hat, Hc)
    if ggml:
        data = packed[0] if len(packed) == 1 else np.concatenate(packed)
        data = data.reshape(*W.shape[:-1], -1)        # a stacked tensor's bytes as GGUF holds them
        model.set_quantized(name, W_hat, QuantizedWeight(codec.ggml_type, data))
        bpw = 8.0 * data.size / W.numel()
    else:
        model.set(name, W_hat)     # integer grids: fake-quant (no GGUF type), float storage
        bpw = float(getattr(codec, "bits_per_weight", 0.0))
    return tally.report(name, W.shape, type_name, bpw, time.perf_counter() - t0, expert_tokens)


def quantize_blocks(model: Model, types: dict[str, str], method: str = "gptq", windows: torch.Tensor | None = None,
                    config: dict | None = None, progress: bool = True, log=None,
                    importance: dict[str, torch.Tensor] | None = None, stream: bool = False, workdir=None,
                    stop_after_block: int | None = None) -> QuantReport:
    """Quantize every tensor named in `types` (name -> type name); others stay float. See the module doc.

    `importance` (name -> [cols], [experts, cols] for stacked experts, e.g. from an imatrix file) replaces the Hessian diagonal as the weights of the
    block fits for the tensors it names. `log(TensorReport)` is called after every tensor."""
    imps = importance or {}
    from twinquant.algorithms.backends import get_quantizer

    quantizer = get_quantizer(method, config)
    if quantizer.needs_hessian and windows is None:
        raise TwinquantError(f"method {method!r} needs calibration windows")
    s = model.spec
    report = QuantReport(method)
    state = workdir.state if workdir is not None else None
    if state is not None:      # a resumed run: what is finished comes back from the work directory
        report.tensors = [TensorReport(**{**t, "shape": tuple(t["shape"])}) for t in state["report"]]
        report.seconds_per_block = list(state["seconds_per_block"])
        import gguf

        for n, ty in state["tensors"].items():
            model.quantized[n] = QuantizedWeight(gguf.GGMLQuantizationType[ty], workdir.load_tensor(n))
            model.release(n)

    def done(rep: TensorReport) -> None:
        report.tensors.append(rep)
        if workdir is not None:
            q = model.quantized.get(rep.name)
            if q is not None:   # packed bytes to disk, mapped back: the process never holds them all
                model.quantized[rep.name] = QuantizedWeight(q.ggml_type,
                                                            workdir.save_tensor(rep.name, q.ggml_type.name, q.data))
        if log:
            log(rep)

    def commit(**changes) -> None:
        if workdir is not None:
            workdir.commit(report=[t.__dict__ for t in report.tensors],
                           seconds_per_block=report.seconds_per_block, **changes)

    emb = roles.name(T.TOKEN_EMBD)
    start = state["blocks_done"] if state is not None else 0
    if emb in types and not (state and state["embedding_done"]):
        # first, so the calibration activations start from the embedding the file will hold
        done(quantize_tensor(model, emb, types[emb], quantizer, None, imps.get(emb)))
    x = None
    if windows is not None:
        if start > 0:
            x = workdir.load_x(start)
        else:
            x = embed(model, windows).float()          # [n, ctx, hidden]
            if workdir is not None:
                workdir.save_x(0, x)
    if stream:
        model.release(emb)          # its float copy is not needed again (the head of a tied model reloads it)
    commit(embedding_done=True, blocks_done=start)
    with Progress(s.n_layers, "quantize", enabled=progress) as bar:
        for layer in range(start, s.n_layers):
            t0 = time.perf_counter()
            groups = roles.shared_input_groups(layer, s)
            wanted = {n for g in groups for n in g if n in types}

            def quantize_group(g, H) -> None:
                for n in g:
                    if n in types:
                        done(quantize_tensor(model, n, types[n], quantizer, H, imps.get(n)))

            if x is not None and stages(model, layer):    # group by group, every linear run once
                x = staged_block(model, layer, x, wanted, quantize_group, spill_directory(workdir), in_place=True)
            elif x is not None and s.moe_layer(layer):     # a batch of experts' weights in memory at a time
                def quantize_stack(n, Hs) -> None:
                    if n in types:
                        done(quantize_tensor(model, n, types[n], quantizer, None, imps.get(n), Hs))

                def stack_quantizer(n) -> StackQuantizer | None:
                    return StackQuantizer(model, n, types[n], quantizer, imps.get(n), then=done) if n in types else None

                x = staged_moe_block(model, layer, x, wanted, quantize_group, quantize_stack, stack_quantizer,
                                     spill_directory(workdir))
            else:   # latent attention's dense blocks (two passes); or no calibration at all
                hooks = block_hessians(model, layer, x, wanted) if x is not None else None
                for g in groups:
                    if roles.is_expert_stack(g[0]):     # no calibration: a batch of experts at a time
                        for n in (m for m in g if m in types):
                            StackQuantizer(model, n, types[n], quantizer, imps.get(n), then=done).alone()
                        continue
                    if hooks is not None and roles.is_stack(g[0]):     # MLA's per-head k_b / v_b
                        for n in (m for m in g if m in types):
                            shape = roles.expected_shape(s, n)
                            Hs, _ = hooks.expert_hessians(g[0], shape[0], shape[-1])
                            done(quantize_tensor(model, n, types[n], quantizer, None, imps.get(n), Hs))
                        continue
                    quantize_group(g, hooks.hessian(g[0]) if hooks is not None else None)
                if x is not None:   # the next block sees this block's quantized outputs
                    x = block_pass(model, layer, x)
            model.fuse_shared_inputs()
            if stream:
                model.release_block(layer)
            report.seconds_per_block.append(time.perf_counter() - t0)
            if workdir is not None and x is not None:
                workdir.save_x(layer + 1, x)
            commit(blocks_done=layer + 1)
            bar.update(layer + 1, f"block {layer}: {report.seconds_per_block[-1]:.1f} s")
            if stop_after_block is not None and layer >= stop_after_block:
                raise Interrupted(f"stopped after block {layer}")
    out = roles.name(T.OUTPUT)
    if out in types and not (state and out in state["tensors"]):
        H = None
        if x is not None:
            from twinquant.algorithms.gptq import accumulate_hessian

            h = rms_norm(x.to(model.dtype), model.get(roles.name(T.OUTPUT_NORM)), s.rms_eps).float()
            H, _ = accumulate_hessian(None, 0, h.reshape(-1, s.hidden))
        done(quantize_tensor(model, out, types[out], quantizer, H, imps.get(out)))
        if stream:
            model.release(out)
        commit()
    return report


def quantize_model(model: Model, types: dict[str, str], method: str = "gptq", windows: torch.Tensor | None = None,
                   config: dict | None = None, progress: bool = True, log=None,
                   importance: dict[str, torch.Tensor] | None = None) -> QuantReport:
    """`quantize_blocks` in memory: every quantized tensor stays in the model (for tests and small models)."""
    return quantize_blocks(model, types, method, windows, config, progress, log, importance)
