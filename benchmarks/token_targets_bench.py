"""Token-target benchmark: SparseTargets against dense [B, S*S, C] targets.

For B crops with S x S token targets over C classes (top-5 label maps of 15 x 15 cells, as
ImageNet's), two ways to make the targets and train on them:

  dense   label_pooling's Tensor[B, S*S, C] float32, then -(t * log_softmax(z)).sum(-1).mean()
  sparse  sparse_label_pooling's SparseTargets, then soft_target_cross_entropy, which never
          builds dense targets

Reports the targets' bytes, the time to make them, the time of targets + loss + backward on
token logits z [B, S*S, C], and the peak memory of that step beyond the logits (their
gradient included, the same for both): on CUDA torch.cuda.max_memory_allocated, on CPU the
process's peak resident memory (Linux, reset through /proc/self/clear_refs). A configuration
whose dense step would not fit in the memory available is measured sparse only. Writes
token_targets_bench.{json,png}.

    python benchmarks/token_targets_bench.py [--device cuda|cpu] [--repeats N] [--max-seconds T]
"""
import argparse
import ctypes
import gc
import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dali_relabel import label_pooling, soft_target_cross_entropy, sparse_label_pooling
from harness import report
from harness.inputs import MAP_SIZE, TOPK, make_inputs
from harness.timing import device_sync, median_ms

logger = logging.getLogger("token_targets_bench")
# (B, C): ImageNet-1k and -21k at B = 256, and -21k at a batch whose dense step fits in a
# workstation's memory.
CONFIGS = ((256, 1000), (256, 21843), (64, 21843))
# Float32 tensors of [B, S*S, C] alive at the dense step's peak beside the logits: targets,
# log_softmax, their product, and two in the backward pass (the logits' gradient is one).
DENSE_PEAK_TENSORS, SPARSE_PEAK_TENSORS = 5, 3


def sparse_bytes(batch: int, num_classes: int, output_size: int) -> int:
    """SparseTargets' bytes for `batch` crops, computed without making them: B times those of
    one crop's (fill float32, U = min(K F^2, C) slots of class and probability per token;
    sparse_label_pooling's layout)."""
    values = torch.zeros(1, TOPK, MAP_SIZE, MAP_SIZE)
    indices = torch.arange(TOPK).view(1, TOPK, 1, 1).repeat(1, 1, MAP_SIZE, MAP_SIZE)
    one = sparse_label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                               num_classes=num_classes, output_size=output_size)
    return batch * one.nbytes()


def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) * 1024


def _rss(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
               .group(1)) * 1024


def host_malloc(exact: bool) -> None:
    """exact: glibc maps every block of 64 kB or more on its own and returns it when freed, so
    that resident memory follows the live tensors; else it keeps freed blocks under 32 MB
    for reuse, as it comes to do by default (faster, but hides them from the peak)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 * 1024 if exact else 32 * 2 ** 20)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)


def peak_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes `fn` needed at its peak beyond what was allocated before it (None when the
    platform cannot tell)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        base = _rss("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to now
    except OSError:
        return None
    fn()
    return _rss("VmHWM") - base


def run_config(batch: int, num_classes: int, output_size: int, device: torch.device,
               repeats: int, max_seconds: float, row: Dict) -> None:
    """Measures one configuration into `row`: bytes and peak memory when `repeats` is 0,
    else times."""
    tokens, sync = output_size ** 2, device_sync(device)
    values, indices, boxes = (t.to(device) for t in make_inputs(batch, TOPK, num_classes))
    pool = dict(num_classes=num_classes, output_size=output_size, check_inputs=False)
    makers: Dict[str, Callable[[], object]] = dict(
        sparse=lambda: sparse_label_pooling(values, indices, boxes, **pool),
        dense=lambda: label_pooling(values, indices, boxes, **pool))
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(batch, tokens, num_classes, generator=gen, device=device) * 2)
    logits.requires_grad_()
    if not repeats:
        row.update(batch=batch, output_size=output_size, num_classes=num_classes,
                   dense_bytes=batch * tokens * num_classes * 4,
                   sparse_bytes=makers["sparse"]().nbytes())
        assert row["sparse_bytes"] == sparse_bytes(batch, num_classes, output_size)
    available = memory_available(device)
    for kind, peak_tensors in (("sparse", SPARSE_PEAK_TENSORS), ("dense", DENSE_PEAK_TENSORS)):
        need = peak_tensors * row["dense_bytes"]
        if need > 0.8 * available:
            row[f"{kind}_skipped"] = (f"needs about {need / 1e9:.1f} GB beside the logits, "
                                      f"{available / 1e9:.1f} GB available")
            continue
        make = makers[kind]

        def step() -> None:
            soft_target_cross_entropy(logits, make()).backward()
            logits.grad = None

        if repeats:
            timing = dict(repeats=repeats, max_seconds=max_seconds, max_repeats=20)
            row[f"{kind}_targets_ms"] = median_ms(make, sync, **timing)
            row[f"{kind}_step_ms"] = median_ms(step, sync, **timing)
        else:
            step()  # warm-up
            row[f"{kind}_step_peak_bytes"] = peak_memory(step, device)


def mb(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def statements(row: Dict) -> List[str]:
    name = f"B={row['batch']} S={row['output_size']} C={row['num_classes']}"
    lines = [f"{name}: sparse targets {mb(row['sparse_bytes'])}, dense {mb(row['dense_bytes'])}"
             f", {row['dense_bytes'] / row['sparse_bytes']:.0f}x less"]
    if "sparse_step_ms" in row and "dense_step_ms" in row:
        lines.append(
            f"{name}: targets {row['sparse_targets_ms']:.0f} ms vs {row['dense_targets_ms']:.0f}"
            f" ms; targets + loss + backward {row['sparse_step_ms']:.0f} ms vs "
            f"{row['dense_step_ms']:.0f} ms ({row['dense_step_ms'] / row['sparse_step_ms']:.1f}x"
            f" faster); peak memory of that step beyond the logits "
            f"{mb(row['sparse_step_peak_bytes'])} vs {mb(row['dense_step_peak_bytes'])}")
    elif "sparse_step_ms" in row:
        lines.append(
            f"{name}: sparse targets {row['sparse_targets_ms']:.0f} ms, targets + loss + "
            f"backward {row['sparse_step_ms']:.0f} ms, peak memory beyond the logits "
            f"{mb(row['sparse_step_peak_bytes'])}; dense not run: {row['dense_skipped']}")
    return lines


def plot(rows: List[Dict], path: Path, device: str) -> None:
    labels = [f"B{r['batch']} S{r['output_size']} C{r['num_classes']}" for r in rows]
    fig, axes = report.subplots(1, 3, figsize=(15, 4.5))
    panels: List[Tuple[str, str, float, str]] = [
        ("{}_bytes", "targets (MB, log)", 1e-6, "memory of one batch's targets"),
        ("{}_step_peak_bytes", "peak beyond the logits (MB, log)", 1e-6,
         "targets + loss + backward: memory"),
        ("{}_step_ms", "median ms (log)", 1.0, "targets + loss + backward: time")]
    width = 0.38
    for ax, (key, ylabel, scale, title) in zip(axes, panels):
        for offset, (kind, color) in enumerate((("sparse", "tab:green"), ("dense", "tab:red"))):
            xs = [p + (offset - 0.5) * width for p, r in enumerate(rows)
                  if r.get(key.format(kind)) is not None]
            ys = [r[key.format(kind)] * scale for r in rows
                  if r.get(key.format(kind)) is not None]
            ax.bar(xs, ys, width, color=color, label=kind)
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"Token targets on {device}: SparseTargets vs dense [B, S*S, C] "
                 "(absent: the dense step does not fit in memory)", fontsize=11)
    report.save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_device_argument(parser, "device to run on")
    parser.add_argument("--output-size", type=int, default=14,
                        help="S, the token grid side (default: 14)")
    parser.add_argument("--configs", default=",".join(f"{b}x{c}" for b, c in CONFIGS),
                        help="comma-separated BxC (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per measurement (>= 1), after one warm-up "
                             "(default: 3)")
    parser.add_argument("--max-seconds", type=float, default=2.0,
                        help="time to keep repeating a fast measurement in, up to 20 calls "
                             "(default: 2.0)")
    report.add_out_argument(parser, "token_targets_bench.json and .png")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    load = os.getloadavg()[0]  # other work on the machine skews the times
    configs = [tuple(int(v) for v in config.split("x")) for config in args.configs.split(",")]
    rows: List[Dict] = [{} for _ in configs]
    # Memory first, each block of the host's allocator mapped and returned on its own; then
    # the times, with the allocator reusing freed blocks as a long-running process does.
    for repeats in (0, args.repeats):
        if device.type == "cpu":
            host_malloc(exact=not repeats)
        for row, (batch, num_classes) in zip(rows, configs):
            run_config(batch, num_classes, args.output_size, device, repeats,
                       args.max_seconds, row)
    for row in rows:
        for line in statements(row):
            logger.info(line)
    tokens = args.output_size ** 2
    at_1024 = dict(batch=1024, output_size=args.output_size, num_classes=1000,
                   dense_bytes=1024 * tokens * 1000 * 4,
                   sparse_bytes=sparse_bytes(1024, 1000, args.output_size))
    result = dict(
        **report.device_info(device),
        load_average_at_start=load,
        topk=TOPK,
        map_size=MAP_SIZE,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        computed_at_b1024_c1000=at_1024,
        rows=rows,
    )
    json_path, png_path = report.write_results(Path(args.out), "token_targets_bench", result,
                                               lambda path: plot(rows, path, str(device)))
    logger.info("B=1024 S=%d C=1000 (computed): sparse targets %s, dense %s, %.0fx less",
                args.output_size, mb(at_1024["sparse_bytes"]), mb(at_1024["dense_bytes"]),
                at_1024["dense_bytes"] / at_1024["sparse_bytes"])
    logger.info("wrote %s and %s", json_path, png_path)
    return result


if __name__ == "__main__":
    main()
