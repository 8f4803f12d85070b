"""The one way host data reaches the GPU in the per-batch path: through pinned memory.

A copy from pageable memory makes the host wait for the GPU (the driver stages it through a
pinned buffer of its own), and ``non_blocking=True`` does not change that; from pinned memory
the copy is queued on the stream and the host goes on. Every per-batch host-to-device copy of
the loaders (boxes, flips, rows, planned mixing and erasing parameters, gathered label-map
rows) goes through :func:`to_device`, which the sync test intercepts.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_device"]


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`array` (host memory) as a tensor on `device`, queued without waiting for the GPU.

    On a CPU `device` it is the tensor itself (numpy arrays are wrapped without a copy).
    """
    if isinstance(array, torch.Tensor):
        tensor = array
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    if tensor.device.type != "cpu":
        return tensor.to(device, non_blocking=True)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
