"""Kernel microbenchmark: LabelPooling against the official ReLabel path and torchvision RoIAlign.

Three ways to turn a batch of top-k label maps and crop boxes into ReLabel targets
(Yun et al., CVPR 2021), timed in one run on one device:

  (a) official   the naver-ai/relabel_imagenet training loop: densify each top-k map into
                 [B, C, 15, 15] on the host (a scatter per sample), copy to the device,
                 torchvision roi_align, softmax (harness/official.py)
  (b) dense      roi_align + softmax with the dense map already on the device (the best a
                 dense method can do; its memory is B * C * 225 * 4 bytes)
  (c) sparse     dali_relabel.label_pooling on the top-k maps (float16 values, int16/int32
                 classes), never densifying: the Triton kernel on a GPU, the C++ kernel on CPU

Reports median times, speed-ups, and the bandwidth (c) achieves on the bytes it must move
(see sparse_bytes), next to the device's copy bandwidth measured in the same run. Writes JSON
and a PNG.

    python benchmarks/kernel_bench.py [--device cuda|cpu] [--quick]
"""
import argparse
import logging
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from tqdm import tqdm

from dali_relabel import label_pooling
from harness import report
from harness.inputs import MAP_SIZE, make_inputs
from harness.official import dense_targets, densify
from harness.timing import device_sync, repeat_ms

logger = logging.getLogger("kernel_bench")
# Configurations whose tensors would need more than this are skipped, with the reason shown.
MEMORY_BUDGET_BYTES = 12 * 2 ** 30


def time_call(fn: Callable[[], torch.Tensor], device: torch.device, min_repeats: int,
              max_seconds: float) -> List[float]:
    """Wall-clock milliseconds per call (device synchronised), after one warm-up call: at
    least `min_repeats`, more (up to 200) within `max_seconds`."""
    return repeat_ms(fn, device_sync(device), repeats=min_repeats, max_seconds=max_seconds,
                     max_repeats=200)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a large device-to-device copy (read + write), the practical memory ceiling."""
    src = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = time_call(lambda: dst.copy_(src), device, min_repeats=10, max_seconds=1.0)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def sparse_bytes(batch: int, topk: int, num_classes: int, output_size: int, value_bytes: int,
                 index_bytes: int) -> int:
    """The bytes label_pooling must move at least: each input read once, the output written.

    bytes = B * K * H * W * (value_bytes + index_bytes)   the B pooled top-k maps
          + B * 4 * 4                                      the boxes, float32 (x1, y1, x2, y2)
          + B * S * S * C * 4                              the float32 output [B, S*S, C]
    """
    return (batch * topk * MAP_SIZE * MAP_SIZE * (value_bytes + index_bytes) + batch * 4 * 4
            + batch * output_size ** 2 * num_classes * 4)


def run_config(batch: int, topk: int, output_size: int, num_classes: int,
               device: torch.device, max_seconds: float, classes_per_image: int) -> Dict:
    row: Dict = dict(batch=batch, topk=topk, output_size=output_size, num_classes=num_classes)
    values, indices, boxes = make_inputs(batch, topk, num_classes, classes_per_image)
    dense_bytes = batch * num_classes * MAP_SIZE * MAP_SIZE * 4
    out_bytes = batch * output_size ** 2 * num_classes * 4
    methods: Dict[str, Optional[Callable[[], torch.Tensor]]] = {}
    skip_reason = None
    if dense_bytes + 2 * out_bytes > MEMORY_BUDGET_BYTES:
        skip_reason = (f"dense map + outputs need {(dense_bytes + 2 * out_bytes) / 2**30:.1f} "
                       f"GiB > budget {MEMORY_BUDGET_BYTES / 2**30:.0f} GiB")
    dev_values, dev_indices, dev_boxes = values.to(device), indices.to(device), boxes.to(device)
    if skip_reason is None:
        # (a): densify on the host, copy, roi_align, softmax.
        methods["official"] = lambda: dense_targets(
            densify(values, indices, num_classes).to(device), boxes.to(device), output_size)
        dense = torch.zeros(batch, num_classes, MAP_SIZE, MAP_SIZE, device=device)
        dense.scatter_(1, dev_indices.long(), dev_values.float())
        methods["dense"] = lambda: dense_targets(dense, dev_boxes, output_size)
    if 2 * out_bytes <= MEMORY_BUDGET_BYTES:
        methods["sparse"] = lambda: label_pooling(dev_values, dev_indices, dev_boxes,
                                                  num_classes=num_classes,
                                                  output_size=output_size)
    for name, fn in methods.items():
        times = time_call(fn, device, min_repeats=3, max_seconds=max_seconds)
        row[f"{name}_ms"] = statistics.median(times)
        row[f"{name}_repeats"] = len(times)
    if skip_reason is not None:
        row["skipped"] = skip_reason
    if "sparse_ms" in row:
        moved = sparse_bytes(batch, topk, num_classes, output_size, values.element_size(),
                             indices.element_size())
        row["sparse_bytes"] = moved
        row["sparse_gb_per_s"] = moved / (row["sparse_ms"] * 1e-3) / 1e9
        for base in ("official", "dense"):
            if f"{base}_ms" in row:
                row[f"speedup_vs_{base}"] = row[f"{base}_ms"] / row["sparse_ms"]
    return row


def format_table(rows: List[Dict]) -> str:
    header = (f"{'B':>5} {'K':>3} {'S':>3} {'C':>6} | {'official ms':>11} {'dense ms':>9} "
              f"{'sparse ms':>9} | {'x official':>10} {'x dense':>8} | {'GB/s':>6}")
    lines = [header, "-" * len(header)]

    def cell(row, key, width, fmt):
        return f"{row[key]:{width}{fmt}}" if key in row else f"{'-':>{width}}"

    for row in rows:
        lines.append(
            f"{row['batch']:>5} {row['topk']:>3} {row['output_size']:>3} "
            f"{row['num_classes']:>6} | {cell(row, 'official_ms', 11, '.3f')} "
            f"{cell(row, 'dense_ms', 9, '.3f')} {cell(row, 'sparse_ms', 9, '.3f')} | "
            f"{cell(row, 'speedup_vs_official', 10, '.1f')} "
            f"{cell(row, 'speedup_vs_dense', 8, '.1f')} | "
            f"{cell(row, 'sparse_gb_per_s', 6, '.2f')}"
            + (f"  ({row['skipped']})" if "skipped" in row else ""))
    return "\n".join(lines)


def plot(rows: List[Dict], path: Path, device: str, kernel: str, bandwidth: float) -> None:
    labels = [f"B{r['batch']} K{r['topk']} S{r['output_size']} C{r['num_classes']}"
              for r in rows]
    fig, (ax_time, ax_speed) = report.subplots(2, 1, figsize=(14, 9), sharex=True)
    width = 0.27
    positions = range(len(rows))
    for offset, (key, name, color) in enumerate([
            ("official_ms", "(a) official: host densify + roi_align", "tab:red"),
            ("dense_ms", "(b) dense roi_align, map on device", "tab:orange"),
            ("sparse_ms", f"(c) label_pooling (sparse, {kernel})", "tab:green")]):
        xs = [p + (offset - 1) * width for p in positions if key in rows[p]]
        ys = [rows[p][key] for p in positions if key in rows[p]]
        ax_time.bar(xs, ys, width, label=name, color=color)
    for p in positions:
        if "sparse_gb_per_s" in rows[p]:
            ax_time.annotate(f"{rows[p]['sparse_gb_per_s']:.1f} GB/s",
                             (p + width, rows[p]["sparse_ms"]), textcoords="offset points",
                             xytext=(0, 2), ha="center", va="bottom", fontsize=7, rotation=90)
    ax_time.set_yscale("log")
    ax_time.set_ylabel("median time per batch (ms, log)")
    ax_time.set_title(f"LabelPooling on {device}: time per batch "
                      "(absent: the dense map exceeds the memory budget)")
    ax_time.legend()
    for offset, (key, name, color) in enumerate([
            ("speedup_vs_official", "speed-up of (c) over (a)", "tab:red"),
            ("speedup_vs_dense", "speed-up of (c) over (b)", "tab:orange")]):
        xs = [p + (offset - 0.5) * width for p in positions if key in rows[p]]
        ys = [rows[p][key] for p in positions if key in rows[p]]
        ax_speed.bar(xs, ys, width, label=name, color=color)
    ax_speed.set_yscale("log")
    ax_speed.set_ylabel("speed-up (x, log)")
    ax_speed.set_title(f"label_pooling speed-up; above, (c)'s GB/s moved against the device "
                       f"copy bandwidth of {bandwidth:.1f} GB/s")
    ax_speed.legend()
    ax_speed.set_xticks(list(positions))
    ax_speed.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    report.save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_device_argument(parser, "device to time on")
    report.add_out_argument(parser, "kernel_bench.json and .png")
    parser.add_argument("--quick", action="store_true",
                        help="only B=256, K=5, C=1000 at S=1 (the headline) and S=14")
    parser.add_argument("--classes-per-image", type=int, default=32,
                        help="distinct classes in one image's map; 0 draws every cell from all "
                             "C classes, the worst case (default: 32)")
    parser.add_argument("--max-seconds", type=float, default=1.0,
                        help="time budget per method and configuration (default: 1.0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    kernel = "Triton kernel" if device.type == "cuda" else "C++ kernel"

    if args.quick:
        configs = [(256, 5, 1, 1000), (256, 5, 14, 1000)]
    else:
        configs = [(b, k, s, c) for c in (1000, 21843) for s in (1, 14) for k in (5, 10)
                   for b in (64, 256, 1024)]
    bandwidth = copy_bandwidth(device)
    rows = [run_config(*config, device=device, max_seconds=args.max_seconds,
                       classes_per_image=args.classes_per_image)
            for config in tqdm(configs, desc="kernel_bench", unit="config")]

    headline = next(r for r in rows if (r["batch"], r["topk"], r["output_size"],
                                        r["num_classes"]) == (256, 5, 1, 1000))
    result = dict(
        **report.device_info(device),
        sparse_kernel=kernel,
        classes_per_image=args.classes_per_image,
        copy_bandwidth_gb_per_s=bandwidth,
        headline=headline,
        rows=rows,
    )
    json_path, png_path = report.write_results(
        Path(args.out), "kernel_bench", result,
        lambda path: plot(rows, path, str(device), kernel, bandwidth))

    logger.info(format_table(rows))
    logger.info(
        "\nheadline B=256 K=5 S=1 C=1000 on %s (%d threads): official %.3f ms, dense %.3f ms, "
        "label_pooling (%s) %.3f ms -> %.1fx faster than the official path, %.1fx than dense "
        "roi_align; it moves %.2f GB/s against a %.1f GB/s device copy (%.1f%%)",
        device, torch.get_num_threads(), headline["official_ms"], headline["dense_ms"], kernel,
        headline["sparse_ms"], headline["speedup_vs_official"], headline["speedup_vs_dense"],
        headline["sparse_gb_per_s"], bandwidth, 100 * headline["sparse_gb_per_s"] / bandwidth)
    logger.info("wrote %s and %s", json_path, png_path)
    return result


if __name__ == "__main__":
    main()
