"""The machine a run happened on, in words, and how a run on it is timed, for reports and benchmarks alike."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The CPU's matmul-relevant instruction sets (AMX, AVX512-BF16, AVX2): timings mean little without it."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    found = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                                     ("avx2", "AVX2")) if flag in flags]
    return ", ".join(found) or platform.machine()


def machine_in_words(device) -> str:
    """'AMD EPYC 7B13 (AVX512-BF16, AVX512, AVX2), 2 threads' or the GPU's name: what a timing ran on."""
    import torch
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({cpu_isa()}), {torch.get_num_threads()} threads"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Seconds of one call of `fn`: the median of `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
