"""llama.cpp tensor types that the installed gguf-py does not know yet, registered into gguf-py's own tables.

Every codec, reader and writer here is keyed by `gguf.GGMLQuantizationType`, and gguf-py's reader sizes a tensor
by `GGML_QUANT_SIZES`. PyPI's gguf 0.19.0 (the newest release) lacks Q2_0 (type 42, file type 41), which the
llama.cpp that twinquant is tested against (llama-cpp-python 0.3.36) reads, writes and runs. `register()` adds the
missing members to gguf-py's enums and size table with llama.cpp's numbers (ggml.h, ggml-common.h, llama.h), so the
rest of the package, and gguf-py's GGUFReader / GGUFWriter, treat them as any other type. A gguf-py that has them
already is left alone; one that gives another type the same number is refused (it would mean another llama.cpp).

`twinquant/__init__.py` calls it, so importing any part of the package registers the types first.
"""

from __future__ import annotations

# name: (ggml type id, weights a block, bytes a block, llama file type id) — from the vendored llama.cpp
MISSING = {"Q2_0": (42, 64, 2 + 64 // 4, 41)}


def _add_member(enum_cls, name: str, value: int) -> None:
    """Add `name = value` to an IntEnum after its creation (Python has no public way; these are the tables the
    enum's own lookups read: by name, by value, and the iteration order)."""
    have = enum_cls._value2member_map_.get(value)
    if have is not None:
        if have.name != name:
            raise RuntimeError(f"gguf-py's {enum_cls.__name__} gives {value} to {have.name}, not {name}: "
                               "a llama.cpp this twinquant does not know")
        return
    member = int.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    member.__init__(value)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)


def register() -> None:
    import gguf

    for name, (ggml_id, block, size, ftype_id) in MISSING.items():
        if name in gguf.GGMLQuantizationType.__members__:
            continue
        _add_member(gguf.GGMLQuantizationType, name, ggml_id)
        _add_member(gguf.LlamaFileType, f"MOSTLY_{name}", ftype_id)
        gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] = (block, size)
