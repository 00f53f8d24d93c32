"""Shared pieces: medians, the machine description, the matrix-multiply ceiling, peak RSS, inputs."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.extract.forward import native_bf16
from pipeline.core.machine import cpu_isa, cpu_model, median_time

REPO = Path(__file__).resolve().parents[2]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a square `size` torch.mm in `dtype` on `device`: median of `repeats` (after a warm-up)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    inner = 20 if device.type == "cuda" else 1   # GPU: several products per timing, so launch latency vanishes

    def run():
        for _ in range(inner):
            torch.mm(a, b)
        sync(device)

    seconds = median_time(run, repeats)
    return 2 * size ** 3 * inner / seconds


def machine(device: torch.device) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "isa": cpu_isa(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "bf16_cpu": native_bf16(torch.device("cpu")), "device": str(device),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss survives exec, so a child would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def r(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}") if value == value else value
