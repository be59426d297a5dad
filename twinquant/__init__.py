"""twinquant: rotate, quantize and duplicate layers of open LLMs down to ~2 bits per weight, exported as GGUF."""

__version__ = "0.1.0"

from twinquant import gguf_types as _gguf_types  # noqa: E402

_gguf_types.register()        # llama.cpp types gguf-py lacks (Q2_0), before any module reads gguf-py's tables

_API = {"quantize": "twinquant.pipeline", "measure": "twinquant.pipeline", "Options": "twinquant.pipeline",
        "QuantizeResult": "twinquant.pipeline", "Recipe": "twinquant.pipeline.recipe",
        "sensitivity": "twinquant.pipeline.sensitivity", "SensitivityOptions": "twinquant.pipeline.sensitivity"}


def __getattr__(name: str):
    """The library API (`twinquant.quantize(source, out, recipe, options)` …), imported on first use so that
    `import twinquant` stays light."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'twinquant' has no attribute {name!r}")
