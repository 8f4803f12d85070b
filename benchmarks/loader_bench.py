"""Loader benchmark: what ReLabel's localized targets cost against the loaders people use.

Images per second of whole training batches, measured side by side on one machine, over the
same JPEG files, with the same number of CPU threads / DataLoader workers W = T:

  (a) official        the naver-ai/relabel_imagenet input pipeline (Yun et al., CVPR 2021),
                      reproduced here: a torchvision ImageFolder whose __getitem__ opens the
                      JPEG with PIL, applies RandomResizedCrop returning its coordinates, a
                      horizontal flip, ToTensor and Normalize, and torch.load()s the image's own
                      [2, 5, 15, 15] `.pt` label map; a DataLoader (W workers, shuffle,
                      drop_last, persistent workers); then, per batch in the main process, the
                      official target code: densify into zeros [B, 1000, 15, 15] with a
                      scatter_ per sample, torchvision roi_align (1x1), softmax
  (b) plain DALI      the loader one would write without ReLabel, images only:
                      fn.readers.file (shuffled) -> fn.decoders.image_random_crop ->
                      fn.resize(224, antialias) -> fn.crop_mirror_normalize (random flip) ->
                      DALIGenericIterator
  (c) ReLabelLoader   dali_relabel.ReLabelLoader over the same images with an HDF5 store of the
                      same maps (with /sizes): the epoch plan fixes the order and every window
                      on the host, a file reader reads the files in plan order, DALI
                      ROI-decodes the windows, LabelPooling makes the targets; the same
                      decoder settings as (b). ReLabel's cost is 1 - (c) / (b), measured in
                      paired segments (below).
  (d) bare decode     a DALI pipeline that only reads and decodes the JPEGs (no crop, no
                      resize) on the same T threads; for reference also PIL decoding
                      (Image.open(path).convert("RGB")) in a DataLoader with W workers
  (e) several crops   ReLabelLoader with num_crops = 2 and 4: each decoded image gives N
                      crops, each with its own window, flip and target (repeated
                      augmentation); training samples per second against (b) and (a), the
                      ratios taken round by round (each round times every method once)

The official transform list also has ColorJitter and a PCA lighting noise; no loader here
applies them, so both are left out, which only favours (a). The official code hands roi_align
its crop as (y1, x1, y2, x2); here the columns are put in torchvision's (x1, y1, x2, y2) order,
the project's convention (same cost, correct targets).

The images are ImageNet-like JPEGs made from real photographs that ship with scikit-image and
scikit-learn (random window, short side 300-500 px, mild sensor noise, JPEG quality 88-96),
generated once into a cache folder with their label maps (one `.pt` file per image for (a), one
HDF5 store for (c), same values) and reused while the generation parameters match
(harness/jpegs.py); (a) is harness/official.py, (b) and (d) harness/plain_dali.py. Every file is
read once before timing (warm page cache); warm-up batches (a whole first epoch, then a few)
are not timed, so every method is timed in its second epoch; each method runs alone
(the others' workers and threads are shut down). Rounds alternate the methods, each round
starting one method later, so that noise of a shared machine hits them alike, and the median
round counts. Each timed run first waits
for the machine to be idle, measures the CPU that processes outside the benchmark take
meanwhile (/proc/stat, any PID namespace), and is repeated when that exceeds --max-other-cpu;
the JSON records it per method.

Rounds of whole loaders give each method's images/s, but a shared machine's speed drifts by
several percent between them, more than ReLabel's cost. So (b) and (c) are then built side by
side and, after an untimed epoch each, take turns in short segments (--segment-batches timed
batches, about a second): each pair of adjacent segments gives one ratio of (c) to (b), and
ReLabel's cost is the geometric mean of --pairs such ratios, with a 95% interval. It also
records how long the epoch plan takes for ImageNet's 1,281,167 images.

The epoch boundary: ReLabelLoader builds the next epoch's pipeline on a background thread a
few batches before an epoch ends. Over --boundary-epochs epochs (after the first, which warms
up) every batch's wait is timed (the loop does nothing else, so the loader sets the pace);
around each boundary (the last BOUNDARY_BEFORE batches of an epoch and the first
BOUNDARY_AFTER of the next) the longest wait is compared with the median wait, and reported
with whether it stays within BOUNDARY_WITHIN times the median. The plain DALI graph, whose reader wraps around
without a new pipeline, is measured the same way for reference. Writes JSON and a PNG to
benchmarks/results/.

    python benchmarks/loader_bench.py [--device cuda|cpu] [--threads T] [--images N]
"""

import argparse
import gc
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dali_relabel import LabelMapStore, ReLabelLoader
from dali_relabel.loading import EpochPlanner
from harness import jpegs, plain_dali, report
from harness.inputs import random_boxes
from harness.official import (IMAGE_SIZE, official_batches, official_boxes, official_dataset,
                              official_loader, official_targets)
from harness.stats import ratio_interval
from harness.timing import (device_sync, endless, interference, median_ms, time_batches,
                            wait_until_idle)

logger = logging.getLogger("loader_bench")

METHODS = ("official", "plain_dali", "relabel_loader", "dali_decode", "pil_decode",
           "relabel_crops2", "relabel_crops4")
METHOD_NAMES = {
    "official": "(a) official: PIL + .pt files + dense roi_align",
    "plain_dali": "(b) plain DALI graph, images only",
    "relabel_loader": "(c) ReLabelLoader: DALI + LabelPooling",
    "dali_decode": "(d) DALI bare decode",
    "pil_decode": "(d') PIL bare decode, DataLoader",
    "relabel_crops2": "(e) ReLabelLoader, num_crops=2",
    "relabel_crops4": "(e') ReLabelLoader, num_crops=4",
}
# ReLabelLoader's methods by crops per decoded image.
CROPS = {1: "relabel_loader", 2: "relabel_crops2", 4: "relabel_crops4"}
# The epoch boundary: batches before and after it that count, and the multiple of the median
# wait the longest wait at a boundary is compared with.
BOUNDARY_BEFORE, BOUNDARY_AFTER, BOUNDARY_WITHIN = 3, 2, 2.0
IMAGENET_TRAIN_IMAGES = 1_281_167
SPREAD_WARNING_PERCENT = 15.0
# The paired comparison: ReLabel's cost is measured against this loader.
PAIRED = ("relabel_loader", "plain_dali")
SEGMENT_PAUSE_S = 0.25  # a loader left idle still prepares the batches its queue has room for
SEGMENT_DRAIN = 2  # batches a loader has prefetched when its turn comes (both: queue depth 2)


class PILDecodeDataset(torch.utils.data.Dataset):
    """Decodes each file as torchvision's pil_loader does; returns only its size."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        with open(self.files[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        return image.size


def plan_ms(seed: int) -> float:
    """Milliseconds to plan one epoch of ImageNet's training set (order, windows, flips) on
    one rank, for image sizes spread like ImageNet's."""
    rng = np.random.default_rng(seed)
    sizes = np.stack([rng.integers(200, 500, IMAGENET_TRAIN_IMAGES),
                      rng.integers(250, 650, IMAGENET_TRAIN_IMAGES)], axis=1).astype(np.int32)
    planner = EpochPlanner(sizes, np.arange(IMAGENET_TRAIN_IMAGES), batch_size=256, seed=seed,
                           shuffle=True, shard_id=0, num_shards=1, drop_last=True,
                           scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5)
    planner.plan(0)
    return median_ms(lambda: planner.plan(1), lambda: None, repeats=3)


def open_method(name: str, data: Dict, args, device: torch.device) -> Tuple[object, Iterator]:
    """Builds the method's loader: (the loader, an endless iterator of its batches)."""
    files = [os.path.join(data["image_root"], p) for p in data["paths"]]
    if name == "official":
        loader = official_loader(data["image_root"], data["relabel_root"], args.batch_size,
                                 args.threads, device)
        return loader, official_batches(loader, device)
    if name == "relabel_loader" or name.startswith("relabel_crops"):
        crops = int(name[len("relabel_crops"):]) if name.startswith("relabel_crops") else 1
        loader = ReLabelLoader(data["image_root"], data["store"], args.batch_size,
                               device=str(device), num_threads=args.threads, seed=args.seed,
                               num_crops=crops)
        return loader, endless(loader)
    if name == "plain_dali":
        loader = plain_dali.plain_dali_loader(files, device, args.batch_size, args.threads,
                                              args.seed)
        return loader, plain_dali.plain_dali_batches(loader)
    if name == "dali_decode":
        order = np.random.default_rng(args.seed).permutation(len(files))
        loader = plain_dali.build(plain_dali.decode_pipeline, [files[i] for i in order], device,
                                  args.batch_size, args.threads, args.seed)
        return loader, plain_dali.dali_decode_batches(loader)
    if name == "pil_decode":
        loader = torch.utils.data.DataLoader(
            PILDecodeDataset(files), batch_size=args.batch_size, shuffle=True,
            num_workers=args.threads, drop_last=True, persistent_workers=True)
        return loader, endless(loader)
    raise ValueError(f"unknown method {name!r}")


def run_method(name: str, data: Dict, args, device: torch.device) -> Dict:
    """Builds the method's loader, times it, shuts it down; returns its row."""
    sync = device_sync(device)
    extra: Dict = {}
    loader, batches = open_method(name, data, args, device)
    try:
        row = time_batches(batches, args.warmup, args.batches, sync)
        if name == "relabel_loader":
            # Diagnostic: the share of LabelPooling in a batch (gather from the mmap'ed store,
            # sparse kernel, softmax), on fresh random crops of random rows.
            gen = torch.Generator().manual_seed(args.seed)
            rows = torch.randint(0, len(loader.store), (args.batch_size,), generator=gen)
            boxes = random_boxes(args.batch_size, gen).to(device)
            flip = torch.zeros(args.batch_size, dtype=torch.bool)
            targets = loader.targets
            extra["targets_ms_per_batch"] = median_ms(
                lambda: targets(boxes, flip, rows), sync, repeats=20)
    finally:
        batches.close()
        del batches, loader
        gc.collect()
    row.update(extra)
    row["images"] = row["batches"] * args.batch_size
    row["images_per_s"] = row["images"] / row["seconds"]
    return row


def run_clean(name: str, data: Dict, args, device: torch.device) -> Dict:
    """run_method, repeated (up to --retries times) while other processes took more than
    --max-other-cpu % of the machine during the timed window; keeps the cleanest run."""
    attempts = []
    for attempt in range(1 + args.retries):
        if args.wait_idle > 0:
            busy = wait_until_idle(args.wait_idle, args.max_other_cpu)
            if busy is not None and busy > args.max_other_cpu:
                logger.warning("the machine stayed %.0f%% busy for %.0f s; timing %s anyway",
                               busy, args.wait_idle, name)
        row = run_method(name, data, args, device)
        attempts.append(row)
        other = interference(row)
        if other <= args.max_other_cpu:
            break
        logger.warning("%s: other processes used %.0f%% of the CPU while it was timed "
                       "(%.0f images/s)%s", name, other, row["images_per_s"],
                       ": timing it again" if attempt < args.retries else "")
    best = min(attempts, key=interference)
    return dict(best, attempts=len(attempts))


def paired_segments(data: Dict, args, device: torch.device) -> Dict:
    """ReLabelLoader against the plain DALI graph, closely interleaved.

    Both loaders are built and run one epoch (untimed); then they take turns: each segment
    waits SEGMENT_PAUSE_S for the other loader's prefetching to end, takes the SEGMENT_DRAIN
    batches its own queue holds and times --segment-batches batches. Each pair of adjacent
    segments gives one ratio of images/s, so that the machine's changing speed cancels out;
    the order within a pair alternates. Returns the segments' rates, the ratios and their
    geometric mean with a 95% interval.
    """
    sync = device_sync(device)
    opened = {name: open_method(name, data, args, device) for name in PAIRED}
    rates: Dict[str, List[float]] = {name: [] for name in PAIRED}
    other: List[float] = []
    try:
        for _, batches in opened.values():
            for _ in range(args.images // args.batch_size):
                next(batches)
        for pair in tqdm(range(args.pairs), desc="paired segments", unit="pair"):
            for name in PAIRED if pair % 2 == 0 else PAIRED[::-1]:
                time.sleep(SEGMENT_PAUSE_S)
                row = time_batches(opened[name][1], SEGMENT_DRAIN, args.segment_batches, sync)
                rates[name].append(row["batches"] * args.batch_size / row["seconds"])
                other.append(interference(row))
    finally:
        for _, batches in opened.values():
            batches.close()
        del opened
        gc.collect()
    ratio = ratio_interval(rates["relabel_loader"], rates["plain_dali"])
    return dict(pairs=args.pairs, segment_batches=args.segment_batches,
                drained_batches=SEGMENT_DRAIN, pause_s=SEGMENT_PAUSE_S,
                images_per_s={name: statistics.median(values) for name, values in rates.items()},
                segments_images_per_s=rates,
                percent_of_plain=ratio["percent"], percent_of_plain_ci95=ratio["percent_ci95"],
                median_other_cpu_percent=statistics.median(other))


def crops_summary(rows: Dict[str, Dict]) -> Dict:
    """Training samples per second of ReLabelLoader by num_crops (median round) and their
    ratios to the plain DALI graph and the official pipeline, each the median over rounds of
    the ratio within a round."""
    summary = {}
    for crops, name in CROPS.items():
        if name not in rows:
            continue
        mine = rows[name]["rounds_images_per_s"]
        entry = dict(method=name, samples_per_s=rows[name]["images_per_s"])
        for base, key in (("plain_dali", "percent_of_plain"), ("official", "percent_of_official")):
            if base in rows:
                entry[key] = 100 * statistics.median(
                    a / b for a, b in zip(mine, rows[base]["rounds_images_per_s"]))
        summary[str(crops)] = entry
    return summary


def boundary_waits(batches: Iterator, per_epoch: int, epochs: int,
                   sync) -> List[List[float]]:
    """Milliseconds each batch of `epochs` epochs took to arrive (waited on the device), the
    wait before an epoch's first batch included (the end of the last one, the new start)."""
    waits: List[List[float]] = []
    start = time.perf_counter()
    for _ in range(epochs):
        mine = []
        for _ in range(per_epoch):
            next(batches)
            sync()
            now = time.perf_counter()
            mine.append((now - start) * 1e3)
            start = now
        waits.append(mine)
    return waits


def boundary_summary(waits: List[List[float]]) -> Dict:
    """Around each boundary after the first epoch the longest wait, against the median wait
    of every batch after the first epoch."""
    steady = [w for epoch in waits[1:] for w in epoch]
    median = statistics.median(steady)
    boundaries = []
    for epoch in range(1, len(waits)):
        window = waits[epoch - 1][-BOUNDARY_BEFORE:] + waits[epoch][:BOUNDARY_AFTER]
        boundaries.append(dict(epoch=epoch, max_wait_ms=max(window),
                               first_batch_ms=waits[epoch][0]))
    longest = max(b["max_wait_ms"] for b in boundaries)
    return dict(epochs=len(waits), batches_per_epoch=len(waits[0]), median_wait_ms=median,
                max_boundary_wait_ms=longest, ratio_to_median=longest / median,
                within_ratio=BOUNDARY_WITHIN,
                within_twice_median=longest <= BOUNDARY_WITHIN * median,
                boundaries=boundaries, waits_ms=waits)


def epoch_boundary(data: Dict, args, device: torch.device,
                   methods: Sequence[str] = ("relabel_loader", "plain_dali")) -> Dict:
    """boundary_summary of each method over --boundary-epochs epochs (each method alone)."""
    sync = device_sync(device)
    result = {}
    for name in methods:
        loader, batches = open_method(name, data, args, device)
        try:
            per_epoch = len(loader)
            result[name] = boundary_summary(
                boundary_waits(batches, per_epoch, args.boundary_epochs, sync))
        finally:
            batches.close()
            del batches, loader
            gc.collect()
    return result


def official_targets_ms(data: Dict, args, device: torch.device) -> float:
    """Diagnostic: main-process milliseconds of the official target code for one batch."""
    sync = device_sync(device)
    dataset = official_dataset(data["image_root"], data["relabel_root"])
    samples = [dataset[i] for i in range(args.batch_size)]
    _, _, coords, label_maps = torch.utils.data.default_collate(samples)
    boxes = official_boxes(coords).to(device)
    return median_ms(lambda: official_targets(label_maps, boxes, device), sync, repeats=10)


def format_table(result: Dict) -> str:
    methods = result["methods"]
    # Mean time a batch, not the median wait: with N crops a run decodes N batches at once,
    # so N - 1 of every N batches are handed out without a wait.
    header = (f"{'method':<50} {'images/s':>9} {'ms/batch':>9} {'x official':>10} "
              f"{'% plain':>8} {'other CPU':>9}  rounds (images/s)")
    lines = [header, "-" * len(header)]
    plain = methods["plain_dali"]["images_per_s"]
    official = methods["official"]["images_per_s"]
    for name in METHODS:
        row = methods[name]
        lines.append(f"{METHOD_NAMES[name]:<50} {row['images_per_s']:>9.1f} "
                     f"{1000 * row['seconds'] / row['batches']:>9.1f} "
                     f"{row['images_per_s'] / official:>10.2f} "
                     f"{100 * row['images_per_s'] / plain:>7.1f}% "
                     f"{row.get('other_cpu_percent', float('nan')):>8.1f}%  "
                     + " ".join(f"{rate:.0f}" for rate in row["rounds_images_per_s"]))
    return "\n".join(lines)


def summary_line(summary: Dict) -> str:
    """What ReLabel costs, in words."""
    low, high = summary["percent_of_plain_ci95"]
    return (f"ReLabelLoader against the plain DALI graph, in {summary['pairs']} interleaved "
            f"pairs of segments: {summary['percent_of_plain']:.1f}% of its throughput (95% "
            f"interval {low:.1f}-{high:.1f}%; ReLabel costs "
            f"{summary['relabel_cost_percent']:.1f}%); {summary['ratio_vs_official']:.2f}x "
            "the official pipeline (median rounds)")


def boundary_line(row: Dict) -> str:
    """The epoch boundary, in words."""
    return (f"epoch boundary over {row['epochs'] - 1} boundaries: longest wait "
            f"{row['max_boundary_wait_ms']:.1f} ms against a median of "
            f"{row['median_wait_ms']:.1f} ms ({row['ratio_to_median']:.2f}x the median, "
            f"{'within' if row['within_twice_median'] else 'beyond'} "
            f"{row['within_ratio']:.0f}x)")


def plot(result: Dict, path: Path) -> None:
    methods = result["methods"]
    names = [n for n in METHODS if n not in CROPS.values() or n == "relabel_loader"]
    rates = [methods[n]["images_per_s"] for n in names]
    colors = ["tab:red", "tab:purple", "tab:green", "tab:blue", "tab:gray"]
    pairs = result["paired_segments"]
    fig, axes = report.subplots(2, 2, figsize=(16, 12), gridspec_kw=dict(width_ratios=[3, 2]))
    axes = axes.ravel()
    ax = axes[0]
    bars = ax.bar(range(len(names)), rates, color=colors)
    for bar, rate in zip(bars, rates):
        ax.text(bar.get_x() + bar.get_width() / 2, rate, f"{rate:.0f}", ha="center",
                va="bottom", fontsize=10)
    plain = methods["plain_dali"]["images_per_s"]
    ax.axhline(plain, color="tab:purple", linestyle="--", linewidth=1.2,
               label=f"plain DALI graph: {plain:.0f} images/s")
    summary = result["summary"]
    relabel = names.index("relabel_loader")
    ax.annotate(f"{summary['ratio_vs_official']:.2f}x official",
                xy=(relabel, rates[relabel] + 0.06 * max(rates)),
                xytext=(relabel, rates[relabel] + 0.2 * max(rates)),
                ha="center", fontsize=11, fontweight="bold",
                arrowprops=dict(arrowstyle="->", color="black"))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([METHOD_NAMES[n].replace(": ", ":\n", 1).replace(", ", ",\n", 1)
                        for n in names], fontsize=9)
    ax.set_ylabel("images / s (with targets for (a) and (c)), median round")
    ax.set_ylim(0, 1.4 * max(rates))
    settings = result["settings"]
    dataset = result["dataset"]
    ax.set_title(f"Training loaders on {result['machine']['device']} "
                 f"({settings['threads']} threads/workers, B={settings['batch_size']}, "
                 f"{dataset['num_images']} JPEGs, mean {dataset['mean_jpeg_kb']:.0f} KB)",
                 fontsize=11)
    ax.legend(loc="upper right")
    ax = axes[1]
    segments = pairs["segments_images_per_s"]
    ratios = 100 * np.array(segments["relabel_loader"]) / np.array(segments["plain_dali"])
    ax.plot(np.arange(1, len(ratios) + 1), ratios, "o", color="tab:green", markersize=3,
            alpha=0.6, label="one pair of adjacent segments")
    low, high = summary["percent_of_plain_ci95"]
    ax.axhspan(low, high, color="tab:green", alpha=0.2, label="95% interval")
    ax.axhline(summary["percent_of_plain"], color="tab:green", linewidth=1.5,
               label=f"geometric mean: {summary['percent_of_plain']:.1f}% "
                     f"({low:.1f}-{high:.1f}%)")
    ax.axhline(100, color="tab:purple", linestyle="--", linewidth=1.2,
               label="plain DALI graph")
    ax.set_xlabel(f"pair of segments ({pairs['segment_batches']} timed batches each)")
    ax.set_ylabel("ReLabelLoader, % of the plain DALI graph's images/s")
    ax.set_title("ReLabelLoader against the plain DALI graph, interleaved", fontsize=11)
    ax.legend(loc="lower right", fontsize=9)
    plot_crops(axes[2], result)
    plot_boundary(axes[3], result["epoch_boundary"])
    report.save_figure(fig, path)


def plot_crops(ax, result: Dict) -> None:
    """Training samples/s of ReLabelLoader by num_crops beside the plain graph and the
    official pipeline, with the ratios measured round by round."""
    methods, crops = result["methods"], result["summary"]["crops"]
    names = ["official", "plain_dali"] + [crops[n]["method"] for n in sorted(crops, key=int)]
    rates = [methods[n]["images_per_s"] for n in names]
    bars = ax.bar(range(len(names)), rates,
                  color=["tab:red", "tab:purple"] + ["tab:green"] * len(crops))
    for bar, name in zip(bars, names):
        entry = next((e for e in crops.values() if e["method"] == name), None)
        text = f"{bar.get_height():.0f}" + (f"\n{entry['percent_of_plain']:.0f}% of plain"
                                            if entry and "percent_of_plain" in entry else "")
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center",
                va="bottom", fontsize=9)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(["(a) official", "(b) plain DALI"]
                       + [f"ReLabelLoader\nnum_crops={n}" for n in sorted(crops, key=int)],
                       fontsize=9)
    ax.set_ylim(0, 1.3 * max(rates))
    ax.set_ylabel("training samples / s (median round)")
    ax.set_title("Several crops per decoded image (ratios within each round)", fontsize=11)


def plot_boundary(ax, boundary: Optional[Dict]) -> None:
    """Every batch's wait over the epochs, the boundaries marked, against the median."""
    if boundary is None:
        ax.axis("off")
        ax.set_title("Epoch boundaries: not measured (--boundary-epochs 0)", fontsize=11)
        return
    styles = {"relabel_loader": ("tab:green", "ReLabelLoader"),
              "plain_dali": ("tab:purple", "plain DALI graph")}
    for name, row in boundary.items():
        color, label = styles[name]
        waits = [w for epoch in row["waits_ms"] for w in epoch]
        ax.plot(np.arange(len(waits)), waits, ".-", color=color, markersize=3, linewidth=0.6,
                label=f"{label}: median {row['median_wait_ms']:.1f} ms, longest at a boundary "
                      f"{row['max_boundary_wait_ms']:.1f} ms ({row['ratio_to_median']:.2f}x)")
    row = boundary["relabel_loader"]
    per_epoch = row["batches_per_epoch"]
    for epoch in range(1, row["epochs"]):
        ax.axvline(epoch * per_epoch - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.axhline(row["within_ratio"] * row["median_wait_ms"], color="tab:green", linestyle="--",
               linewidth=1, label=f"{row['within_ratio']:.0f}x ReLabelLoader's median wait")
    ax.set_yscale("log")
    ax.set_xlabel("batch (dotted: epoch boundaries; the first epoch warms up)")
    ax.set_ylabel("wait for the batch (ms, log)")
    ax.set_title("Waits at epoch boundaries (the next epoch's pipeline starts ahead)",
                 fontsize=11)
    ax.legend(loc="best", fontsize=8)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line, checked; args.methods becomes a list, args.warmup and args.batches
    numbers."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_device_argument(parser, "device of images and targets; DALI decodes 'mixed' "
                                       "on cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="DataLoader workers W = DALI threads T = torch threads of the main "
                             f"process (default: os.cpu_count() = {os.cpu_count()})")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    parser.add_argument("--images", type=int, default=6400,
                        help="JPEGs in the benchmark set (default: 6400)")
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per method and round (default: all full batches of "
                             "one epoch after the warm-up)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed batches first: one epoch (training runs many, and "
                             "ReLabelLoader checks every image's size in its first), then one "
                             "per DataLoader worker, so no timed batch was prepared during the "
                             "warm-up (default: images // batch-size + max(2, threads))")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all methods; the median round counts (default: 3)")
    parser.add_argument("--pairs", type=int, default=150,
                        help="pairs of interleaved segments of ReLabelLoader and the plain DALI "
                             "graph that measure ReLabel's cost; 0: none (default: 150)")
    parser.add_argument("--segment-batches", type=int, default=18,
                        help="timed batches per segment, after the 2 its loader prefetched "
                             "while the other one ran (default: 18, about a second)")
    parser.add_argument("--boundary-epochs", type=int, default=5,
                        help="epochs over which the waits at epoch boundaries are timed (the "
                             "first warms up); 0: none (default: 5)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset to run (default: {','.join(METHODS)})")
    parser.add_argument("--source", choices=("photos", "synthetic"), default="photos",
                        help="photos: scikit-image/scikit-learn sample photographs (synthetic "
                             "when neither is installed); synthetic: textured images "
                             "(default: photos)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "dali-relabel" /
                                               "loader_bench"),
                        help="folder of the generated images and label maps "
                             "(default: ~/.cache/dali-relabel/loader_bench)")
    report.add_out_argument(parser, "loader_bench.json and .png")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and loaders (default: 0)")
    parser.add_argument("--max-other-cpu", type=float, default=10.0,
                        help="time a method again when processes outside the benchmark (any "
                             "PID namespace, read from /proc/stat) used more than this %% of "
                             "the machine while it was timed (default: 10)")
    parser.add_argument("--retries", type=int, default=2,
                        help="extra attempts per method and round under interference; the "
                             "least disturbed one counts (default: 2)")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="before each timed run, wait up to this many seconds for the "
                             "machine to be idle (below --max-other-cpu); 0: do not wait "
                             "(default: 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if min(args.threads, args.batch_size, args.rounds, args.segment_batches) < 1 or min(
            args.retries, args.pairs) < 0 or args.pairs == 1 or args.boundary_epochs in (1, 2) \
            or args.boundary_epochs < 0:
        parser.error("--threads, --batch-size, --rounds and --segment-batches must be >= 1, "
                     "--retries >= 0, --pairs 0 or >= 2, --boundary-epochs 0 or >= 3")
    crops = [crops for crops, name in CROPS.items() if name in methods]
    if any(args.batch_size % n for n in crops):
        parser.error(f"--batch-size {args.batch_size} must be a multiple of num_crops "
                     f"{crops} (the crops of an image sit in one batch)")
    per_epoch = args.images // args.batch_size
    if args.warmup is None:
        args.warmup = per_epoch + max(2, args.threads)
    if args.batches is None:  # the rest of the second epoch
        args.batches = per_epoch - args.warmup % per_epoch
    if args.batches < 1:
        parser.error(f"--images {args.images} at --batch-size {args.batch_size} leaves no timed "
                     f"batch after {args.warmup} warm-up batches")
    if args.warmup % per_epoch + args.batches > per_epoch:
        logger.warning("%d warm-up + %d timed batches cross the end of an epoch (%d batches): "
                       "the timing includes an epoch restart", args.warmup, args.batches,
                       per_epoch)
    args.methods = methods
    return args


def prepare(args) -> Tuple[Path, Dict, Dict]:
    """The JPEG set, checked against ImageFolder's and the store's lists and read once:
    (cache folder, its manifest, its locations)."""
    cache = Path(args.cache).expanduser()
    manifest = jpegs.prepare_dataset(cache, args.images, args.source, args.seed, args.threads)
    data = jpegs.locations(cache, args.images)
    folder_samples = [os.path.relpath(p, data["image_root"]).replace(os.sep, "/")
                      for p, _ in official_dataset(data["image_root"],
                                                   data["relabel_root"]).samples]
    with LabelMapStore.open(data["store"]) as store:
        store_paths = list(store.paths)
    if folder_samples != data["paths"] or store_paths != data["paths"]:
        raise RuntimeError(f"{cache}: the ImageFolder, the store and the benchmark disagree "
                           "about the image list; delete the cache folder")
    warmed = jpegs.warm_page_cache([cache / "images", cache / "relabel"],
                                   [cache / "labelmaps.h5"])
    logger.info("page cache warmed: read %.1f MB", warmed / 1e6)
    return cache, manifest, data


def median_rounds(rounds: Dict[str, List[Dict]]) -> Dict[str, Dict]:
    """Each method's median round, with every round's images/s and their spread."""
    rows = {}
    for name, runs_of in rounds.items():
        ordered = sorted(runs_of, key=lambda r: r["images_per_s"])
        rates = [r["images_per_s"] for r in runs_of]
        median = ordered[(len(ordered) - 1) // 2]
        rows[name] = dict(median, rounds_images_per_s=rates,
                          rounds_spread_percent=100 * (max(rates) - min(rates))
                          / median["images_per_s"])
        if rows[name]["rounds_spread_percent"] > SPREAD_WARNING_PERCENT:
            logger.warning("%s: the rounds differ by %.0f%% (%s images/s); the median round "
                           "counts", name,
                           rows[name]["rounds_spread_percent"],
                           ", ".join(f"{rate:.0f}" for rate in rates))
    return rows


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    methods = args.methods
    paired = args.pairs > 0 and set(PAIRED) <= set(methods)
    torch.set_num_threads(args.threads)
    # Recorded only: the 1-minute average lags; each timed run instead waits for an idle
    # machine and measures the CPU other processes take while it runs (/proc/stat).
    load_before = os.getloadavg()
    cache, manifest, data = prepare(args)

    rounds: Dict[str, List[Dict]] = {m: [] for m in methods}
    # Each round starts one method later, so that no method always follows the same one.
    runs = [(r, m) for r in range(args.rounds)
            for m in methods[r % len(methods):] + methods[:r % len(methods)]]
    for _, name in tqdm(runs, desc="loader_bench", unit="run"):
        rounds[name].append(run_clean(name, data, args, device))
    rows = median_rounds(rounds)
    if "official" in rows:
        rows["official"]["targets_ms_per_batch"] = official_targets_ms(data, args, device)
    summary: Dict = dict(plan_ms_imagenet=plan_ms(args.seed))
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    pairs = paired_segments(data, args, device) if paired else None
    crops = crops_summary(rows)
    if crops:
        summary["crops"] = crops
    boundary = None
    if args.boundary_epochs and "relabel_loader" in methods:
        boundary = epoch_boundary(data, args, device, [name for name in ("relabel_loader",
                                                                         "plain_dali")
                                                       if name in methods])
        relabel = boundary["relabel_loader"]
        summary.update(boundary_ratio_to_median=relabel["ratio_to_median"],
                       boundary_within_twice_median=relabel["within_twice_median"])
    if pairs is not None:
        summary.update(percent_of_plain=pairs["percent_of_plain"],
                       percent_of_plain_ci95=pairs["percent_of_plain_ci95"],
                       relabel_cost_percent=100 - pairs["percent_of_plain"], pairs=args.pairs)
    if {"official", "relabel_loader"} <= rate.keys():
        summary["ratio_vs_official"] = rate["relabel_loader"] / rate["official"]
    if {"dali_decode", "relabel_loader"} <= rate.keys():
        summary["percent_of_bare_decode"] = 100 * rate["relabel_loader"] / rate["dali_decode"]
    result = dict(
        machine=report.machine_info(device),
        settings=dict(threads=args.threads, dataloader_workers=args.threads,
                      dali_threads=args.threads, torch_threads=torch.get_num_threads(),
                      batch_size=args.batch_size, warmup_batches=args.warmup,
                      timed_batches=args.batches, rounds=args.rounds,
                      max_other_cpu_percent=args.max_other_cpu, retries=args.retries,
                      wait_idle_seconds=args.wait_idle, image_size=IMAGE_SIZE,
                      seed=args.seed, cache=jpegs.cache_name(cache),
                      load_average_before=load_before, load_average_after=os.getloadavg()),
        dataset=dict(num_images=args.images, source=manifest["params"]["source"],
                     source_photos=manifest["params"]["source_names"],
                     mean_jpeg_kb=manifest["mean_jpeg_bytes"] / 1e3,
                     mean_width=manifest["mean_width"], mean_height=manifest["mean_height"],
                     class_folders=jpegs.CLASS_FOLDERS, num_classes=jpegs.NUM_CLASSES,
                     topk=jpegs.TOPK, map_size=jpegs.MAP_SIZE,
                     classes_per_image=jpegs.CLASSES_PER_IMAGE,
                     generation=manifest["params"]),
        methods=rows,
        paired_segments=pairs,
        epoch_boundary=boundary,
        summary=summary,
    )
    complete = set(METHODS) <= rows.keys() and pairs is not None
    json_path, png_path = report.write_results(
        Path(args.out), "loader_bench", result,
        (lambda path: plot(result, path)) if complete else None)
    if complete:
        logger.info(format_table(result))
    else:
        for name, row in rows.items():
            logger.info("%-50s %9.1f images/s", METHOD_NAMES[name], row["images_per_s"])

    logger.info("\n%d JPEGs (%s, mean %.1f KB, %.0f x %.0f px), B=%d, %d threads/workers on %s, "
                "%d warm-up + %d timed batches x %d round(s)", args.images,
                result["dataset"]["source"], result["dataset"]["mean_jpeg_kb"],
                manifest["mean_width"], manifest["mean_height"], args.batch_size, args.threads,
                device, args.warmup, args.batches, args.rounds)
    if "targets_ms_per_batch" in rows.get("official", {}):
        logger.info("targets alone, per batch of %d: official %.2f ms (main process)%s",
                    args.batch_size, rows["official"]["targets_ms_per_batch"],
                    f", ReLabelLoader {rows['relabel_loader']['targets_ms_per_batch']:.2f} ms"
                    if "relabel_loader" in rows else "")
    if {"percent_of_plain", "ratio_vs_official"} <= summary.keys():
        logger.info(summary_line(summary))
    for crops, entry in summary.get("crops", {}).items():
        logger.info("num_crops=%s: %.0f training samples/s%s%s", crops, entry["samples_per_s"],
                    f", {entry['percent_of_plain']:.1f}% of the plain DALI graph"
                    if "percent_of_plain" in entry else "",
                    f", {entry['percent_of_official'] / 100:.2f}x the official pipeline"
                    if "percent_of_official" in entry else "")
    if boundary is not None:
        logger.info(boundary_line(boundary["relabel_loader"]))
    logger.info("planning one epoch of ImageNet (%d images) on one rank: %.0f ms",
                IMAGENET_TRAIN_IMAGES, summary["plan_ms_imagenet"])
    logger.info("wrote %s%s", json_path, f" and {png_path}" if png_path else "")
    return result


if __name__ == "__main__":
    main()
