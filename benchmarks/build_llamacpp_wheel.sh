#!/usr/bin/env bash
# Build and install llama-cpp-python (stock llama.cpp as a library: the tests' oracle) from its sdist with this
# project's llama.cpp flags (llamacpp_flags.sh: native, AMX off). The wheel is cached under its own name in
# ~/.cache/twinquant/wheels-<flavour>/ -- pip's own wheel cache is keyed by the sdist alone and would hand back a
# wheel built with other flags.
#   usage: PYTHON=.venv/bin/python benchmarks/build_llamacpp_wheel.sh
set -euo pipefail
VERSION=0.3.36
source "$(dirname "$0")/llamacpp_flags.sh"
PYTHON=${PYTHON:-python3}
DIR=${TQ_WHEEL_CACHE:-$HOME/.cache/twinquant/wheels-$LLAMACPP_FLAVOUR}
WHEEL=$(ls "$DIR"/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -1 || true)
if [[ -z $WHEEL ]]; then
    echo "building llama-cpp-python==$VERSION (about ten minutes on two cores)" >&2
    mkdir -p "$DIR.tmp"
    CFLAGS="$LLAMACPP_CFLAGS" CXXFLAGS="$LLAMACPP_CFLAGS" \
        "$PYTHON" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$DIR.tmp" \
        "llama-cpp-python==$VERSION"
    mkdir -p "$DIR" && mv "$DIR.tmp"/llama_cpp_python-*.whl "$DIR/" && rm -rf "$DIR.tmp"
    WHEEL=$(ls "$DIR"/llama_cpp_python-$VERSION-*.whl | head -1)
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL"
