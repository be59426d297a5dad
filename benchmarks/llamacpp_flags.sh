# Compiler flags for every llama.cpp build of this project (sourced by build_llamacpp.sh and
# build_llamacpp_wheel.sh). -march=native (GGML_NATIVE) turns on AMX on Sapphire Rapids, and ggml's AMX matmul
# segfaults on these machines (the sandbox does not grant the AMX tile state): AMX is switched off explicitly
# (gcc honours an explicit -mno-* whatever its position relative to -march). The flavour names the cache.
LLAMACPP_CFLAGS=""
if echo 'int main(){return 0;}' | ${CC:-cc} -x c -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -o /dev/null - 2>/dev/null; then
    LLAMACPP_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
LLAMACPP_FLAVOUR=noamx
