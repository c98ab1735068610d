"""Which torch device a command runs on, checked before any work."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str | None) -> str:
    """`device` checked against this machine, or the default (cuda if available, else cpu).

    Raises:
        ConfigError: not a device name, or a device this machine does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), numbered from 0")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise ConfigError(f"--device {device!r}: ser runs on cpu, cuda or mps")
    return device
