"""The ReLabel paper's factor analysis in miniature, with paired seeds.

Yun et al. (CVPR 2021) train ResNet-50 on ImageNet with five kinds of target (Table 4:
localized multi-labels, i.e. ReLabel, 78.9; global multi 78.5; localized single 78.4; global
single 77.5; original 77.5) and with CutMix (Table 8: 80.2 with ReLabel against 78.6). This
trains one small model under each, on a cluttered synthetic ImageNet where random crops often
miss the labelled object, and measures:

- the premise: how often a random crop (torchvision's RandomResizedCrop, as the loader plans
  it) holds less than half of the labelled object, or more of another class than of it,
  from the crop windows and the exact object coverage of the label maps;
- validation top-1 (the largest object) and ReaL-style accuracy (any object in the image);
- every ordering the paper reports as a paired difference: seed s gives every configuration
  the same initialisation, image order, crops and flips, so the differences are measured
  within a seed and their standard error is over seeds; each is called shown, not shown or
  reversed by its 95% interval;
- several crops per decoded image (repeated augmentation): localized_multi with num_crops=4
  against num_crops=1 at the same number of steps (an epoch takes a quarter of the images,
  four crops each), in top-1 and in training time (the steps' wall clock, paired ratio).

`--configs` trains a subset (the comparisons between the trained ones are made); the test
suite trains two configurations that way.

Outputs: benchmarks/results/ablation.json (every run), ablation.png and ablation.md (the
table and the verdicts, computed from the runs; `--update-docs` copies it into
docs/benchmarks.md).

    python benchmarks/ablation.py [--seeds 4] [--epochs 12] [--configs original,...]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import h5py
import numpy as np
import torch
from tqdm import tqdm

from dali_relabel import LabelMapStore, label_pooling
from dali_relabel.files import atomic_path
from dali_relabel.loading import random_resized_crop_windows
from dali_relabel.tools import make_synthetic_imagenet
# Not exported by dali_relabel.tools (yet): the synthetic maps' logit per share of a cell.
from dali_relabel.tools import LOGIT_SCALE
from harness import report
from harness.stats import mean_interval, ratio_interval
from harness.training import run_training

logger = logging.getLogger("ablation")
RESULTS = report.RESULTS
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
DOCS_START = "<!-- ablation table: written by benchmarks/ablation.py --update-docs -->"
DOCS_END = "<!-- end of ablation table -->"

# Scenes on which random crops often miss the labelled object: 3-6 objects, the labelled one
# 0.3-0.5 of the shorter side (the default scenes: 1-4 objects, 0.5-0.85).
CLUTTERED = dict(objects=(3, 6), main_side=(0.3, 0.5), other_side=(0.2, 0.38))
# 6000 validation images: with 2000, the binomial noise of top-1 (0.7 pp at 90%) was as large
# as the seeds' spread of the differences.
DATASET = dict(num_classes=10, train_per_class=160, val_per_class=600, **CLUTTERED)
# One recipe for every configuration; no label smoothing, as the paper's "original" row.
RECIPE = dict(model="test_resnet", image_size=64, val_resize=72, batch_size=64, lr=0.1,
              warmup_epochs=1.0)
# name -> (label mode, extra trainer flags, paper's ResNet-50 top-1 or None)
CONFIGS: Dict[str, Tuple[str, Tuple[str, ...], Optional[float]]] = {
    "original": ("original", (), 77.5),
    "global_single": ("global_single", (), 77.5),
    "global_multi": ("global_multi", (), 78.5),
    "localized_single": ("localized_single", (), 78.4),
    "localized_multi": ("localized_multi", (), 78.9),
    "original + CutMix": ("original", ("--cutmix", "1.0"), 78.6),
    "localized_multi + CutMix": ("localized_multi", ("--cutmix", "1.0"), 80.2),
    # Not in the paper: four crops per decoded image, each its own target (same steps).
    "localized_multi (4 crops)": ("localized_multi", ("--num-crops", "4"), None),
}
# (better, worse): every ordering the paper reports, each tested as a paired difference:
# ReLabel against the original labels, localized against global targets, ReLabel with CutMix
# against CutMix; then multi against single labels, and CutMix against none.
COMPARISONS = (
    ("localized_multi", "original"),
    ("localized_multi", "global_multi"),
    ("localized_single", "global_single"),
    ("localized_multi + CutMix", "original + CutMix"),
    ("localized_multi", "localized_single"),
    ("global_multi", "global_single"),
    ("original + CutMix", "original"),
    ("localized_multi + CutMix", "localized_multi"),
)
# Questions of this project, not orderings of the paper: (other, baseline), compared in top-1
# and in training time.
CROPS_COMPARISONS = (("localized_multi (4 crops)", "localized_multi"),)


def crop_coverage(coverage: np.ndarray, classes: np.ndarray, sizes: np.ndarray,
                  windows: np.ndarray, num_classes: int) -> np.ndarray:
    """Area of every class inside every crop, in map cells.

    A class covers each cell uniformly as far as the map can tell, so its area inside a
    crop is the sum over cells of its coverage times the share of the cell inside the crop.

    Args:
        coverage (ndarray[N, K, M, M]): share of each cell covered by each listed class.
        classes (ndarray[N, K, M, M]): the class each entry of `coverage` is about.
        sizes (ndarray[N, 2]): image (height, width) in pixels.
        windows (ndarray[N, 4]): crops (y, x, h, w) in pixels.
        num_classes: C.

    Returns:
        ndarray[N, C] float64.
    """
    n, _, cells, _ = coverage.shape
    y, x, h, w = windows.T.astype(np.float64)
    steps = np.arange(cells + 1)
    cell_h, cell_w = sizes[:, :1] / cells, sizes[:, 1:] / cells
    edges_y, edges_x = steps * cell_h, steps * cell_w
    # Share of each cell row (column) inside the crop: the overlap of [y, y + h) with the
    # row's interval, over the row's height.
    rows = np.clip(np.minimum(edges_y[:, 1:], (y + h)[:, None])
                   - np.maximum(edges_y[:, :-1], y[:, None]), 0, None) / cell_h
    cols = np.clip(np.minimum(edges_x[:, 1:], (x + w)[:, None])
                   - np.maximum(edges_x[:, :-1], x[:, None]), 0, None) / cell_w
    inside_cell = rows[:, :, None] * cols[:, None, :]  # [N, M, M]
    flat = np.arange(n)[:, None, None, None] * num_classes + classes
    weights = coverage * inside_cell[:, None]
    return np.bincount(flat.ravel(), weights.ravel(), n * num_classes).reshape(n, num_classes)


def crop_statistics(labelmaps: str, *, draws: int = 4, seed: int = 0,
                    scale: Tuple[float, float] = (0.08, 1.0),
                    ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Dict[str, float]:
    """How often a random crop misses the labelled object, from the exact coverage that the
    synthetic label maps store (logit = LOGIT_SCALE * share of the cell covered).

    Crops are `draws` windows per training image from the loader's own planner
    (torchvision's RandomResizedCrop rules).

    Returns:
        less_than_half: share of crops holding less than half of the labelled object's area;
        other_class_more: share of crops holding more area of another class than of it;
        crops: how many crops were measured.
    """
    with h5py.File(labelmaps, "r") as f:
        coverage = f["values"][:].astype(np.float64) / LOGIT_SCALE
        classes = f["indices"][:].astype(np.int64)
        labels = f["labels"][:].astype(np.int64)
        sizes = f["sizes"][:].astype(np.int64)
        num_classes = len(f["classes"])
    n = len(labels)
    whole = np.stack([np.zeros(n), np.zeros(n), sizes[:, 0], sizes[:, 1]], axis=1)
    total = crop_coverage(coverage, classes, sizes, whole, num_classes)
    rng = np.random.default_rng(seed)
    less_than_half = other_more = 0
    for _ in range(draws):
        windows = random_resized_crop_windows(sizes, scale, ratio, rng)
        inside = crop_coverage(coverage, classes, sizes, windows, num_classes)
        labelled = inside[np.arange(n), labels]
        less_than_half += int((labelled < 0.5 * total[np.arange(n), labels]).sum())
        inside[np.arange(n), labels] = -1.0
        other_more += int((inside.max(axis=1) > labelled).sum())
    crops = n * draws
    return dict(less_than_half=less_than_half / crops, other_class_more=other_more / crops,
                crops=crops)


def target_statistics(labelmaps: str, *, seed: int = 0) -> Dict[str, float]:
    """What the targets look like, by the loader's own LabelPooling: over every training
    image's whole map (the global modes) and over one planned random crop per image.

    Returns:
        single_matches_original: share of images whose global_single target (the top class
            of the pooled map) is the original label;
        global_multi_label_weight: mean weight of the original label in the global_multi
            target (the softmax of the pooled map);
        localized_multi_top_weight: mean weight of the top class in the localized_multi
            target of a random crop (localized_single puts 1 there).
    """
    with LabelMapStore.open(labelmaps, placement="memory") as store:
        n, rows = len(store), torch.arange(len(store))
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(n, 4)
        pooled = label_pooling(store.values, store.indices, whole,
                               num_classes=store.num_classes, mode="softmax")
        sizes = store.sizes.numpy().astype(np.float64)
        windows = random_resized_crop_windows(sizes, (0.08, 1.0), (3 / 4, 4 / 3),
                                              np.random.default_rng(seed)).astype(np.float64)
        y, x, h, w = windows.T
        height, width = sizes[:, 0], sizes[:, 1]
        boxes = torch.from_numpy(np.stack([x / width, y / height, (x + w) / width,
                                           (y + h) / height], axis=1)).float()
        crops = label_pooling(store.values, store.indices, boxes,
                              num_classes=store.num_classes, mode="softmax")
        return dict(
            single_matches_original=float((pooled.argmax(1) == store.labels).double().mean()),
            global_multi_label_weight=float(pooled[rows, store.labels].double().mean()),
            localized_multi_top_weight=float(crops.max(1).values.double().mean()))


def paired_difference(better: Sequence[float], worse: Sequence[float]) -> Dict[str, Any]:
    """Mean of the per-seed differences, its standard error and 95% interval (Student's t),
    and whether the mean exceeds two standard errors.

    Raises:
        ValueError: `better` and `worse` do not hold one value per seed each.
    """
    if len(better) != len(worse) or len(better) < 2:
        raise ValueError(f"better, worse: expected one value per seed each, at least 2, found "
                         f"{len(better)} and {len(worse)}")
    diffs = [b - w for b, w in zip(better, worse, strict=True)]
    interval = mean_interval(diffs)
    return dict(diffs=diffs, **interval,
                beyond_two_se=bool(interval["mean"] > 2 * interval["se"]))


def summarize(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and standard error over seeds (None for one seed)."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return dict(mean=statistics.mean(values), se=se, values=list(values))


def compare(configs: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every ordering of COMPARISONS whose two configurations ran, as a paired difference
    of top-1 over seeds, with the paper's difference beside it; then CROPS_COMPARISONS
    (paper None), with the paired ratio of their training times."""
    rows = []
    for better, worse in COMPARISONS + CROPS_COMPARISONS:
        if better not in configs or worse not in configs:
            continue
        paper = (None if CONFIGS[better][2] is None
                 else CONFIGS[better][2] - CONFIGS[worse][2])
        row = dict(better=better, worse=worse, paper=paper,
                   **paired_difference(configs[better]["val_top1"]["values"],
                                       configs[worse]["val_top1"]["values"]))
        if paper is None and "train_seconds" in configs[better]:
            row["train_time"] = ratio_interval(configs[better]["train_seconds"]["values"],
                                               configs[worse]["train_seconds"]["values"])
        rows.append(row)
    return rows


def verdict(comparison: Dict[str, Any]) -> str:
    """Plain words for one paired comparison, from its 95% interval (against the paper's
    ordering where the paper reports one)."""
    low, high = comparison["ci95"]
    paper = comparison.get("paper") is not None
    if low > 0:
        return ("reappears: " if paper else "") + "ahead, the 95% interval above 0"
    if high < 0:
        return ("reversed here: " if paper else "") + "behind, the 95% interval below 0"
    return ("not shown: " if paper else "no difference shown: ") + "the 95% interval holds 0"


def target_note(targets: Dict[str, float]) -> str:
    """What the global and localized targets look like on these scenes, in words."""
    if targets["single_matches_original"] == 1.0:
        note = ("global_single's target is the original label for every training image here "
                "(the largest object also has the largest pooled logit), so its row is the "
                "original row's runs.")
    else:
        note = (f"global_single's target is the original label for "
                f"{100 * targets['single_matches_original']:.1f}% of the training images.")
    return note + (
        f" The synthetic maps' logits are {LOGIT_SCALE:g} x the share of a cell an object "
        f"covers, so their softmax targets are soft: global_multi's gives the original label "
        f"{targets['global_multi_label_weight']:.2f} on average (a whole cluttered scene), "
        f"localized_multi's gives a random crop's top class "
        f"{targets['localized_multi_top_weight']:.2f}, where localized_single gives 1.")


def mean_se(stat: Dict[str, Any]) -> str:
    """'mean ± se', or the mean alone for one seed."""
    if stat["se"] is None:
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['se']:.1f}"


def render_table(result: Dict[str, Any]) -> str:
    """The Markdown table and verdicts of a result (what --update-docs writes)."""
    s, premise = result["settings"], result["premise"]
    lines = [
        f"{s['model']} at {s['image_size']} px, {s['epochs']} epochs of "
        f"{s['train_images']} cluttered synthetic images, {s['seeds']} paired seeds, "
        f"{s['val_images']} validation images; {result['minutes']:.1f} min on "
        f"{result['machine']}. A random crop holds less than half of the labelled object in "
        f"{100 * premise['cluttered']['less_than_half']:.0f}% of cases and more of another "
        f"class than of it in {100 * premise['cluttered']['other_class_more']:.0f}% "
        f"(default demo scenes: {100 * premise['default']['less_than_half']:.0f}% and "
        f"{100 * premise['default']['other_class_more']:.0f}%).",
        "",
        "| targets | top-1 (%) | ReaL (%) | paper top-1 (ResNet-50, ImageNet) |",
        "|---|---|---|---|",
    ]
    for name, row in result["configs"].items():
        top1, real = row["val_top1"], row["val_real"]
        paper = "—" if row["paper_top1"] is None else f"{row['paper_top1']:.1f}"
        lines.append(f"| {name} | {mean_se(top1)} | {mean_se(real)} | {paper} |")
    lines += ["", "| comparison (paired over seeds) | top-1 difference (pp) | 95% interval | "
                  "paper | verdict |", "|---|---|---|---|---|"]
    for c in result["comparisons"]:
        paper = "—" if c["paper"] is None else f"{c['paper']:+.1f}"
        lines.append(f"| {c['better']} vs {c['worse']} | {c['mean']:+.2f} ± {c['se']:.2f} | "
                     f"[{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}] | {paper} | "
                     f"{verdict(c)} |")
    papers = [c for c in result["comparisons"] if c["paper"] is not None]
    shown = [c for c in papers if c["ci95"][0] > 0]
    reversed_ = [f"{c['better']} vs {c['worse']}" for c in papers if c["ci95"][1] < 0]
    summary = (f"{len(shown)} of the paper's {len(papers)} orderings reappear "
               f"with their 95% interval above 0" if s["seeds"] > 1 else
               "One seed: no standard errors and no paired comparisons")
    if reversed_:
        summary += "; reversed here: " + ", ".join(reversed_)
    if "original + CutMix vs original" in reversed_:
        summary += (f" (CutMix, a regularizer, trains {result['settings']['epochs']} epochs "
                    f"here; the paper's runs take 300)")
    real = [row["val_real"]["mean"] for row in result["configs"].values()]
    if min(real) > 99.0:
        summary += (". ReaL accuracy (a prediction counts when its class is anywhere in the "
                    "image) is at its ceiling on these scenes")
    lines += ["", f"± is one standard error over seeds. {summary}. "
                  f"{target_note(result['targets'])}"]
    lines += [crops_note(c, result["settings"]) for c in result["comparisons"]
              if "train_time" in c]
    return "\n".join(lines) + "\n"


def crops_note(comparison: Dict[str, Any], settings: Dict[str, Any]) -> str:
    """Several crops per decoded image against one, in top-1 and training time, in words."""
    time = comparison["train_time"]
    low, high = time["percent_ci95"]
    return (f"\n{comparison['better']} against {comparison['worse']}, the same "
            f"{settings['epochs']} epochs of steps (an epoch takes a quarter of the images, "
            f"four crops each): top-1 {comparison['mean']:+.2f} ± {comparison['se']:.2f} pp "
            f"({verdict(comparison)}); training time (the steps' wall clock) "
            f"{time['percent']:.0f}% of one crop's (95% interval {low:.0f}-{high:.0f}%).")


def update_docs(table: str, docs: Path = DOCS) -> None:
    """Replaces the docs' ablation table (between its two marker lines) with `table`."""
    text = docs.read_text(encoding="utf-8")
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start < 0 or end < start:
        raise ValueError(f"{docs}: expected the marker lines {DOCS_START!r} and "
                         f"{DOCS_END!r} around the ablation table")
    text = text[:start + len(DOCS_START)] + "\n\n" + table + "\n" + text[end:]
    with atomic_path(docs) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def paper_label(top1: Optional[float]) -> str:
    return "\n(not in the paper)" if top1 is None else f"\n(paper {top1:.1f})"


def plot(result: Dict[str, Any], path: Path) -> None:
    """Top-1 per configuration with the paper's beside it, and the paired differences."""
    names = list(result["configs"])
    fig, (left, right) = report.subplots(1, 2, figsize=(14, 5.5),
                                         gridspec_kw=dict(width_ratios=[3, 2]))
    means = [result["configs"][n]["val_top1"]["mean"] for n in names]
    ses = [result["configs"][n]["val_top1"]["se"] or 0.0 for n in names]
    xs = np.arange(len(names))
    left.bar(xs, means, 0.6, yerr=ses, capsize=4, color="tab:blue",
             label="ours: top-1, mean ± SE over seeds")
    for x, mean, se in zip(xs, means, ses):
        left.text(x, mean + se + 0.3, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    low = min(m - s for m, s in zip(means, ses))
    left.set_ylim(max(0.0, low - 5), min(100.0, max(means) + 4))
    left.set_xticks(xs)
    left.set_xticklabels([
        n.replace(" + ", "\n+ ") + ("\n(original's runs)" if not result["configs"][n]["trained"]
                                    else "") + paper_label(result["configs"][n]["paper_top1"])
        for n in names], fontsize=8)
    left.set_ylabel("validation top-1 (%)")
    left.set_title("Top-1 per target; the paper's ResNet-50 ImageNet top-1 under each name",
                   fontsize=10, pad=28)
    left.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8, frameon=False)

    plot_comparisons(right, result["comparisons"])
    fig.suptitle(f"ReLabel's factor analysis in miniature: {result['settings']['model']}, "
                 f"{result['settings']['seeds']} paired seeds", fontsize=11)
    report.save_figure(fig, path)


def plot_comparisons(right, comps: List[Dict[str, Any]]) -> None:
    """The paired differences with their 95% intervals, the paper's beside them."""
    if not comps:
        right.axis("off")
        right.set_title("One seed: no paired differences", fontsize=10)
        return
    ys = np.arange(len(comps))[::-1]
    ours = [c["mean"] for c in comps]
    err = [[c["mean"] - c["ci95"][0] for c in comps], [c["ci95"][1] - c["mean"] for c in comps]]
    right.errorbar(ours, ys + 0.12, xerr=err, fmt="o", color="tab:blue", capsize=4,
                   label="ours: paired difference, 95% interval")
    papers = [(y, c["paper"]) for y, c in zip(ys, comps) if c["paper"] is not None]
    right.plot([p for _, p in papers], [y - 0.12 for y, _ in papers], "s", color="tab:orange",
               label="paper (ResNet-50, ImageNet)")
    for y, c in zip(ys, comps):
        right.text(c["ci95"][1], y + 0.12, f"  {c['mean']:+.1f}", va="center", fontsize=8)
    right.axvline(0.0, color="grey", lw=0.8)
    low = min([0.0] + [c["ci95"][0] for c in comps] + [p for _, p in papers])
    high = max(c["ci95"][1] for c in comps)
    right.set_xlim(low - 0.05 * (high - low), high + 0.15 * (high - low))
    right.set_yticks(ys)
    right.set_yticklabels([f"{c['better']}\n- {c['worse']}" for c in comps], fontsize=8)
    right.set_xlabel("top-1 difference (pp)")
    right.set_ylim(-0.8, len(comps) - 0.2)
    right.set_title("Paired differences", fontsize=10)
    right.legend(loc="lower center", bbox_to_anchor=(0.5, 1.06), fontsize=8, ncol=1)


def train_one(name: str, seed: int, dataset: Any, args: argparse.Namespace) -> Dict[str, float]:
    """One run of train/run.py (a child process) for configuration `name`: its final
    validation accuracies, the training steps' wall clock (data waits included; evaluation
    not) summed over epochs, and the whole run's (a child process: start-up included)."""
    mode, extra, _ = CONFIGS[name]
    folder = re.sub(r"[^\w.+-]+", "_", name.replace(" + ", "+")).strip("_")
    output = os.path.join(args.work, f"{folder}-seed{seed}")
    os.makedirs(output, exist_ok=True)
    for stale in ("metrics.jsonl", "last.pt", "best.pt"):  # a fresh run each time
        if os.path.exists(os.path.join(output, stale)):
            os.remove(os.path.join(output, stale))
    argv = ["--data", dataset.train_root, "--labelmaps", dataset.labelmaps,
            "--val-data", dataset.val_root, "--real-labels", dataset.real_labels,
            "--label-mode", mode, "--seed", str(seed), "--epochs", str(args.epochs),
            "--eval-every", str(args.epochs), "--smoothing", "0", "--output", output,
            "--no-progress", "--device", "cpu", *extra]
    for key, value in RECIPE.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    run = run_training(argv, output)
    record = run.last()
    return dict({key: record[key] for key in ("val_top1", "val_top5", "val_real")},
                train_seconds=sum(m["steps"] * m["step_ms"] for m in run.metrics) / 1e3,
                run_seconds=run.seconds)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Builds the data, measures the premise, trains every configuration under every seed
    (or reads an earlier ablation.json), and writes the results."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=4,
                        help="paired seeds; 1 trains once, without standard errors or "
                             "comparisons (default: 4)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated configurations to train (default: all: "
                             f"{','.join(CONFIGS)})")
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run (default: 12)")
    parser.add_argument("--train-per-class", type=int, default=DATASET["train_per_class"],
                        help=f"training images per class (default: "
                             f"{DATASET['train_per_class']})")
    parser.add_argument("--val-per-class", type=int, default=DATASET["val_per_class"],
                        help=f"validation images per class (default: "
                             f"{DATASET['val_per_class']})")
    parser.add_argument("--data", default=None,
                        help="folder of the synthetic data set (default: a cache folder)")
    report.add_out_argument(parser, "ablation.json, .png and .md")
    parser.add_argument("--work", default="output/ablation",
                        help="folder of the runs' outputs (default: output/ablation)")
    parser.add_argument("--update-docs", action="store_true",
                        help="also write the table into docs/benchmarks.md")
    parser.add_argument("--from-json", metavar="FILE",
                        help="train nothing: compare and render the runs of an earlier "
                             "ablation.json again (default: train)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["comparisons"] = compare(result["configs"])
        write_results(result, Path(args.out), args.update_docs)
        return result
    if args.seeds < 1:
        parser.error(f"--seeds: expected at least 1, got {args.seeds}")
    selected = [name.strip() for name in args.configs.split(",") if name.strip()]
    if not selected or set(selected) - set(CONFIGS):
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}; got {args.configs!r}")
    if args.epochs < 1:
        parser.error(f"--epochs: expected at least 1, got {args.epochs}")
    start = time.perf_counter()
    spec = dict(DATASET, train_per_class=args.train_per_class,
                val_per_class=args.val_per_class)
    dataset = make_synthetic_imagenet(args.data, **spec)
    premise = dict(cluttered=crop_statistics(dataset.labelmaps),
                   default=crop_statistics(make_synthetic_imagenet(progress=False).labelmaps))
    logger.info("random crops holding less than half of the labelled object: %.0f%% "
                "(default scenes %.0f%%); more of another class: %.0f%% (default %.0f%%)",
                100 * premise["cluttered"]["less_than_half"],
                100 * premise["default"]["less_than_half"],
                100 * premise["cluttered"]["other_class_more"],
                100 * premise["default"]["other_class_more"])
    targets = target_statistics(dataset.labelmaps)
    # Identical targets give identical runs: global_single is trained only when they differ
    # (or when the original is not trained).
    trained = [name for name in CONFIGS if name in selected and not (
        name == "global_single" and targets["single_matches_original"] == 1.0
        and "original" in selected)]
    runs: List[Dict[str, Any]] = []
    with tqdm(total=args.seeds * len(trained), desc="ablation runs", unit="run") as bar:
        for seed in range(args.seeds):
            for name in trained:
                record = train_one(name, seed, dataset, args)
                runs.append(dict(config=name, seed=seed, **record))
                bar.set_postfix_str(f"{name} seed {seed}: top-1 {record['val_top1']:.1f}")
                bar.update()
    by_config: Dict[str, Dict[str, Any]] = {}
    for name, (mode, extra, paper) in CONFIGS.items():
        if name not in selected:
            continue
        source = "original" if name not in trained else name
        mine = sorted((r for r in runs if r["config"] == source), key=lambda r: r["seed"])
        by_config[name] = dict(label_mode=mode, flags=list(extra), paper_top1=paper,
                               trained=name in trained,
                               **{key: summarize([r[key] for r in mine])
                                  for key in ("val_top1", "val_real", "val_top5",
                                              "train_seconds")})
    val_images = len(dataset.classes) * args.val_per_class
    result = dict(
        settings=dict(seeds=args.seeds, epochs=args.epochs, **RECIPE,
                      train_images=len(dataset.classes) * args.train_per_class,
                      val_images=val_images, dataset={k: list(v) if isinstance(v, tuple)
                                                      else v for k, v in spec.items()}),
        machine=f"{os.cpu_count()} CPU cores", premise=premise,
        targets=targets, runs=runs, configs=by_config,
        comparisons=compare(by_config) if args.seeds > 1 else [],
        minutes=(time.perf_counter() - start) / 60)
    write_results(result, Path(args.out), args.update_docs)
    return result


def write_results(result: Dict[str, Any], out: Path, docs: bool) -> None:
    """ablation.json, .md and .png in `out`, and the docs' table when `docs`."""
    report.write_results(out, "ablation", result, lambda path: plot(result, path))
    table = render_table(result)
    (out / "ablation.md").write_text(table)
    if docs:
        update_docs(table)
    logger.info("\n%s\nwrote %s, %s and %s", table, out / "ablation.json",
                out / "ablation.png", out / "ablation.md")


if __name__ == "__main__":
    main()
