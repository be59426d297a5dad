#!/bin/bash
# Assembles, in .llcpp/ of the repo (git-ignored), what the GPU machine builds the peers of benchmarks/kernel_speed.py
# and benchmarks/decode_gpu.py from (it has no network): llama.cpp from the llama-cpp-python sdist that
# `make install-test` downloads (ggml, libllama, common, llama-bench; test-backend-ops with twinquant's linear shapes
# added to its MUL_MAT perf list) and Dao-AILab's fast-hadamard-transform (git mirror: its sdists hold no CUDA
# sources; built for sm_90 only). About 23 MB; carry it with the device tool: carry [".llcpp"].
#   bash benchmarks/gpu_peers/assemble.sh SDIST_DIR FHT_REPO_DIR      (FHT_REPO_DIR "-": llama.cpp only)
set -e
root=$(cd "$(dirname "$0")/../.." && pwd)
S=${1:-$HOME/.cache/twinquant/llama.cpp-0.3.36-noamx/src}/vendor/llama.cpp
F=${2:?the fast-hadamard-transform repository (a git checkout or mirror), or - for llama.cpp only}
out=$root/.llcpp
grep -qx "/.llcpp/" "$root/.git/info/exclude" || echo "/.llcpp/" >> "$root/.git/info/exclude"
rm -rf "$out" && mkdir -p "$out/llama/tools" "$out/fht"
cp -r "$S"/CMakeLists.txt "$S"/cmake "$S"/src "$S"/include "$S"/common "$S"/vendor "$S"/ggml "$out/llama/"
rm -rf "$out"/llama/ggml/src/ggml-{blas,cann,et,hexagon,hip,metal,musa,opencl,openvino,rpc,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn}
cp -r "$S/tools/llama-bench" "$out/llama/tools/"
printf '# twinquant benchmark build: llama-bench only\nfind_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\n' > "$out/llama/tools/CMakeLists.txt"
cp "$S/tests/test-backend-ops.cpp" "$out/"
python3 - "$out/test-backend-ops.cpp" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
anchor = "    // Q4_K multi-column mat-vec\n"
add = """    // twinquant benchmarks/kernel_speed.py: the Qwen2.5 1.5B/7B/32B linear shapes at batch 1
    for (auto mk : std::vector<std::pair<int64_t, int64_t>>{{27648, 5120}, {5120, 27648}, {5120, 5120}, {8960, 1536},
                                                             {1536, 8960}, {18944, 3584}, {3584, 18944}}) {
        for (ggml_type type_a : {GGML_TYPE_F16, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K}) {
            test_cases.emplace_back(new test_mul_mat(type_a, GGML_TYPE_F32, mk.first, 1, mk.second, {1, 1}, {1, 1}));
        }
    }

"""
assert s.count(anchor) == 1
open(p, "w").write(s.replace(anchor, add + anchor))
PY
if [ "$F" != "-" ]; then
git -C "$F" archive HEAD | tar x -C "$out/fht"
python3 - "$out/fht/setup.py" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
anchor = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert s.count(anchor) == 1
open(p, "w").write(s.replace(anchor, '    cc_flag = ["-gencode", "arch=compute_90,code=sm_90"]   # the H200 only\n' + anchor))
PY
fi
cp "$root/benchmarks/gpu_peers/build.sh" "$root/benchmarks/gpu_peers/gpu_setup.sh" "$out/"
du -sh "$out"
