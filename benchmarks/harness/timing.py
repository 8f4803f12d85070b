"""Timing: waiting on the device, warm-up then timed calls, timed streams of batches, and the
CPU that processes outside the benchmark take meanwhile (read from /proc)."""
import os
import statistics
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for `device`'s queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def repeat_ms(fn: Callable[[], object], sync: Callable[[], None], *, repeats: int,
              max_seconds: float = 0.0, max_repeats: int = 0) -> List[float]:
    """Wall-clock milliseconds of calls of `fn` (each between two waits on the device), after
    one warm-up call: `repeats` calls, and more (up to `max_repeats`) while within
    `max_seconds` of the first."""
    fn()
    sync()
    times: List[float] = []
    begin = time.perf_counter()
    while len(times) < repeats or (len(times) < max_repeats
                                   and time.perf_counter() - begin < max_seconds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], object], sync: Callable[[], None], *, repeats: int,
              max_seconds: float = 0.0, max_repeats: int = 0) -> float:
    """The median of repeat_ms."""
    return statistics.median(repeat_ms(fn, sync, repeats=repeats, max_seconds=max_seconds,
                                       max_repeats=max_repeats))


def endless(loader: Iterable) -> Iterator:
    """Epoch after epoch of a loader (ReLabelLoader or DataLoader) as one stream of batches."""
    while True:
        yield from loader


def time_batches(batches: Iterator, warmup: int, num_batches: int,
                 sync: Callable[[], None]) -> Dict:
    """Seconds for `num_batches` batches after `warmup` untimed ones, the median and longest
    gap between batches, and the CPU others took meanwhile (other_cpu)."""
    for _ in range(warmup):
        next(batches)
    sync()
    snapshot = cpu_snapshot()
    start = time.perf_counter()
    stamps = []
    for _ in range(num_batches):
        next(batches)
        sync()
        stamps.append(time.perf_counter() - start)
    interference = other_cpu(snapshot, cpu_snapshot(), stamps[-1])
    gaps = np.diff([0.0] + stamps) * 1e3
    return dict(seconds=stamps[-1], batches=num_batches,
                median_batch_ms=float(np.median(gaps)), max_batch_ms=float(gaps.max()),
                **interference)


def cpu_snapshot() -> Optional[Tuple[int, int, int]]:
    """(busy jiffies of the machine without steal, steal jiffies, jiffies of this process and
    its descendants, e.g. DataLoader workers); None where /proc is missing (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        parents, own = {}, {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            pid = int(entry.name)
            parents[pid] = int(stat[1])
            own[pid] = int(stat[11]) + int(stat[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    busy = sum(fields[:3]) + sum(fields[4:7])  # user nice system (idle) iowait irq softirq
    return busy, fields[7], sum(own.get(pid, 0) for pid in tree)


def other_cpu(before, after, seconds: float) -> Dict:
    """CPU used by processes outside this benchmark (and stolen by the hypervisor) during a
    timed window, in % of the machine's capacity over that window."""
    if before is None or after is None:
        return {}
    hz = os.sysconf("SC_CLK_TCK")
    capacity = seconds * (os.cpu_count() or 1)
    foreign = max(0, (after[0] - before[0]) - (after[2] - before[2])) / hz
    steal = (after[1] - before[1]) / hz
    return dict(other_cpu_percent=100 * foreign / capacity, steal_percent=100 * steal / capacity)


def interference(row: Dict) -> float:
    """The % of the machine that others took while `row` (of time_batches) was timed."""
    return row.get("other_cpu_percent", 0.0) + row.get("steal_percent", 0.0)


def wait_until_idle(max_seconds: float, max_busy_percent: float) -> Optional[float]:
    """Waits (at most `max_seconds`) for a second in which the machine is busy below
    `max_busy_percent`; processes of other PID namespaces count too. Returns the last busy %."""
    busy = None
    deadline = time.perf_counter() + max_seconds
    while True:
        before = cpu_snapshot()
        if before is None:
            return None
        time.sleep(1.0)
        after = cpu_snapshot()
        busy = other_cpu(before, after, 1.0)["other_cpu_percent"]
        if busy <= max_busy_percent or time.perf_counter() >= deadline:
            return busy
