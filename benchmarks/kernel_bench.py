"""Kernel microbenchmark: LabelPooling against the official ReLabel path and torchvision RoIAlign.

Three ways to turn a batch of top-k label maps and crop boxes into ReLabel targets
(Yun et al., CVPR 2021), timed in one run on one device:

  (a) official   the naver-ai/relabel_imagenet training loop: densify each top-k map into
                 [B, C, 15, 15] on the host (a scatter per sample), copy to the device,
                 torchvision roi_align, softmax
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
import json
import logging
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dali_relabel import label_pooling  # noqa: E402

logger = logging.getLogger("kernel_bench")
MAP_SIZE = 15
# Configurations whose tensors would need more than this are skipped, with the reason shown.
MEMORY_BUDGET_BYTES = 12 * 2 ** 30


def make_inputs(batch: int, topk: int, num_classes: int, classes_per_image: int = 32,
                seed: int = 0):
    """Random top-k maps shaped like an annotator's: each image draws `classes_per_image`
    classes it 'contains' and each cell lists `topk` distinct ones of them (0: every cell draws
    from all C classes, the worst case for the sparse epilogue)."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(batch, topk, MAP_SIZE, MAP_SIZE, generator=gen) * 4).half()
    cells = (batch, MAP_SIZE, MAP_SIZE)
    if classes_per_image > 0:
        pool_size = max(topk, min(classes_per_image, num_classes))
        pools = torch.rand(batch, num_classes, generator=gen).argsort(dim=1)[:, :pool_size]
        picks = torch.rand(*cells, pool_size, generator=gen).argsort(dim=-1)[..., :topk]
        indices = torch.gather(pools[:, None, None, :].expand(*cells, pool_size), 3, picks)
    else:
        base = torch.randint(0, num_classes, (*cells, 1), generator=gen)
        step = torch.randint(1, num_classes // topk + 1, (*cells, 1), generator=gen)
        indices = (base + step * torch.arange(topk)) % num_classes
    indices = indices.permute(0, 3, 1, 2)
    index_dtype = torch.int16 if num_classes <= 32767 else torch.int32
    area = torch.empty(batch).uniform_(0.08, 1.0, generator=gen)
    side = area.sqrt()
    x1 = torch.rand(batch, generator=gen) * (1 - side)
    y1 = torch.rand(batch, generator=gen) * (1 - side)
    boxes = torch.stack([x1, y1, x1 + side, y1 + side], dim=1)
    return values, indices.to(index_dtype).contiguous(), boxes


def official_targets(values: torch.Tensor, indices: torch.Tensor, boxes: torch.Tensor,
                     num_classes: int, output_size: int, device: torch.device) -> torch.Tensor:
    """The official code path: per-sample densify on the host, roi_align, softmax."""
    batch = values.shape[0]
    dense = torch.zeros(batch, num_classes, MAP_SIZE, MAP_SIZE)
    for dense_map, top_values, top_indices in zip(dense, values, indices):
        dense_map.scatter_(0, top_indices.long(), top_values.float())
    return dense_targets(dense.to(device), boxes.to(device), output_size)


def dense_targets(dense: torch.Tensor, boxes: torch.Tensor, output_size: int) -> torch.Tensor:
    batch = dense.shape[0]
    rois = torch.cat([torch.arange(batch, device=boxes.device, dtype=boxes.dtype)[:, None],
                      boxes * MAP_SIZE - 0.5], dim=1)
    pooled = roi_align(dense, rois, output_size=(output_size, output_size), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=False)
    return pooled.flatten(2).softmax(dim=1)


def time_call(fn: Callable[[], torch.Tensor], device: torch.device, min_repeats: int,
              max_seconds: float) -> List[float]:
    """Wall-clock milliseconds per call (CUDA synchronised), after one warm-up call."""
    fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start_all < max_seconds
                                       and len(times) < 200):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= min_repeats and time.perf_counter() - start_all > max_seconds:
            break
    return times


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
        methods["official"] = lambda: official_targets(values, indices, boxes, num_classes,
                                                       output_size, device)
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
    fig, (ax_time, ax_speed) = plt.subplots(2, 1, figsize=(14, 9), sharex=True)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to time on (default: cuda if present, else cpu)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for kernel_bench.json and .png (default: benchmarks/results)")
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
        device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or platform.machine()),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        sparse_kernel=kernel,
        classes_per_image=args.classes_per_image,
        copy_bandwidth_gb_per_s=bandwidth,
        headline=headline,
        rows=rows,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_bench.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "kernel_bench.png", str(device), kernel, bandwidth)

    logger.info(format_table(rows))
    logger.info(
        "\nheadline B=256 K=5 S=1 C=1000 on %s (%d threads): official %.3f ms, dense %.3f ms, "
        "label_pooling (%s) %.3f ms -> %.1fx faster than the official path, %.1fx than dense "
        "roi_align; it moves %.2f GB/s against a %.1f GB/s device copy (%.1f%%)",
        device, torch.get_num_threads(), headline["official_ms"], headline["dense_ms"], kernel,
        headline["sparse_ms"], headline["speedup_vs_official"], headline["speedup_vs_dense"],
        headline["sparse_gb_per_s"], bandwidth, 100 * headline["sparse_gb_per_s"] / bandwidth)
    logger.info("wrote %s and %s", out / "kernel_bench.json", out / "kernel_bench.png")
    return result


if __name__ == "__main__":
    main()
