"""Frozen copy of the numpy GGML codecs as they were before the torch rewrite (twinquant commit 70105fb,
twinquant/formats/ggml/{_num,_base,kquants,legacy}.py (then twinquant/quant/ggml/), imports made relative): the "old" side of
benchmarks/codec_speed.py. Not used by the package; do not edit."""

from ._base import GGMLCodec
from .kquants import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

CODECS = {c.name: c for c in (Q8_0(), Q4_0(), Q5_0(), Q4_1(), Q5_1(), Q2_K(), Q3_K(), Q4_K(), Q5_K(), Q6_K())}

__all__ = ["CODECS", "GGMLCodec"]
