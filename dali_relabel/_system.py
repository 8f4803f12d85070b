"""What this process may use of the machine: CPUs and memory."""
from __future__ import annotations

import os
import resource

__all__ = ["available_memory", "cpu_share", "format_bytes"]


def cpu_share(limit: int | None = None) -> int:
    """This process's share of the CPUs it may run on (torchrun's local processes split
    them), at least 1 and at most `limit` when given."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, len(os.sched_getaffinity(0)) // max(1, local_world))
    return share if limit is None else min(limit, share)


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _process_kib(field: str) -> int | None:
    """A "VmSize:"-style field of /proc/self/status, in KiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int:
    """Bytes of memory this process can still allocate, the least of:

    - the kernel's MemAvailable (free memory plus what the page cache can give back);
    - a cgroup (container) limit less the cgroup's usage (cgroup v2, else v1);
    - an address-space limit (`ulimit -v`, RLIMIT_AS) less the process's address space;
    - a data-segment limit (`ulimit -d`, RLIMIT_DATA) less the process's data segment.
    """
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, used = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and used is not None:
            available = min(available, limit - used)
            break
    for rlimit, field in ((resource.RLIMIT_AS, "VmSize:"), (resource.RLIMIT_DATA, "VmData:")):
        limit = resource.getrlimit(rlimit)[0]
        if limit != resource.RLIM_INFINITY:
            used = _process_kib(field)
            if used is not None:
                available = min(available, limit - used * 1024)
    return max(0, available)


def format_bytes(num_bytes: float) -> str:
    """A byte count for messages: "512 B", "3.4 kB", "1.2 GB" (powers of 1000)."""
    if num_bytes < 1000:
        return f"{num_bytes:.0f} B"
    for unit in ("kB", "MB", "GB"):
        num_bytes /= 1000
        if num_bytes < 1000:
            return f"{num_bytes:.1f} {unit}"
    return f"{num_bytes / 1000:.1f} TB"


def local_cuda_index() -> int:
    """This process's GPU: LOCAL_RANK (modulo the visible GPUs, so that a launcher giving each
    process one visible GPU works too) when set, else the current one."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return int(local_rank) % torch.cuda.device_count()
    return torch.cuda.current_device()
