"""Quantization recipes: everything `twinquant quantize` decides, as one record (YAML on disk, JSON in GGUF).

A recipe names the rounding method, the type mix (or one format) with per-tensor overrides, the rotation, padding
and the calibration. `twinquant quantize --recipe NAME|FILE.yaml` starts from it and any option given on the
command line overrides the field of the same name. The resolved recipe goes into the file's `twinquant.quant`
metadata (with the calibration text's hash and token count) and into the `--report` JSON, so a file says how it
was made and the recipe can be replayed.

Built-in recipes (`BUILTIN`) are named for what they do; `default` is the best one measured by
benchmarks/quality.py (see the README's quality table).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from twinquant.errors import TwinquantError

METHODS = ("gptq", "rtn", "hqq")
ROTATIONS = ("none", "rh", "ro", "auto")
# field -> (type, may be None); tensor_type is a list of str
_KINDS = {"name": (str, False), "method": (str, False), "mix": (str, True), "format": (str, True),
          "tensor_type": (list, False), "output_tensor_type": (str, True), "token_embedding_type": (str, True),
          "pure": (bool, False), "rotation": (str, False), "seed": (int, False), "pad": (bool, False),
          "pad_multiple": (int, False), "act_order": (bool, False), "damp": (float, False), "calib": (str, True),
          "calib_tokens": (int, True), "calib_ctx": (int, False)}


@dataclass
class Recipe:
    name: str = "custom"
    method: str = "gptq"
    mix: str | None = "llama.cpp:Q2_K"        # a preset mix, or None with `format`
    format: str | None = None                  # one type for every 2-D tensor (with llama.cpp's fallbacks)
    tensor_type: list[str] = field(default_factory=list)    # REGEX=TYPE overrides, in order
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    # R1+R2 before quantizing; `auto` = rh where it costs no size (untied head), none for tied embeddings, where
    # fusing the final norm would untie the head and add a second vocab x hidden matrix to the file
    rotation: str = "none"
    seed: int = 0
    pad: bool = False
    pad_multiple: int = 256
    act_order: bool = False
    # GPTQ's λ = damp·mean(diag H). 0.5, not the paper's 0.01: on Qwen2.5-Coder-1.5B the 0.01 fit does not carry
    # to text it was not fitted on (block 6, IQ2_XS, 16384 tokens: held-out error 1.18x llama.cpp's for ffn_down,
    # 0.83x with 0.5; attn_q, ffn_gate and Q2_K alike: benchmarks/results/iquant_gptq_qwen15-damping-16k.md)
    damp: float = 0.5
    calib: str | None = None                   # None: ../shared/data/calibration/groups_merged.txt
    calib_tokens: int | None = None            # None: grows with the widest input (calibration.windows.auto_tokens)
    calib_ctx: int = 512

    def __post_init__(self) -> None:
        for f, (kind, _) in _KINDS.items():      # YAML's `damp: 1` is an int: normalised once, here
            v = getattr(self, f)
            if kind is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, f, float(v))
        self.validate()

    def validate(self) -> None:
        """Raise a TwinquantError naming the first bad field; changes nothing."""
        for f, (kind, optional) in _KINDS.items():   # YAML gives any type: check them before comparing values
            v = getattr(self, f)
            ok = (v is None and optional) or (isinstance(v, kind) and not (kind is int and isinstance(v, bool)))
            if f == "tensor_type":
                ok = ok and all(isinstance(r, str) for r in v)
            if not ok:
                raise TwinquantError(f"recipe {str(self.name)[:40]!r}: {f} is {type(v).__name__} {str(v)[:40]!r}, "
                                     f"expected {'a list of str' if kind is list else kind.__name__}"
                                     + (" or null" if optional else ""))
        if not -(2 ** 63) <= self.seed < 2 ** 63:      # torch generators take a 64-bit seed
            raise TwinquantError(f"recipe {self.name!r}: seed {self.seed} is not a 64-bit integer")
        if self.method not in METHODS:
            raise TwinquantError(f"recipe {self.name!r}: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.rotation not in ROTATIONS:
            raise TwinquantError(f"recipe {self.name!r}: rotation {self.rotation!r} is not one of "
                                 f"{', '.join(ROTATIONS)}")
        if not self.mix and not self.format:
            raise TwinquantError(f"recipe {self.name!r}: give a mix (e.g. llama.cpp:Q2_K) or a format (e.g. Q4_K)")
        if self.mix and self.format:
            raise TwinquantError(f"recipe {self.name!r}: give either a mix or a format, not both")
        if not 0 <= self.damp < float("inf"):
            raise TwinquantError(f"recipe {self.name!r}: damp {self.damp} must be finite and >= 0")
        if (self.calib_tokens is not None and self.calib_tokens < 1) or self.calib_ctx < 2 or self.pad_multiple < 1:
            raise TwinquantError(f"recipe {self.name!r}: calib_tokens, calib_ctx and pad_multiple must be positive")
        for rule in self.tensor_type:
            if "=" not in rule:
                raise TwinquantError(f"recipe {self.name!r}: tensor_type rule {rule!r} is not REGEX=TYPE")

    def resolved_rotation(self, tied_embeddings: bool, moe: bool = False) -> str:
        """`auto`: rh, unless the embeddings are tied or the model routes to experts (no rotation through them yet)."""
        if self.rotation == "auto":
            return "none" if tied_embeddings or moe else "rh"
        return self.rotation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, name: str | None = None) -> "Recipe":
        if not isinstance(d, dict):
            raise TwinquantError("a recipe is a mapping of field: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k if isinstance(k, str) and k.isprintable() else repr(k)[:40] for k in set(d) - known)
        if unknown:
            raise TwinquantError(f"recipe: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if name and "name" not in d:
            d["name"] = name
        if isinstance(d.get("tensor_type"), str):
            d["tensor_type"] = [d["tensor_type"]]
        return cls(**d)

    def replace(self, **changes) -> "Recipe":
        """A copy with the given fields changed (None values are ignored: 'not given on the command line')."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


BUILTIN: dict[str, Recipe] = {
    "q2k-rtn": Recipe("q2k-rtn", method="rtn"),
    "q2k-gptq": Recipe("q2k-gptq", method="gptq"),
    "q2k-gptq-rh": Recipe("q2k-gptq-rh", method="gptq", rotation="rh"),
    "q2k-gptq-auto": Recipe("q2k-gptq-auto", method="gptq", rotation="auto"),
    # llama.cpp Q2_K's bytes spent by measured role rules (allocation/role_mix.py), no rotation: on
    # Qwen2.5-Coder-1.5B the RH rotation cost what GPTQ gained (benchmarks/results/quality_qwen15-default*.json)
    "q2k-roles": Recipe("q2k-roles", method="gptq", mix="twinquant:Q2_K", rotation="none"),
}
BUILTIN["default"] = dataclasses.replace(BUILTIN["q2k-roles"], name="default")


def _nesting(text: str) -> int:
    """An upper bound of the YAML nesting: the deepest run of [ / { (quoted or not), or a line's indentation."""
    indent = max((len(line) - len(line.lstrip(" -?:")) for line in text.splitlines()), default=0) // 2
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return max(deepest, indent)


def load_recipe(spec: str | None) -> Recipe:
    """A built-in recipe by name, or a YAML file; None gives `default`."""
    if spec is None:
        return BUILTIN["default"]
    if spec in BUILTIN:
        return BUILTIN[spec]
    p = Path(spec)
    if not p.is_file():
        raise TwinquantError(f"{spec}: no such recipe file or built-in recipe ({', '.join(BUILTIN)})")
    import yaml

    try:
        text = p.read_text(encoding="utf-8")
        if _nesting(text) > 32:     # a recipe is flat; PyYAML recurses per level (seconds to a RecursionError)
            raise ValueError("nested too deeply")
        d = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, an int of 5000 digits
        raise TwinquantError(f"{p}: not a valid YAML recipe ({(str(e).splitlines() or [type(e).__name__])[0]})") \
            from None
    return Recipe.from_dict(d if d is not None else {}, name=p.stem)
