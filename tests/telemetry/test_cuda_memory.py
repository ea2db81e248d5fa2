import torch

from slipstream.telemetry.cuda_memory import CudaMemoryMeter, memory_step_metrics


def test_step_metrics_are_the_counters_increase_and_the_current_sizes():
    before = {"num_alloc_retries": 1, "num_device_alloc": 10, "num_device_free": 2, "num_ooms": 0}
    now = {"num_alloc_retries": 3, "num_device_alloc": 15, "num_device_free": 9, "num_ooms": 0,
           "allocated_bytes.all.peak": 3 * 2**30, "reserved_bytes.all.current": 5 * 2**29}
    m = memory_step_metrics(before, now)
    assert m == {"memory/alloc_retries": 2.0, "memory/cuda_mallocs": 5.0, "memory/cuda_frees": 7.0,
                 "memory/ooms": 0.0, "memory/peak_allocated_gb": 3.0, "memory/reserved_gb": 2.5}


def test_nothing_is_logged_off_cuda():
    assert CudaMemoryMeter(torch.device("cpu")).step() == {}
