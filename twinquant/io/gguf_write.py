"""Write a `Model` as a GGUF file that stock llama.cpp loads (float types now; block formats come later).

Uses gguf-py's `GGUFWriter` in streaming mode (tensor infos first, then one tensor at a time), so writing never
holds more than one tensor in memory. Names are the role names (llama.cpp's own); llama-family q/k rows are
permuted back to llama.cpp's interleaved RoPE order. The file is written under a temporary name and renamed at
the end: a failure leaves nothing half-written. With `split_max_size`, gguf-py splits the file into llama.cpp's
shards (`m-00001-of-00003.gguf` …, see `twinquant.io.split`), written in a temporary directory and moved into
place only when every shard is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import drop_pages, permute_rope_rows, rope_permuted_heads
from twinquant.io.metadata import write_metadata
from twinquant.model import roles
from twinquant.model.architectures import get_architecture
from twinquant.model.model import Model

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
               Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}


def _hyperparameters(w: gguf.GGUFWriter, model: Model) -> None:
    s = model.spec
    w.add_name(s.name or s.arch)
    w.add_context_length(s.context_length)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.n_layers)
    w.add_feed_forward_length(s.intermediate)
    w.add_head_count(s.n_heads)
    if s.mla:   # llama.cpp runs latent attention as one key/value head of the latent + RoPE part (its converter's keys)
        w.add_head_count_kv(1)
        w.add_key_length(s.kv_lora_rank + s.rope_dim)
        w.add_value_length(s.kv_lora_rank)
        w.add_key_length_mla(s.head_dim)
        w.add_value_length_mla(s.v_head_dim)
        w.add_q_lora_rank(s.q_lora_rank)      # 0: attn_q (llama.cpp requires the key but for its "lite" sizes)
        w.add_kv_lora_rank(s.kv_lora_rank)
        w.add_rope_dimension_count(s.rope_dim)
    else:
        w.add_head_count_kv(s.n_kv_heads)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    if s.yarn_factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.yarn_factor)
        w.add_rope_scaling_orig_ctx_len(s.yarn_orig_ctx)
        if s.yarn_mscale_all_dim:   # llama.cpp's converter writes 0.1 x mscale_all_dim here (and divides it back)
            w.add_rope_scaling_yarn_log_mul(0.1 * s.yarn_mscale_all_dim)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(s.vocab)
    if s.moe:
        w.add_expert_count(s.n_experts)
        w.add_expert_used_count(s.n_experts_used)
        w.add_expert_feed_forward_length(s.expert_ffn)
        if s.shared_ffn and not roles.shared_gate(s):       # DeepSeek: shared experts of the routed experts' width
            w.add_expert_shared_count(s.shared_ffn // s.expert_ffn)
        elif s.shared_ffn:
            w.add_expert_shared_feed_forward_length(s.shared_ffn)
    if get_architecture(s.arch).mla:
        w.add_leading_dense_block_count(s.n_dense_lead)
        w.add_expert_weights_scale(s.expert_scale)
        w.add_expert_weights_norm(s.norm_topk)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if s.gating == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        if s.n_groups > 1:
            w.add_expert_group_count(s.n_groups)
            w.add_expert_group_used_count(s.groups_used)


def _type_for(name: str, t_shape: tuple[int, ...], ftype: Q) -> Q:
    # llama.cpp keeps 1-D tensors (norms, biases) and routers in F32 whatever the file type.
    return Q.F32 if roles.keeps_f32(name, t_shape) else ftype


def check_stock_graph(model: Model) -> None:
    """Refuse what stock llama.cpp would load and compute differently, with no twinquant metadata to say so."""
    s, arch = model.spec, get_architecture(model.spec.arch)
    if s.moe and s.group_score == "max" and 1 < s.n_groups and s.groups_used < s.n_groups:
        raise TwinquantError("llama.cpp scores a group of experts by its best two (DeepSeek-V3's rule), this model by "
                             "its best one (DeepSeek-V2's group_limited_greedy): a GGUF of it would route differently")
    if s.yarn_factor and ((s.yarn_beta_fast, s.yarn_beta_slow) != (32.0, 1.0) or (
            s.yarn_mscale != s.yarn_mscale_all_dim or (s.mla and not s.yarn_mscale))):
        raise TwinquantError("llama.cpp computes YaRN with beta_fast 32, beta_slow 1 and (DeepSeek) mscale = "
                             f"mscale_all_dim (none elsewhere); this model has {s.yarn_beta_fast:g}, "
                             f"{s.yarn_beta_slow:g}, {s.yarn_mscale:g} / {s.yarn_mscale_all_dim:g}: a GGUF of it would "
                             "compute another function")
    if s.moe and s.shared_ffn and not roles.shared_gate(s) and s.shared_ffn % s.expert_ffn:
        raise TwinquantError(f"shared experts of width {s.shared_ffn} are not a whole number of experts of width "
                             f"{s.expert_ffn}, which llama.cpp's DeepSeek graph needs")
    if s.moe and arch.gguf_norm_topk is not None and s.norm_topk != arch.gguf_norm_topk:
        raise TwinquantError(f"llama.cpp's {arch.name} graph {'re' if arch.gguf_norm_topk else 'does not re'}"
                             f"normalize the chosen experts' weights, and this model "
                             f"{'does not' if arch.gguf_norm_topk else 'does'} (norm_topk_prob): a GGUF of it "
                             "would compute another function")


def _write_head(w: gguf.GGUFWriter, model: Model, qtype: Q, types: dict[str, Q]) -> None:
    """Header, key-values (hyperparameters, twinquant.*, tokenizer) and tensor infos."""
    from twinquant.io.tokenizer import write_tokenizer_metadata

    _hyperparameters(w, model)
    w.add_file_type(_FILE_TYPES[qtype])
    write_metadata(w, model)
    write_tokenizer_metadata(w, model.tokenizer)
    for n, t in types.items():
        byte_shape = gguf.quant_shape_to_byte_shape(roles.expected_shape(model.spec, n), t)
        w.add_tensor_info(n, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()


def file_bytes(model: Model, types: dict[str, str], ftype: str = "F16") -> tuple[int, int]:
    """(bytes of the single GGUF `write_gguf` would write if every tensor named in `types` (name -> GGML type name)
    were quantized to that type, bytes of its tensor data alone), from the model's current metadata — without
    quantizing anything. The header is really written (to a temporary file) and measured; tensor data is
    counted with each tensor's alignment padding, so the first number is an upper bound that is off by at most
    the last tensor's padding."""
    if model.tokenizer is None:
        raise TwinquantError("the model has no tokenizer; llama.cpp needs one in the GGUF")
    qtype = FLOAT_TYPES[ftype.upper()]
    arch = get_architecture(model.spec.arch)
    all_types = {}
    for n in model.tensor_names():
        shape = roles.expected_shape(model.spec, n)
        all_types[n] = Q[types[n].upper()] if n in types else _type_for(n, shape, qtype)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "head.gguf"
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _write_head(w, model, qtype, all_types)
        w.close()
        head = tmp.stat().st_size
        align = w.data_alignment
    data = padded = 0
    for n, t in all_types.items():
        nb = int(np.prod(gguf.quant_shape_to_byte_shape(roles.expected_shape(model.spec, n), t)))
        data += nb
        padded += -(-nb // align) * align
    return -(-head // align) * align + padded, data


def write_gguf(model: Model, path: str | os.PathLike, ftype: str = "F16",
               progress: Callable[[int, int, str], None] | None = None,
               split_max_size: int | str | None = None) -> Path:
    """Write `model` to `path`: quantized weights (model.quantized) in their GGML types, other 2-D tensors in
    `ftype` (F32, F16 or BF16), 1-D tensors in F32.

    split_max_size: bytes of tensor data per shard (an int, or "50M", "2G" …): the model is written as llama.cpp's
    split files next to `path` (`<stem>-00001-of-0000N.gguf` …) and the first shard's path is returned (a model
    that fits in one shard is written to `path` unsplit)."""
    if ftype.upper() not in FLOAT_TYPES:
        raise TwinquantError(f"unsupported output type {ftype!r}; choose one of {', '.join(FLOAT_TYPES)}")
    qtype = FLOAT_TYPES[ftype.upper()]
    if model.tokenizer is None:
        raise TwinquantError("the model has no tokenizer; llama.cpp needs one in the GGUF")
    check_stock_graph(model)
    if not model.layout.is_sequential or (model.dup_params is not None and not model.dup_params.empty):
        warnings.warn("duplicated layers / per-copy parameters are twinquant.dup.* metadata: stock llama.cpp runs "
                      "each block once with plain activations (the base path); twinquant's runtime runs the full "
                      "topology (twinquant.stock_compatible = false)", stacklevel=2)

    if model.needs_online:
        warnings.warn("the model needs online transforms (R3/R4) that stock llama.cpp does not apply: it will load "
                      "the file but compute a different function; twinquant's runtime runs it exactly "
                      "(twinquant.stock_compatible = false)", stacklevel=2)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    split = 0
    if split_max_size is not None:
        from twinquant.io.split import parse_size

        split = parse_size(split_max_size)
    arch = get_architecture(model.spec.arch)
    names = model.tensor_names()
    tmpdir = None
    try:
        if split:   # shards are named after the output file: write them in a private directory next to it
            tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            tmp = tmpdir / path.name
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch], split_max_size=split)
        types = {}
        for n in names:
            q = model.quantized.get(n)
            types[n] = q.ggml_type if q is not None else _type_for(n, roles.expected_shape(model.spec, n), qtype)
            if q is not None:
                byte_shape = gguf.quant_shape_to_byte_shape(roles.expected_shape(model.spec, n), q.ggml_type)
                if tuple(q.data.shape) != tuple(byte_shape):
                    raise TwinquantError(f"{n}: packed data {q.data.shape} does not match {q.ggml_type.name} "
                                         f"{byte_shape}")
        _write_head(w, model, qtype, types)
        for i, n in enumerate(names):
            heads = rope_permuted_heads(model.spec, n) if arch.gguf_rope_permuted else 0
            q = model.quantized.get(n)
            if q is not None:   # rows are quantized independently, so permuting packed rows is exact
                data = permute_rope_rows(torch.from_numpy(np.array(q.data)), heads).numpy() if heads else q.data
            else:
                t = model.get(n).detach().float().cpu()
                if heads:
                    t = permute_rope_rows(t, heads)
                data = gguf.quants.quantize(t.numpy(), types[n])
            w.write_tensor_data(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
            if q is not None:
                drop_pages(q.data)      # packed bytes mapped from a work directory: written, out of RSS
            if progress:
                progress(i + 1, len(names), n)
        w.close()
        if tmpdir is not None:
            from twinquant.io.split import move_shards

            path = move_shards(tmpdir, path)[0]
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path
