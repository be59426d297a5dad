"""twinquant: rotate, quantize and duplicate layers of open LLMs down to ~2 bits per weight, exported as GGUF."""

__version__ = "0.1.0"
