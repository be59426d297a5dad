"""Test-wide settings.

TWINQUANT_LIBGGML=0: the i-quant codecs run their own torch code in every test (and in the CLI subprocesses the
tests start), so the byte-identity tests compare twinquant's implementation with libggml, not libggml with itself.
tests/test_libggml_path.py turns the libggml CPU path on where it tests it.
"""

import os

os.environ["TWINQUANT_LIBGGML"] = "0"
