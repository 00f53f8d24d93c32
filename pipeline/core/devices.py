"""Device names from params and the command line, checked against this machine before any work."""

from __future__ import annotations

import re

import torch

from pipeline.core.errors import ConfigError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def is_device_name(name: object) -> bool:
    return isinstance(name, str) and DEVICE_PATTERN.fullmatch(name) is not None


def check_device_name(name: str, key: str) -> str:
    """`name` if it is a device name at all; a ConfigError naming `key` otherwise."""
    if not is_device_name(name):
        raise ConfigError(f"{key} must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str, key: str = "extract.device") -> torch.device:
    """The torch device for a setting; a GPU that this machine lacks is a ConfigError naming `key`,
    raised before any model is loaded (not a CUDA traceback half way through)."""
    if check_device_name(name, key) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= visible:
            seen = f"only {visible} CUDA device(s) are" if visible else "no CUDA device is"
            raise ConfigError(f"{key} is {name!r} but {seen} visible on this machine; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key} is 'mps' but MPS is not available on this machine; use auto or cpu")
    return torch.device(name)


def lightning_accelerator(name: str, key: str = "train.device") -> str:
    """Lightning's accelerator for a device setting, checked as `resolve_device` checks it."""
    device = resolve_device(name, key)
    return {"cuda": "gpu"}.get(device.type, device.type)
