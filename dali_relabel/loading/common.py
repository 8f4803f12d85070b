"""What both loaders share: where they run (device, shard), image dtype and normalization
checks, and the DataLoader surface training scripts use (``loader.dataset``,
``loader.sampler``)."""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dali_relabel import _checks, _system, _transfer

__all__ = ["EpochSampler", "LoaderDataset", "check_epoch", "check_mean_std",
           "dali_image_dtype", "finish_images", "resolve_device", "resolve_shard"]

logger = logging.getLogger(__name__)

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned_env_shard = False


def resolve_shard(shard_id: int | None, num_shards: int | None) -> tuple[int, int]:
    """(shard_id, num_shards): as given, else the global rank and world size.

    The process group's when it is initialised; else torchrun's RANK and WORLD_SIZE (with a
    warning that the process group should come first); else (0, 1).
    """
    if (shard_id is None) != (num_shards is None):
        raise ValueError("shard_id and num_shards must be given together (or neither)")
    if shard_id is not None:
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not (
                0 <= shard_id < num_shards):
            raise ValueError(f"shard_id must lie in [0, num_shards={num_shards}), got "
                             f"{shard_id!r}")
        return shard_id, num_shards
    env = _env_rank()
    if dist.is_available() and dist.is_initialized():
        group = dist.get_rank(), dist.get_world_size()
        if env is not None and env != group:
            raise ValueError(
                f"RANK/WORLD_SIZE say rank {env[0]} of {env[1]} but the process group says "
                f"rank {group[0]} of {group[1]}; pass shard_id= and num_shards= explicitly")
        return group
    if env is None:
        return 0, 1
    global _warned_env_shard
    if not _warned_env_shard and env[1] > 1:
        warnings.warn(f"torch.distributed is not initialised: sharding by RANK={env[0]} and "
                      f"WORLD_SIZE={env[1]} from the environment; call "
                      "init_process_group before making the loaders", stacklevel=3)
        _warned_env_shard = True
    return env


def _env_rank() -> tuple[int, int] | None:
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        rank, world = int(rank), int(world)
    except ValueError:
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world


def resolve_device(device: str | torch.device) -> tuple[torch.device, int | None]:
    """The torch device and DALI's device_id (None runs DALI on the CPU only).

    A bare "cuda" means this process's GPU: LOCAL_RANK (modulo the visible GPUs, so that a
    launcher giving each process one visible GPU works too) when set, else the current one.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cuda' or 'cpu' (or a torch.device), got "
                         f"{device!r}") from None
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        raise ValueError(f"device must be 'cuda' or 'cpu', got {str(device)!r}")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available; pass device='cpu'")
    index = device.index if device.index is not None else _system.local_cuda_index()
    return torch.device("cuda", index), index


def dali_image_dtype(dtype: torch.dtype) -> Any:
    """DALI's output type for images of torch dtype `dtype` (bfloat16 converts after)."""
    import nvidia.dali.types as types  # the loaders' only DALI need here

    if dtype not in _IMAGE_DTYPES:
        raise ValueError(f"dtype must be one of {_IMAGE_DTYPES}, got {dtype}")
    return types.FLOAT16 if dtype == torch.float16 else types.FLOAT


def finish_images(images: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  channels_last: bool) -> torch.Tensor:
    """DALI's image batch as the loader yields it: on `device`, NCHW, of `dtype`."""
    images = _transfer.to_device(images, device)
    if channels_last:  # DALI wrote NHWC; this view is NCHW in channels_last memory format
        images = images.permute(0, 3, 1, 2)
    return images if images.dtype == dtype else images.to(dtype)


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    """The normalization as 3-tuples on the decoded pixels' 0-255 scale.

    timm's and torchvision's constants are on the 0-1 scale; an std below 1 on 0-255 pixels
    would blow the images up by more than 255x, so it is refused with the fix in the message.
    """
    if not isinstance(mean, (Sequence, np.ndarray)) or not isinstance(
            std, (Sequence, np.ndarray)) or len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values (R, G, B), got {mean!r}, {std!r}")
    mean, std = _checks.check_rgb("mean", mean), _checks.check_rgb("std", std)
    if min(std) <= 0:
        raise ValueError(f"std must be > 0, got {std!r}")
    if max(std) < 1:
        raise ValueError(f"mean and std are on the 0-255 scale of the decoded pixels, but "
                         f"std={std!r} looks like the 0-1 scale (timm's, torchvision's): "
                         "multiply mean and std by 255")
    return mean, std


class LoaderDataset:
    """``loader.dataset``: what scripts read of a torchvision dataset, its size and classes.

    Attributes:
        root: The image folder.
        classes: Class names in index order.
    """

    def __init__(self, root: str, classes: Sequence[str], size: int) -> None:
        self.root = root
        self.classes = list(classes)
        self._size = size

    def __len__(self) -> int:
        """Images in the split (every shard's, after exclusions)."""
        return self._size


class EpochSampler:
    """``loader.sampler``: ``set_epoch`` as DistributedSampler's, for scripts that call it."""

    def __init__(self, set_epoch: Callable[[int], None], size: int) -> None:
        self._set_epoch = set_epoch
        self._size = size

    def set_epoch(self, epoch: int) -> None:
        self._set_epoch(epoch)

    def __len__(self) -> int:
        """Samples this rank reads per epoch."""
        return self._size


def check_epoch(epoch: int) -> None:
    """Raises a ValueError unless `epoch` is an int >= 0."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
