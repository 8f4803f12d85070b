"""What this process may use of the machine."""
from __future__ import annotations

import os

__all__ = ["cpu_share"]


def cpu_share(limit: int | None = None) -> int:
    """This process's share of the CPUs it may run on (torchrun's local processes split
    them), at least 1 and at most `limit` when given."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local_world))
    return share if limit is None else min(limit, share)
