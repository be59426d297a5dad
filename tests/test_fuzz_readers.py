"""Fuzzed readers: every file twinquant reads, damaged at random, ends in one `TwinquantError` line or a valid result.

Small valid inputs are built once (a tiny Llama as an HF directory and as a GGUF with float and block-quantized
tensors, an imatrix as GGUF and legacy .dat, a recipe YAML, a measurement JSON) and hypothesis mutates them:
truncation, bit flips, random byte runs, trailing garbage, huge / extreme values written into the files' own count,
length, type and offset fields (found by walking the valid file), NaN / Inf written into tensor data, and for the
text formats structured edits (a field set to a value of the wrong type, deleted, deeply nested, a YAML tag or alias
bomb). Each case runs the project's real entry points (`load_model` + `materialize`, `Imatrix.read`, `load_recipe`,
`Measurement.load`) and then uses the result. Property: it succeeds with a valid result (finite tensors of the
expected shapes, consistent sums / counts, a recipe and a measurement that round-trip) or raises `TwinquantError`
with a one-line message; anything else (IndexError, struct.error, MemoryError …) is a reader bug. Besides the
random cases, every integer field of the binary files is also set to 0 / 2^31 / max in turn (`field_sweep`), and
NaN / Inf in any float tensor must be refused. About 2,700 random cases and 630 sweep cases, ~35 s of CPU.

Bounds: each call runs under a wall-clock alarm (a hang fails the case instead of stalling CI) and under a data-size
limit (RLIMIT_DATA, ~1.5 GiB above what the process already uses), so a reader that believes a 2^60 count cannot
allocate it quietly: the MemoryError fails the case. Code-executing loaders (pickle, torch.load, unsafe YAML) are
replaced by tripwires while the readers run. Deterministic (`derandomize=True`, no example database);
TWINQUANT_FUZZ_SCALE / TWINQUANT_FUZZ_SEED (below) run longer or other sequences by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import shutil
import signal
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.tiny_models import save_tiny
from twinquant.allocation.measure import Measurement
from twinquant.calibration.imatrix import Imatrix
from twinquant.errors import TwinquantError
from twinquant.io.gguf_read import load_gguf
from twinquant.io.load import load_model
from twinquant.model import roles
from twinquant.model.model import QuantizedWeight
from twinquant.pipeline.recipe import Recipe, load_recipe

# damaged files make gguf-py's dequantizers compute with NaN / Inf and carry unknown twinquant.* keys: expected here
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf.*"),
              pytest.mark.filterwarnings("ignore:ignoring unknown twinquant metadata keys")]

CALL_SECONDS = 10          # wall-clock bound of one reader call (the hypothesis deadline is the per-case budget)
DATA_HEADROOM = 3 << 29    # 1.5 GiB of new data segment / anonymous memory per process while fuzzing


# A longer or different run by hand: TWINQUANT_FUZZ_SCALE=10 (examples x10), TWINQUANT_FUZZ_SEED=<int> (another
# deterministic sequence instead of the derandomized one CI runs).
SCALE = float(os.environ.get("TWINQUANT_FUZZ_SCALE", "1"))
SEED = os.environ.get("TWINQUANT_FUZZ_SEED")


def fuzz_settings(n: int):
    s = settings(max_examples=max(1, int(n * SCALE)), deadline=5000, derandomize=SEED is None, database=None,
                 print_blob=False, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                          HealthCheck.function_scoped_fixture,
                                                          HealthCheck.large_base_example])
    return s if SEED is None else (lambda f: seed(int(SEED))(s(f)))


# --- guards ------------------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm; a BaseException so no reader's `except Exception` can turn it into an error message."""


class CodeExecution(BaseException):
    """A reader called a loader that can execute code from the file."""


@contextlib.contextmanager
def bounded():
    """Run a reader call under the wall-clock alarm, the memory limit and the code-execution tripwires."""
    import pickle

    def on_alarm(signum, frame):
        raise Hang(f"reader call still running after {CALL_SECONDS} s")

    def tripwire(*a, **k):
        raise CodeExecution("a reader called a code-executing loader (pickle / torch.load / unsafe YAML)")

    patched = [(pickle, "load"), (pickle, "loads"), (torch, "load"), (yaml, "unsafe_load"), (yaml, "full_load"),
               (yaml, "unsafe_load_all"), (yaml, "full_load_all")]
    saved = [(mod, name, getattr(mod, name)) for mod, name in patched]
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = _vm_data() + DATA_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        for mod, name, _ in saved:
            setattr(mod, name, tripwire)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _vm_data() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return 0


def outcome(call, subject=None):
    """Run `call` bounded: its result, or None when it raised a well-formed TwinquantError. subject: the input
    file, named in the failure if the call hangs (a Hang ends the test at once: hypothesis does not shrink a
    BaseException, which would re-run hanging inputs; the derandomized run and the kept file reproduce it)."""
    try:
        with bounded():
            return call()
    except Hang as e:
        raise Hang(f"{e} (input {subject})") from None
    except TwinquantError as e:
        msg = str(e)
        assert msg.strip(), "empty TwinquantError message"
        assert "\n" not in msg, f"TwinquantError message is not one line: {msg!r}"
        assert "MemoryError" not in msg, f"an allocation failed inside a reader (wrapped as {msg!r})"
        return None


# --- byte-level mutations ---------------------------------------------------------------------------------------
EXTREME = [0, 1, 2, 3, 7, 8, 13, 255, 256, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**48,
           2**60, 2**63 - 1, 2**63, 2**64 - 1]
F32_SPECIAL = [struct.pack("<f", v) for v in (math.nan, math.inf, -math.inf, 3.0e38, -0.0)]
F16_SPECIAL = [struct.pack("<H", v) for v in (0x7E00, 0x7C00, 0xFC00, 0x7BFF, 0xFFFF)]


def apply_bytes(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        kind = m[0]
        if kind == "truncate":
            del b[m[1]:]
        elif kind == "flip" and m[1] < len(b):
            b[m[1]] ^= 1 << m[2]
        elif kind == "bytes":
            b[m[1]: m[1] + len(m[2])] = m[2]
        elif kind == "zero":
            b[m[1]: m[1] + m[2]] = bytes(len(b[m[1]: m[1] + m[2]]))
        elif kind == "append":
            b += m[1]
        elif kind == "field" and m[1] + m[2] <= len(b):
            b[m[1]: m[1] + m[2]] = (m[3] % (1 << (8 * m[2]))).to_bytes(m[2], "little")
        elif kind == "array" and m[1] + 12 <= len(b):       # an array's item type and length, together
            b[m[1]: m[1] + 12] = struct.pack("<IQ", m[2] % 2**32, m[3] % 2**64)
        elif kind == "float" and m[1] + len(m[2]) <= len(b):
            b[m[1]: m[1] + len(m[2])] = m[2]
    return bytes(b)


@st.composite
def byte_mutation(draw, size: int, fields: dict[str, list[tuple[int, int]]], floats: list[tuple[int, int, int]],
                  header_end: int):
    """One mutation of a file of `size` bytes. fields: kind of field (count, string length, type …) -> (offset,
    width) of the file's integer fields of that kind (a kind is drawn first, so the few count fields are hit as
    often as the many string lengths); floats: (offset, nbytes, itemsize) of float tensor data; header_end: where
    the metadata ends (offsets are biased there)."""
    kinds = ["truncate", "flip", "bytes", "zero", "append"] + ["field"] * 3 * bool(fields) + ["float"] * bool(floats)
    kinds += ["array"] * bool(fields.get("array_type"))
    values = [k for k in ("arch_value", "arch_value", "int_value", "float_value") if fields.get(k)]
    kinds += ["value"] * 3 * bool(values)      # a metadata value: block count, width, eps …
    kind = draw(st.sampled_from(kinds))
    offset = draw(st.one_of(st.integers(0, max(header_end - 1, 0)), st.integers(0, max(size - 1, 0))))
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, max(size - 1, 0))))
    if kind == "flip":
        return ("flip", offset, draw(st.integers(0, 7)))
    if kind == "bytes":
        return ("bytes", offset, draw(st.binary(min_size=1, max_size=16)))
    if kind == "zero":
        return ("zero", offset, draw(st.integers(1, 64)))
    if kind == "append":
        return ("append", draw(st.binary(min_size=1, max_size=64)))
    if kind == "field":
        off, width = draw(st.sampled_from(fields[draw(st.sampled_from(sorted(fields)))]))
        value = draw(st.one_of(st.sampled_from(EXTREME), st.integers(0, 2 ** (8 * width) - 1),
                               st.integers(-16, 16)))
        return ("field", off, width, value)
    if kind == "value":
        which = draw(st.sampled_from(values))
        off, width = draw(st.sampled_from(fields[which]))
        if which != "float_value":
            return ("field", off, width, draw(st.one_of(st.sampled_from(EXTREME), st.integers(-16, 16))))
        v = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-45, 3e38]))
        return ("float", off, struct.pack("<f" if width == 4 else "<d", v))
    if kind == "array":
        return ("array", draw(st.sampled_from(fields["array_type"]))[0], draw(st.integers(0, 13)),
                draw(st.sampled_from(EXTREME)))
    start, nbytes, itemsize = draw(st.sampled_from(floats))
    pat = draw(st.sampled_from(F16_SPECIAL if itemsize == 2 else F32_SPECIAL))
    return ("float", start + itemsize * draw(st.integers(0, nbytes // itemsize - 1)), pat)


def byte_mutations(size, fields=None, floats=(), header_end=None, max_size=3):
    return st.lists(byte_mutation(size, fields or {}, list(floats), header_end or size), min_size=1,
                    max_size=max_size)


# --- structure of the valid files (where the fields are) --------------------------------------------------------
GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_layout(data: bytes):
    """(integer fields {kind: [(offset, width)]}, float tensor data [(offset, nbytes, itemsize)], end of header)."""
    fields: dict[str, list[tuple[int, int]]] = {"version": [(4, 4)], "tensor_count": [(8, 8)], "kv_count": [(16, 8)]}
    add = lambda kind, off, width: fields.setdefault(kind, []).append((off, width))  # noqa: E731
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind):
        nonlocal pos
        add(kind, pos, 8)
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    def value(t, in_array=False):
        nonlocal pos
        if t == 8:
            string("array_string_len" if in_array else "string_len")
        elif t == 9:
            add("array_type", pos, 4)
            it, n = struct.unpack_from("<IQ", data, pos)
            add("scalar_array_len" if it in GGUF_SCALAR else "array_len", pos + 4, 8)
            pos += 12
            if it in GGUF_SCALAR:
                pos += n * GGUF_SCALAR[it]
            else:
                for _ in range(n):
                    value(it, True)
        else:
            pos += GGUF_SCALAR[t]

    alignment = 32
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8: pos + 8 + klen].decode()
        string("key_len")
        add("value_type", pos, 4)
        (t,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if key == "general.alignment":
            alignment = struct.unpack_from("<I", data, pos)[0]
        if t in (6, 12):        # float32 / float64 values (rms eps, rope base …)
            add("float_value", pos, GGUF_SCALAR[t])
        elif t in GGUF_SCALAR:  # integer values: the architecture's (block count, widths, heads), the others
            add("arch_value" if key.split(".")[0] not in ("general", "tokenizer", "imatrix") else "int_value",
                pos, GGUF_SCALAR[t])
        value(t)
    infos = []
    for _ in range(n_tensors):
        string("tensor_name_len")
        add("n_dims", pos, 4)
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        dims = struct.unpack_from(f"<{nd}Q", data, pos)
        for i in range(nd):
            add("dim", pos + 8 * i, 8)
        pos += 8 * nd
        add("tensor_type", pos, 4)
        add("tensor_offset", pos + 4, 8)
        ttype, toff = struct.unpack_from("<IQ", data, pos)
        pos += 12
        infos.append((ttype, toff, math.prod(dims)))
    start = pos + (-pos) % alignment
    itemsize = {0: 4, 1: 2}
    floats = [(start + off, n * itemsize[t], itemsize[t]) for t, off, n in infos if t in itemsize and n]
    return fields, floats, pos


def dat_layout(data: bytes):
    """Integer fields of a legacy imatrix .dat: entry count, per entry name length / ncall / nval, the trailer."""
    fields: dict[str, list[tuple[int, int]]] = {"n_entries": [(0, 4)]}
    floats = []
    (n,) = struct.unpack_from("<i", data, 0)
    pos = 4
    for _ in range(n):
        (ln,) = struct.unpack_from("<i", data, pos)
        fields.setdefault("name_len", []).append((pos, 4))
        pos += 4 + ln
        fields.setdefault("ncall", []).append((pos, 4))
        fields.setdefault("nval", []).append((pos + 4, 4))
        _, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        floats.append((pos, 4 * nval, 4))
        pos += 4 * nval
    fields["chunk_count"] = [(pos, 4)]
    fields["dataset_len"] = [(pos + 4, 4)]
    return fields, floats


def safetensors_layout(data: bytes):
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8: 8 + n])
    item = {"F32": 4, "F16": 2}
    floats = [(8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0], item[v["dtype"]])
              for k, v in header.items() if k != "__metadata__" and v["dtype"] in item]
    return {"header_len": [(0, 8)]}, floats, 8 + n, header


# --- JSON / YAML values and text mutations ----------------------------------------------------------------------
SCALARS = st.one_of(st.none(), st.booleans(), st.sampled_from(EXTREME + [-1, -(2**63), 10**30]),
                    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12),
                    st.sampled_from(["", "0", "1e999", "nan", "Q4_K", "F16", "=", "a=b", "(", "rh", "a\nb"]))
VALUES = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8), c, max_size=4)),
                      max_leaves=6)
TEXT_SNIPPETS = ["[" * 50_000, "{\"a\":" * 20_000, "9" * 6000, "1e999", "-1e999", "NaN", "Infinity", "\x00",
                 "\ud800", "\xff\xfe", "&a [*a]", "*undefined", "!!python/object/apply:os.system ['exit 1']",
                 "!!python/name:os.system", "!!binary AAAA", "? [1, 2]\n: x", "---\n---\n", "%YAML 9.9\n---\n"]


@st.composite
def text_mutation(draw, size: int):
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "snippet"]))
    at = draw(st.integers(0, size))
    if kind == "truncate":
        return ("truncate", at)
    if kind == "flip":
        return ("flip", min(at, max(size - 1, 0)), draw(st.integers(0, 7)))
    if kind == "insert":
        return ("bytes_insert", at, draw(st.binary(min_size=1, max_size=12)))
    if kind == "delete":
        return ("delete", at, draw(st.integers(1, 40)))
    return ("bytes_insert", at, draw(st.sampled_from(TEXT_SNIPPETS)).encode("utf-8", "surrogatepass"))


def apply_text(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        if m[0] == "bytes_insert":
            b[m[1]: m[1]] = m[2]
        elif m[0] == "delete":
            del b[m[1]: m[1] + m[2]]
        else:
            b = bytearray(apply_bytes(bytes(b), [m]))
    return bytes(b)


def json_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += json_paths(v, prefix + (i,))
    return out


def edit(obj, path, value, delete=False):
    """A deep copy of `obj` with the node at `path` replaced by `value` (or removed)."""
    obj = json.loads(json.dumps(obj))
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


@st.composite
def structured_edits(draw, doc, max_edits=3):
    """1-3 edits of a JSON-like document: a node replaced by an arbitrary value, deleted, or a new key added."""
    for _ in range(draw(st.integers(1, max_edits))):
        paths = json_paths(doc)
        path = draw(st.sampled_from(paths))
        kind = draw(st.sampled_from(["set", "set", "delete", "add"]))
        if kind == "delete" and path:
            doc = edit(doc, path, None, delete=True)
        elif kind == "add":
            parent = draw(st.sampled_from([p for p in paths if _at(doc, p).__class__ is dict] or [()]))
            if isinstance(_at(doc, parent), dict):
                doc = edit(doc, parent + (draw(st.text(max_size=10)),), draw(VALUES))
        else:
            doc = edit(doc, path, draw(VALUES))
    return doc


def _at(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def dumps(doc) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


# --- the valid inputs -------------------------------------------------------------------------------------------
QUANTIZED = {"attn_q": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q5_1", "attn_output": "Q4_1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from twinquant.io.gguf_write import write_gguf
    from twinquant.io.hf import load_hf_dir

    d = tmp_path_factory.mktemp("fuzz")
    hf = save_tiny("llama", d / "hf", tokenizer=True, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                   num_attention_heads=2, num_key_value_heads=1, vocab=288)
    (hf / "generation_config.json").unlink(missing_ok=True)
    model = load_hf_dir(hf).materialize()
    for name in model.tensor_names():       # a few block-quantized tensors, so the fuzz reaches the dequantizers
        base = name.split(".")[2] if name.startswith("blk.") else ""
        if base in QUANTIZED and name.endswith(".weight"):
            t = gguf.GGMLQuantizationType[QUANTIZED[base]]
            packed = gguf.quants.quantize(model.get(name).numpy(), t)
            model.set_quantized(name, torch.from_numpy(gguf.quants.dequantize(packed, t).copy()),
                                QuantizedWeight(t, packed))
    gguf_path = write_gguf(model, d / "model.gguf", "F16")

    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "output.weight"]
    im = Imatrix({n: (rng.random(32 if "down" not in n else 64) * 10).astype(np.float32) for n in names},
                 {n: np.array([1024], dtype=np.int64) for n in names}, ["calib.txt"], 2, 512)
    im.sums["blk.0.ffn_gate_exps.weight"] = (rng.random((2, 32)) * 5).astype(np.float32)      # stacked experts
    im.counts["blk.0.ffn_gate_exps.weight"] = np.array([512, 0], dtype=np.int64)
    im.write_gguf(d / "imatrix.gguf")
    im.write_dat(d / "imatrix.dat")

    recipe = Recipe("mine", method="rtn", mix=None, format="Q4_K", tensor_type=["ffn_down=Q6_K", "attn_v=Q5_K"],
                    rotation="rh", output_tensor_type="Q8_0", calib_tokens=4096)
    (d / "recipe.yaml").write_text(recipe.to_yaml())

    def cands(types):
        return {t: {"bytes": 100 * (i + 1), "out_error": 0.5 / (i + 1), "fisher": 0.1, "kld": 0.01 / (i + 1),
                    "cost": 0.01 / (i + 1)} for i, t in enumerate(types)}
    meas = Measurement({"model": "tiny", "method": "gptq", "cost": "anchor", "candidates": "k"}, 123456, 789,
                       {"blk.0.attn_q.weight": {"shape": [32, 32], "anchor": "Q4_0",
                                                "candidates": cands(["Q4_0", "Q5_0", "Q8_0"])},
                        "blk.0.ffn_down.weight": {"shape": [32, 256], "anchor": "Q2_K",
                                                  "candidates": cands(["Q2_K", "Q4_K", "Q6_K"])}},
                       12.5, True)
    meas.save(d / "measurement.json")
    return {"dir": d, "hf": hf, "gguf": gguf_path, "imatrix_gguf": d / "imatrix.gguf", "imatrix_dat": d / "imatrix.dat",
            "recipe": d / "recipe.yaml", "measurement": d / "measurement.json", "model": model}


_counter = itertools.count()


def fresh(d: Path, name: str) -> Path:
    """A new path for each case (never rewrite a file an earlier case may still have memory-mapped)."""
    p = d / "cases" / f"{next(_counter)}-{name}"
    p.parent.mkdir(exist_ok=True)
    return p


def field_sweep(fields: dict[str, list[tuple[int, int]]], skip=("array_string_len",)):
    """Every integer field of a file (but the kinds in `skip`) x extreme values: the systematic complement of the
    random search, so that a count the random cases rarely draw (block_count = 2^31) is tried on every run."""
    values = {1: (0, 255), 2: (0, 65535), 4: (0, 2**31, 2**32 - 1), 8: (0, 2**60, 2**64 - 1)}
    return [("field", off, width, v) for kind in sorted(fields) if kind not in skip
            for off, width in fields[kind] for v in values[width]]


# --- checks of a successful result ------------------------------------------------------------------------------
def check_model(model):
    for n in model.tensor_names():
        t = model.get(n)
        assert tuple(t.shape) == roles.expected_shape(model.spec, n)
        assert torch.isfinite(t).all()


def load_and_touch(path, **kw):
    def call():
        keep = kw.pop("keep_quantized", False)
        model = load_gguf(path, keep_quantized=True, **kw) if keep else load_model(path, **kw)
        for n in model.tensor_names():
            model.tensor_info(n)
        return model.materialize()
    model = outcome(call, path)
    if model is not None:
        check_model(model)
    return model


# --- 0. the valid inputs load -----------------------------------------------------------------------------------
def test_valid_inputs_load(inputs):
    ref = inputs["model"]
    check_model(load_model(inputs["hf"]).materialize())
    m = load_model(inputs["gguf"]).materialize()        # the quantized tensors exactly, the rest as F16
    check_model(m)
    for n in m.tensor_names():
        err = float((m.get(n) - ref.get(n)).abs().max())
        assert err <= 1e-3 * float(ref.get(n).abs().max()), (n, err)
    assert load_gguf(inputs["gguf"], keep_quantized=True).quantized
    for p in (inputs["imatrix_gguf"], inputs["imatrix_dat"]):
        assert len(Imatrix.read(p)) >= 3
    assert load_recipe(str(inputs["recipe"])).format == "Q4_K"
    assert Measurement.load(inputs["measurement"]).complete


# --- 1. GGUF model ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_case(inputs):
    data = inputs["gguf"].read_bytes()
    fields, floats, header_end = gguf_layout(data)
    return data, fields, floats, header_end


def test_fuzz_gguf_model(inputs, gguf_case):
    data, fields, floats, header_end = gguf_case

    @fuzz_settings(300)
    @given(muts=byte_mutations(len(data), fields, floats, header_end), tok=st.booleans(), keep=st.booleans())
    def run(muts, tok, keep):
        p = fresh(inputs["dir"], "m.gguf")
        p.write_bytes(apply_bytes(data, muts))
        load_and_touch(p, load_tokenizer=tok, keep_quantized=keep)
        p.unlink()

    run()


def test_gguf_every_field_extreme(inputs, gguf_case):
    data, fields, _, _ = gguf_case
    # string lengths are left to the random search (hundreds of them in the tokenizer, drawn there all the time)
    for i, m in enumerate(field_sweep(fields, skip=("array_string_len", "key_len", "string_len", "tensor_name_len"))):
        p = fresh(inputs["dir"], "sweep.gguf")
        p.write_bytes(apply_bytes(data, [m]))
        load_and_touch(p, load_tokenizer=i % 2 == 0)
        p.unlink()


def nonfinite_edit(draw, floats):
    """An edit writing NaN / +Inf / -Inf over one weight of one float tensor ((start, nbytes, itemsize) in floats)."""
    start, nbytes, itemsize = draw.draw(st.sampled_from(floats))
    pat = draw.draw(st.sampled_from((F16_SPECIAL if itemsize == 2 else F32_SPECIAL)[:3]))
    i = draw.draw(st.integers(0, nbytes // itemsize - 1))
    return ("float", start + i * itemsize, pat)


def test_gguf_nan_weights_are_refused(inputs, gguf_case):
    data, _, floats, _ = gguf_case

    @fuzz_settings(40)
    @given(st.data())
    def run(draw):
        p = fresh(inputs["dir"], "nan.gguf")
        p.write_bytes(apply_bytes(data, [nonfinite_edit(draw, floats)]))
        assert load_and_touch(p, load_tokenizer=False) is None, "a NaN / Inf weight was accepted"

    run()


# --- 2. HF directory: config.json, safetensors header and data, the shard index ---------------------------------
@pytest.fixture(scope="module")
def hf_case(inputs):
    hf = inputs["hf"]
    st_bytes = (hf / "model.safetensors").read_bytes()
    fields, floats, header_end, header = safetensors_layout(st_bytes)
    return {"config": json.loads((hf / "config.json").read_text()), "st": st_bytes, "fields": fields,
            "floats": floats, "header_end": header_end, "header": header,
            "others": [p for p in hf.iterdir() if p.name not in ("config.json", "model.safetensors")]}


def write_hf(inputs, case, config: bytes, st_bytes: bytes, index: bytes | None = None) -> Path:
    d = fresh(inputs["dir"], "hf")
    d.mkdir()
    for p in case["others"]:
        shutil.copy(p, d / p.name)
    (d / "config.json").write_bytes(config)
    (d / "model.safetensors").write_bytes(st_bytes)
    if index is not None:
        (d / "model.safetensors.index.json").write_bytes(index)
    return d


def rebuild_safetensors(header: dict, body: bytes) -> bytes:
    h = json.dumps(header, allow_nan=True).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + body


def test_fuzz_hf_config(inputs, hf_case):
    cfg = hf_case["config"]
    raw = json.dumps(cfg, indent=2).encode()

    numeric = sorted(k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    numeric_edit = st.tuples(st.sampled_from(numeric), st.one_of(
        st.sampled_from(EXTREME + [-1, -(2**63)]), st.integers(-16, 16),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1e-6, 1.5, 1e308]))).map(
        lambda kv: dumps(edit(cfg, (kv[0],), kv[1])))

    @fuzz_settings(300)
    @given(st.one_of(structured_edits(cfg).map(dumps), numeric_edit,
                     st.lists(text_mutation(len(raw)), min_size=1, max_size=3).map(lambda m: apply_text(raw, m))))
    def run(config):
        load_and_touch(write_hf(inputs, hf_case, config, hf_case["st"]), load_tokenizer=False)

    run()


def test_hf_config_every_number_extreme(inputs, hf_case):
    cfg = hf_case["config"]
    for key in sorted(k for k, v in cfg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)):
        for v in (0, -1, 2**31, 2**60, math.nan, 1e308):
            load_and_touch(write_hf(inputs, hf_case, dumps(edit(cfg, (key,), v)), hf_case["st"]),
                           load_tokenizer=False)


def test_fuzz_hf_safetensors(inputs, hf_case):
    data, header, header_end = hf_case["st"], hf_case["header"], hf_case["header_end"]
    body = data[header_end:]
    cfg = dumps(hf_case["config"])

    @st.composite
    def header_edit(draw):
        h = json.loads(json.dumps(header))
        for _ in range(draw(st.integers(1, 2))):
            live = sorted(k for k in h if k != "__metadata__" and isinstance(h[k], dict))
            if not live:
                break
            name = draw(st.sampled_from(live))
            what = draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop", "value"]))
            if what == "dtype":
                h[name]["dtype"] = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I8", "U8",
                                                         "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XX"]))
            elif what == "shape":
                h[name]["shape"] = draw(st.lists(st.one_of(st.sampled_from(EXTREME), st.integers(0, 600)),
                                                 max_size=4))
            elif what == "data_offsets":
                h[name]["data_offsets"] = draw(st.lists(st.one_of(st.sampled_from(EXTREME),
                                                                  st.integers(0, len(body) + 8)),
                                                        min_size=2, max_size=2))
            elif what == "rename":
                h[draw(st.sampled_from(["model.layers.7.mlp.up_proj.weight", "lm_head.bias", "x", "",
                                        "model.layers.0.self_attn.rotary_emb.inv_freq"]))] = h.pop(name)
            elif what == "drop":
                h.pop(name)
            else:
                h[name] = draw(VALUES)
        return rebuild_safetensors(h, body)

    @fuzz_settings(300)
    @given(st.one_of(byte_mutations(len(data), hf_case["fields"], hf_case["floats"], header_end).map(
        lambda m: apply_bytes(data, m)), header_edit()))
    def run(st_bytes):
        load_and_touch(write_hf(inputs, hf_case, cfg, st_bytes), load_tokenizer=False)

    run()


def test_fuzz_hf_index(inputs, hf_case):
    weight_map = {k: "model.safetensors" for k in hf_case["header"] if k != "__metadata__"}
    doc = {"metadata": {"total_size": len(hf_case["st"])}, "weight_map": weight_map}
    cfg = dumps(hf_case["config"])

    @fuzz_settings(120)
    @given(structured_edits(doc, max_edits=2).map(dumps))
    def run(index):
        load_and_touch(write_hf(inputs, hf_case, cfg, hf_case["st"], index), load_tokenizer=False)

    run()


def test_hf_nan_weights_are_refused(inputs, hf_case):
    data, floats = hf_case["st"], hf_case["floats"]
    cfg = dumps(hf_case["config"])

    @fuzz_settings(30)
    @given(st.data())
    def run(draw):
        d = write_hf(inputs, hf_case, cfg, apply_bytes(data, [nonfinite_edit(draw, floats)]))
        assert load_and_touch(d, load_tokenizer=False) is None, "a NaN / Inf weight was accepted"

    run()


# --- 3. imatrix: GGUF and legacy .dat ---------------------------------------------------------------------------
def check_imatrix(im: Imatrix):
    assert len(im) >= 1
    for name in im.names:
        s, c = im.sums[name], im.counts[name]
        assert c.ndim == 1 and c.size >= 1 and s.size % c.size == 0 and (c >= 0).all()
        assert np.isfinite(s).all()
        assert np.isfinite(im.importance(name)).all()
    assert im.chunk_count >= 0 and im.chunk_size >= 0
    assert all(isinstance(d, str) for d in im.datasets)


def read_imatrix_checked(p: Path, chunk_size):
    im = outcome(lambda: Imatrix.read(p, chunk_size=chunk_size), p)
    if im is not None:
        check_imatrix(im)
        out = p.with_name(p.name + ".again.gguf")     # what was read can be written again (or refused clearly)
        if outcome(lambda: im.write_gguf(out)) is None:
            return
        again = outcome(lambda: Imatrix.read(out))
        assert again is not None and again.names == im.names
        out.unlink()


@pytest.mark.parametrize("kind", ["gguf", "dat"])
def test_fuzz_imatrix(inputs, kind):
    data = inputs[f"imatrix_{kind}"].read_bytes()
    if kind == "gguf":
        fields, floats, header_end = gguf_layout(data)
    else:
        (fields, floats), header_end = dat_layout(data), len(data)

    @fuzz_settings(400)
    @given(muts=byte_mutations(len(data), fields, floats, header_end),
           chunk_size=st.sampled_from([None, 512, 1, 0, -3]))
    def run(muts, chunk_size):
        p = fresh(inputs["dir"], f"imatrix.{kind}")
        p.write_bytes(apply_bytes(data, muts))
        read_imatrix_checked(p, chunk_size)
        p.unlink()

    run()


@pytest.mark.parametrize("kind", ["gguf", "dat"])
def test_imatrix_every_field_extreme(inputs, kind):
    data = inputs[f"imatrix_{kind}"].read_bytes()
    fields = gguf_layout(data)[0] if kind == "gguf" else dat_layout(data)[0]
    for i, m in enumerate(field_sweep(fields, skip=())):
        p = fresh(inputs["dir"], f"sweep.{kind}")
        p.write_bytes(apply_bytes(data, [m]))
        read_imatrix_checked(p, (None, 512)[i % 2])
        p.unlink()


# --- 4. recipe YAML ---------------------------------------------------------------------------------------------
def test_fuzz_recipe_yaml(inputs, tmp_path):
    raw = inputs["recipe"].read_bytes()
    doc = yaml.safe_load(raw)
    canary = tmp_path / "executed"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

    def yaml_text(d) -> bytes:
        try:
            return yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass")
        except (yaml.YAMLError, UnicodeEncodeError):
            return raw

    @fuzz_settings(400)
    @given(st.one_of(
        structured_edits(doc).map(yaml_text),
        st.lists(text_mutation(len(raw)), min_size=1, max_size=3).map(lambda m: apply_text(raw, m)),
        st.sampled_from(["method", "tensor_type", "calib_tokens", "seed", "pure", "rotation"]).map(
            lambda k: raw + f"\n{k}: !!python/object/apply:os.system ['touch {canary}']\n".encode()),
        st.sampled_from(["tensor_type", "calib", "seed"]).map(
            lambda k: (bomb + f"{k}: *i\n").encode() + b"\n".join(
                line for line in raw.splitlines() if not line.startswith(k.encode())))))
    def run(text):
        p = fresh(inputs["dir"], "recipe.yaml")
        p.write_bytes(text)
        r = outcome(lambda: load_recipe(str(p)), p)
        if r is not None:       # a valid recipe: its fields have their types, and it round-trips through YAML
            r.validate()
            q = fresh(inputs["dir"], "again.yaml")
            q.write_text(r.to_yaml())
            assert load_recipe(str(q)) == r
        assert not canary.exists(), "a YAML tag executed code"

    run()


# --- 5. measurement JSON ----------------------------------------------------------------------------------------
def test_fuzz_measurement_json(inputs):
    raw = inputs["measurement"].read_bytes()
    doc = json.loads(raw)

    @fuzz_settings(400)
    @given(st.one_of(structured_edits(doc).map(dumps),
                     st.lists(text_mutation(len(raw)), min_size=1, max_size=3).map(lambda m: apply_text(raw, m))))
    def run(text):
        p = fresh(inputs["dir"], "measurement.json")
        p.write_bytes(text)
        m = outcome(lambda: Measurement.load(p), p)
        if m is None:
            return
        m.sha256()
        groups = outcome(m.groups)
        for g in groups or []:
            assert g.candidates
            for c in g.candidates:
                assert isinstance(c.bytes, int) and c.bytes >= 0 and math.isfinite(c.cost)
        assert m.n_params > 0 and m.fixed_bytes >= 0
        q = fresh(inputs["dir"], "again.json")
        m.save(q)
        assert Measurement.load(q).to_dict() == m.to_dict()

    run()
