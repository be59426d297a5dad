"""Orthogonal transforms as math, apart from any model: Hadamard matrices and the fast transform (`hadamard`),
the online transforms a forward applies at run time (`online`). `twinquant.rotation` fuses them into models."""
