"""run_jobs (algorithms/workers.py): independent jobs from several threads, results in order, errors raised."""

import threading
import time

import pytest
import torch

from twinquant.algorithms.workers import check_workers, default_workers, run_jobs
from twinquant.errors import TwinquantError


def test_results_come_back_in_order_from_several_threads():
    names = set()

    def job(i):
        names.add(threading.current_thread().name)
        time.sleep(0.01 * (5 - i % 5))            # later jobs finish first
        assert torch.is_inference_mode_enabled()  # thread-local in torch: the worker turns it on itself
        return i * i

    assert run_jobs(job, range(12), 4, "cpu") == [i * i for i in range(12)]
    assert len(names) == 4
    names.clear()
    assert run_jobs(lambda i: names.add(threading.current_thread().name) or i, range(3), 1, "cpu") == [0, 1, 2]
    assert names == {threading.current_thread().name}          # one worker: in this thread


def test_the_first_error_is_raised_after_the_others_ended():
    ended = []

    def job(i):
        if i == 2:
            raise TwinquantError("job 2 failed")
        time.sleep(0.05)
        ended.append(i)
        return i

    with pytest.raises(TwinquantError, match="job 2"):
        run_jobs(job, range(6), 3, "cpu")
    assert sorted(ended) == [0, 1, 3, 4, 5]


def test_worker_counts():
    assert default_workers("cpu") == 1 and default_workers(torch.device("cuda")) > 1
    assert check_workers(8) == 8
    for bad in (0, -1, 65, 2.0, True, "4"):
        with pytest.raises(TwinquantError, match="--workers"):
            check_workers(bad)
