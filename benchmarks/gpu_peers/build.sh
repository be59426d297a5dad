#!/bin/bash
# Builds llama.cpp's llama-bench and test-backend-ops (its MUL_MAT perf list extended with twinquant's shapes)
# into $1, with CUDA when a GPU is there (sm_90, FlashAttention kernels off: they are not timed).
set -e
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/llama-build}
cuda=${GGML_CUDA:-OFF}; command -v nvidia-smi >/dev/null && cuda=ON
cmake -S "$here/llama" -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=$cuda -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF \
  -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TOOLS=ON >"$out.cmake.log" 2>&1
ninja -C "$out" llama-bench >"$out.ninja.log" 2>&1
libs=$(find "$out" -name 'libggml*.so' -printf '%h\n' | sort -u)
g++ -O2 -std=c++17 -I"$here/llama/ggml/include" "$here/test-backend-ops.cpp" -o "$out/bin/test-backend-ops" \
  $(for d in $libs; do echo -L$d -Wl,-rpath,$d; done) -lggml -lggml-base -lpthread
echo "$out/bin/test-backend-ops $out/bin/llama-bench"
