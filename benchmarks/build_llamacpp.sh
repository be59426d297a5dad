#!/usr/bin/env bash
# Build stock llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) from the sources
# vendored in the llama-cpp-python source distribution -- the same llama.cpp the tests use as their oracle.
# The build is cached outside the repository; re-running is instant once the binaries exist.
#   usage: benchmarks/build_llamacpp.sh            -> prints the bin directory on its last line
#   env:   TQ_LLAMACPP_CACHE (default ~/.cache/twinquant/llama.cpp-<version>), PYTHON (default python3)
set -euo pipefail
VERSION=0.3.36
# Native build without AMX: on Sapphire Rapids machines ggml's AMX matmul segfaults here (the sandbox does not
# grant the AMX tile state), so every llama.cpp build of this project passes these flags (see llamacpp_flags.sh).
source "$(dirname "$0")/llamacpp_flags.sh"
CACHE=${TQ_LLAMACPP_CACHE:-$HOME/.cache/twinquant/llama.cpp-$VERSION-$LLAMACPP_FLAVOUR}
PYTHON=${PYTHON:-python3}
TOOLS=(llama-quantize llama-imatrix llama-perplexity)
BIN=$CACHE/bin

have_all() { for t in "${TOOLS[@]}"; do [[ -x $BIN/$t ]] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE"
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
if [[ ! -f $SDIST ]]; then
    echo "downloading llama-cpp-python==$VERSION source distribution" >&2
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$CACHE" "llama-cpp-python==$VERSION"
fi
SRC=$CACHE/src
if [[ ! -f $SRC/vendor/llama.cpp/CMakeLists.txt ]]; then
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
    rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi
BUILD=$CACHE/build
echo "building ${TOOLS[*]} (about ten minutes on two cores)" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$LLAMACPP_CFLAGS" -DCMAKE_CXX_FLAGS="$LLAMACPP_CFLAGS" >&2
cmake --build "$BUILD" -j "$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$BIN.tmp"
for t in "${TOOLS[@]}"; do cp "$BUILD/bin/$t" "$BIN.tmp/"; done
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
echo "$BIN"
