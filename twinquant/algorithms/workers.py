"""Independent quantizations launched from several host threads, each thread on its own CUDA stream.

On a GPU the quantization of a small matrix (measure's sampled rows: 64–200 rows) is bound by launching its
kernels and by its host synchronisations, not by the GPU: while one sweep waits for a result or for the Python
interpreter, the GPU idles. torch releases the interpreter lock while it dispatches and launches an op, so a few
threads, each launching one job's kernels on its own stream, keep the GPU busy with several jobs at once. The jobs
must not depend on each other; their results are the same bits as in order (tested on the CPU, where the same
threads run without streams).

Each job runs under `torch.inference_mode()` (thread-local in torch, so not inherited from the caller) and its
stream is synchronised before its result is handed back; the caller's stream is synchronised before the first job
starts, so inputs the caller made are complete.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

from twinquant.errors import TwinquantError

T = TypeVar("T")
R = TypeVar("R")

GPU_WORKERS = 4           # threads a GPU gets by default (measured: benchmarks/results/scale_s11-measure*.json)


def default_workers(device: torch.device | str) -> int:
    """1 on a CPU (its cores already run each op's threads), GPU_WORKERS on a GPU."""
    return GPU_WORKERS if torch.device(device).type == "cuda" else 1


def check_workers(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise TwinquantError(f"--workers must be an integer from 1 to 64, not {n!r}")
    return n


def run_jobs(fn: Callable[[T], R], items: Iterable[T], workers: int, device: torch.device | str) -> list[R]:
    """[fn(item) for item in items], with up to `workers` jobs at a time (1: in order, in this thread). The first
    exception a job raises is raised here once every started job has ended."""
    items = list(items)
    device = torch.device(device)
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.current_stream(device).synchronize()
    local = threading.local()

    def job(x):
        with torch.inference_mode():
            if not cuda:
                return fn(x)
            if not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream(device)
            with torch.cuda.device(device), torch.cuda.stream(local.stream):
                out = fn(x)
                local.stream.synchronize()
            return out

    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="twinquant-job") as pool:
        return list(pool.map(job, items))
