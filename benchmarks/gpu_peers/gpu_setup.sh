#!/bin/bash
# On the GPU machine: build llama.cpp's test-backend-ops with CUDA and Dao-AILab's fast-hadamard-transform (sm_90),
# both in the background (logs: /tmp/llbuild.log, /tmp/fhtbuild.log, each ending in "done").
here=$(cd "$(dirname "$0")" && pwd)
(setsid bash -c "'$here/build.sh' /tmp/llama-cuda > /tmp/llbuild.log 2>&1; echo done >> /tmp/llbuild.log" &)
(setsid bash -c "cd '$here/fht' && FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE MAX_JOBS=4 python3 -m pip install -q --no-build-isolation --no-deps --target /tmp/fht . > /tmp/fhtbuild.log 2>&1; echo done >> /tmp/fhtbuild.log" &)
