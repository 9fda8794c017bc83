"""Pick the torch device to run on. torch is imported on first call, not at import."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def available_devices() -> list[str]:
    """Device types usable here, best first, e.g. ``["cuda", "cpu"]``."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def select_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> cuda > mps > cpu; otherwise the named device, checked.

    Raises:
        ValueError: the name is not a torch device, or that kind of device is not
            available in this torch installation / on this machine.
    """
    import torch

    if device is None or device == "auto":
        return torch.device(available_devices()[0])
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from e
    available = available_devices()
    if dev.type not in available:
        raise ValueError(
            f"Device {device!r} was requested but is not available here "
            f"(available: {', '.join(available)}). Use device='auto' to pick the best one."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"Device {device!r} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s)."
        )
    return dev
