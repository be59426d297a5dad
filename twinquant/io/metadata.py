"""`twinquant.*` GGUF metadata: versioned extras that stock llama.cpp ignores.

Schema version `major.minor.patch`. Readers ignore unknown keys (with a warning), read a newer minor version
(what they know of it), and refuse a newer major version with a clear error.

Keys (schema 0.1):
- `twinquant.version`, `twinquant.producer`
- `twinquant.stock_compatible` (bool): stock llama.cpp computes the same function as the twinquant runtime
- `twinquant.rotation` (JSON list): every rotation fused into the weights, in order (kind, type, n, seed …)
- `twinquant.online` (JSON): transforms the runtime applies at run time:
  `{"inputs": {tensor name: transform}, "qk": transform | null}`

Added in schema 0.2:
- `twinquant.padding` (JSON list): the block-alignment padding records (`twinquant.export.padding`), also part of
  `twinquant.rotation`: original and padded widths (hidden, intermediate, heads) and the rms eps before/after,
  so a reader knows which channels are zero padding

Added in schema 0.3:
- `twinquant.quant` (JSON): how the weights were quantized: `{"recipe": {...}, "rotation": "none|rh|ro",
  "calibration": {"file", "sha256", "tokens", "ctx"} | null}` (`twinquant.pipeline.recipe`); with `--imatrix`
  also `"imatrix": {"file", "sha256"}`; with `--target-size / --target-bpw` also `"allocation": {"target",
  "measurement_sha256", "predicted_kld", "tensor_bytes", "gap", "types": {tensor: type}}` (`twinquant.allocation.target`)

Added in schema 0.4:
- `twinquant.dup.topology` (JSON, the seed's shape; `twinquant.model.topology`): blocks that run more than
  once, serial or parallel, sharing their weights. Stock llama.cpp ignores it and runs each block once (the base
  path); `twinquant.stock_compatible` is then false.
- `twinquant.dup.params` (JSON, sparse `{"base", "layers", "copies"}`; `twinquant.model.copies`): per-copy
  parameter sets (activation quantization, clipping, rounding, residual factor)
"""

from __future__ import annotations

import json
import warnings

import gguf

import twinquant
from twinquant.errors import TwinquantError
from twinquant.model import history

SCHEMA_VERSION = "0.4.0"
PREFIX = "twinquant."
KNOWN = {"version", "producer", "stock_compatible", "rotation", "online", "padding", "quant", "dup.topology",
         "dup.params"}
JSON_KEYS = ("rotation", "online", "padding", "quant", "dup.topology", "dup.params")


def stock_compatible(model) -> bool:
    """Does stock llama.cpp compute the function twinquant's runtime computes from this model's file?"""
    return not model.needs_online and not _dup_keys(model)


def _dup_keys(model) -> dict:
    from twinquant.model.topology import topology_of

    out = {}
    if not model.layout.is_sequential:
        out["dup.topology"] = topology_of(model.layout)
    if model.dup_params is not None and not model.dup_params.empty:
        out["dup.params"] = model.dup_params.to_dict()
    return out


def write_metadata(w: gguf.GGUFWriter, model) -> None:
    w.add_string(PREFIX + "version", SCHEMA_VERSION)
    w.add_string(PREFIX + "producer", f"twinquant {twinquant.__version__}")
    w.add_bool(PREFIX + "stock_compatible", stock_compatible(model))
    if model.history:
        w.add_string(PREFIX + "rotation", json.dumps(history.to_list(model.history)))
    padding = history.paddings(model.history)
    if padding:
        w.add_string(PREFIX + "padding", json.dumps(history.to_list(padding)))
    if model.quant_record:
        w.add_string(PREFIX + "quant", json.dumps(model.quant_record))
    for k, v in _dup_keys(model).items():
        w.add_string(PREFIX + k, json.dumps(v))
    if model.needs_online:
        online = {"inputs": {n: t.to_dict() for n, t in model.input_transforms.items()},
                  "qk": model.qk_transform.to_dict() if model.qk_transform is not None else None}
        w.add_string(PREFIX + "online", json.dumps(online))


def _version(s: str) -> tuple[int, int, int]:
    try:
        major, minor, patch = (int(p) for p in s.split("."))
    except ValueError:
        raise TwinquantError(f"twinquant.version {s!r} is not major.minor.patch") from None
    return major, minor, patch


def read_metadata(reader: gguf.GGUFReader) -> dict:
    """The twinquant.* keys of a file (without the prefix); {} for a file we did not write."""
    keys = {k[len(PREFIX):]: f.contents() for k, f in reader.fields.items() if k.startswith(PREFIX)}
    if not keys:
        return {}
    if "version" not in keys:
        raise TwinquantError("twinquant metadata without twinquant.version")
    have, ours = _version(keys["version"]), _version(SCHEMA_VERSION)
    if have[0] > ours[0]:
        raise TwinquantError(f"this file needs twinquant metadata schema {keys['version']}; this twinquant reads "
                             f"{SCHEMA_VERSION}: upgrade twinquant")
    unknown = sorted(set(keys) - KNOWN)
    if unknown:
        warnings.warn(f"ignoring unknown twinquant metadata keys: {', '.join(unknown)}", stacklevel=2)
    for k in JSON_KEYS:
        if k in keys:
            try:
                keys[k] = json.loads(keys[k])
            except json.JSONDecodeError:
                raise TwinquantError(f"twinquant.{k} is not valid JSON") from None
    return {k: v for k, v in keys.items() if k in KNOWN}


def apply_metadata(model, meta: dict) -> None:
    """Give a loaded model the rotation record and online transforms its file declares."""
    from twinquant.transforms.online import OnlineHadamard

    model.history = history.from_list(meta.get("rotation", []))
    model.quant_record = meta.get("quant")
    if "dup.topology" in meta or "dup.params" in meta:
        from twinquant.model.copies import ParamStore
        from twinquant.model.topology import parse_topology

        params = ParamStore.from_dict(meta.get("dup.params") or {})
        # α lives in the parameter store already: parse the topology without re-adding it
        model.layout, _ = parse_topology(meta.get("dup.topology") or {}, model.spec.n_layers, ParamStore())
        model.dup_params = params
    online = meta.get("online") or {}
    names = set(model.tensor_names())
    for n, d in (online.get("inputs") or {}).items():
        if n not in names:
            raise TwinquantError(f"twinquant.online names an unknown tensor {n!r}")
        model.input_transforms[n] = OnlineHadamard.from_dict(d)
    if online.get("qk"):
        model.qk_transform = OnlineHadamard.from_dict(online["qk"])
