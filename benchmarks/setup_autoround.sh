#!/usr/bin/env bash
# A separate venv for the peer quantizer AutoRound (Intel's SignRound, `pip install auto-round`), used by
# benchmarks/autoround_gguf.py and the autoround rows of benchmarks/quality.py. Kept apart from the project venv:
# auto-round drags in datasets/pyarrow/pandas and its own pins, none of which twinquant needs.
#
#     bash benchmarks/setup_autoround.sh        # idempotent; the last line printed is the venv's python
#
# The venv lives at ${TQ_AUTOROUND_VENV:-$HOME/.cache/twinquant/autoround-venv}. torch is the CPU build, always
# installed with -c constraints.txt (torch==2.13.0): without it pip resolves the CUDA wheels (gigabytes).
# Everything the run needs is pinned below. `sentencepiece` is not declared by auto-round, but its GGUF export
# imports it (llama.cpp's LlamaModel.set_vocab does, even for BPE tokenizers). `gguf` is not declared either, and
# PyPI's gguf 0.19.0 is too old for the llama.cpp converter that auto-round 0.16.1 bundles (its conversion/qwen.py
# needs gguf.MODEL_ARCH.DFLASH, so Qwen2 "is not supported"): gguf-py is installed from the llama.cpp vendored in the
# llama-cpp-python==0.3.36 sdist -- the llama.cpp that benchmarks/build_llamacpp.sh builds and the tests use --
# reusing that script's cached sdist when present (else `pip download`s it).
# All of pip's output goes to stderr, so a caller can read the python path from stdout.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONSTRAINTS="${TQ_CONSTRAINTS:-$HERE/../constraints.txt}"
VENV="${TQ_AUTOROUND_VENV:-$HOME/.cache/twinquant/autoround-venv}"
PY="$VENV/bin/python"

PINS=(
    torch==2.13.0
    auto-round==0.16.1
    transformers==5.24.0
    tokenizers==0.23.3
    accelerate==1.15.0
    datasets==5.2.0
    safetensors==0.8.0
    numpy==2.4.6
    sentencepiece==0.2.3
)

if [ ! -f "$CONSTRAINTS" ] || ! grep -qx 'torch==2.13.0' "$CONSTRAINTS"; then
    echo "setup_autoround: $CONSTRAINTS must pin torch==2.13.0 (else pip pulls the CUDA wheels)" >&2
    exit 1
fi

LLAMACPP_PY_VERSION=0.3.36      # the llama-cpp-python sdist whose vendored llama.cpp/gguf-py is installed
LLAMACPP_CACHE="${TQ_LLAMACPP_CACHE:-$HOME/.cache/twinquant/llama.cpp-$LLAMACPP_PY_VERSION}"

STAMP="$VENV/.twinquant-autoround-installed"
WANT="$(printf '%s\n' "${PINS[@]}" "gguf-py from llama-cpp-python==$LLAMACPP_PY_VERSION")"
if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "$PY"
    exit 0
fi

if [ ! -x "$PY" ]; then
    echo "setup_autoround: creating $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" >&2
fi
echo "setup_autoround: installing ${PINS[*]}" >&2
"$PY" -m pip install -q -c "$CONSTRAINTS" "${PINS[@]}" 1>&2

SDIST="$LLAMACPP_CACHE/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    SDIST="$VENV/src/llama_cpp_python-$LLAMACPP_PY_VERSION.tar.gz"
    if [ ! -f "$SDIST" ]; then
        echo "setup_autoround: downloading the llama-cpp-python==$LLAMACPP_PY_VERSION sdist (for gguf-py)" >&2
        "$PY" -m pip download -q --no-binary :all: --no-deps -d "$VENV/src" \
            "llama-cpp-python==$LLAMACPP_PY_VERSION" 1>&2
    fi
fi
GGUFPY_TMP="$(mktemp -d)"
trap 'rm -rf "$GGUFPY_TMP"' EXIT
tar -xzf "$SDIST" -C "$GGUFPY_TMP" --strip-components=1 --wildcards '*/vendor/llama.cpp/gguf-py/*'
echo "setup_autoround: installing gguf-py from $(basename "$SDIST")" >&2
"$PY" -m pip install -q -c "$CONSTRAINTS" --no-deps --force-reinstall "$GGUFPY_TMP/vendor/llama.cpp/gguf-py" 1>&2
# A check that the pieces import (and that torch is the CPU build), before saying the venv is ready.
"$PY" - >&2 <<'EOF'
import torch, auto_round, transformers, gguf, sentencepiece  # noqa: F401
from auto_round import AutoRound  # noqa: F401
from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion
conv = get_conversion(hparams={"architectures": ["Qwen2ForCausalLM"]})   # imports conversion/qwen.py (gguf-py check)
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"torch {torch.__version__} is not the CPU build"
print(f"setup_autoround: torch {torch.__version__}, auto-round {auto_round.__version__}, "
      f"transformers {transformers.__version__}")
EOF
printf '%s\n' "$WANT" > "$STAMP"
echo "$PY"
