"""The pipeline: recipe → plan → prepare → (measure → allocate) → block executor → GGUF, streamed and resumable.

    from twinquant.pipeline import quantize, measure, Options
    res = quantize("smollm2-135m", "out.gguf", "default", Options(report="r.json"))
"""

from twinquant.pipeline.run import Options, QuantizeResult, measure, quantize

__all__ = ["Options", "QuantizeResult", "measure", "quantize"]
