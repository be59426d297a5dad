"""Test-wide settings.

TWINQUANT_LIBGGML=0: the i-quant codecs run their own torch code in every test (and in the CLI subprocesses the
tests start), so the byte-identity tests compare twinquant's implementation with libggml, not libggml with itself.
tests/test_libggml_path.py turns the libggml CPU path on where it tests it.

TRITON_INTERPRET=1 without a GPU, before anything imports Triton: the Triton kernels' tests run them through
Triton's interpreter on the CPU (they also set TWINQUANT_TRITON_CPU=1; every other test keeps the torch paths).
"""

import os

os.environ["TWINQUANT_LIBGGML"] = "0"
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bindir() -> Path:
    """Stock llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built once by the
    install and found (or built) by benchmarks/build_llamacpp.sh."""
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run(["bash", str(root / "benchmarks" / "build_llamacpp.sh")], capture_output=True, text=True,
                       timeout=3600, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    return Path(p.stdout.strip().splitlines()[-1])
