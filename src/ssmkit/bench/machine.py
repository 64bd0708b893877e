"""Facts about the machine a benchmark runs on: the CPU's name, the memory read bandwidth, weight bytes;
and the one timing helper the benchmarks share."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time

import torch
from torch import nn


def cpu_model() -> str:
    """The CPU's model name from ``lscpu`` (the platform's processor string without it)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def median_time(fn, repeats: int, warmup: int = 1, clock=time.perf_counter) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, by ``clock`` (wall
    time; ``time.process_time`` for CPU time, steadier on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def read_bandwidth(repeats: int = 21) -> tuple[float, float]:
    """(median, best) GB/s of ``torch.sum`` over a 256 MiB float32 tensor with the current threads."""
    x = torch.ones(64 * 2**20)  # (2^26,) 256 MiB
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times) / 1e9, x.nbytes / min(times) / 1e9


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer: what one step reads (a tied table once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
