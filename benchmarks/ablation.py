"""The ReLabel paper's factor analysis in miniature, on the synthetic multi-object ImageNet.

Yun et al. (CVPR 2021, Table 4, ResNet-50 top-1): localized multi-labels (ReLabel) 78.9,
localized single 78.4, global multi 78.5, global single 77.5, original 77.5. This trains the
same small model with the same budget and seeds under each of the five label modes of
ReLabelLoader and reports validation top-1 and multi-label (ReaL-style) accuracy, mean and
spread over the seeds, as a table, JSON and a PNG, and says whether the paper's ordering
(localized multi best, original and global single worst) reappears.

    python benchmarks/ablation.py [--seeds 3] [--epochs 8]
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import run  # noqa: E402

from dali_relabel import LABEL_MODES  # noqa: E402

logger = logging.getLogger("ablation")
PAPER_TOP1 = dict(localized_multi=78.9, localized_single=78.4, global_multi=78.5,
                  global_single=77.5, original=77.5)


def summarize(values: List[float]) -> Dict[str, float]:
    return dict(mean=statistics.mean(values),
                std=statistics.stdev(values) if len(values) > 1 else 0.0,
                values=values)


def ordering_verdict(results: Dict[str, Dict]) -> str:
    """Plain words on whether the paper's ordering reappears, and whether the seeds' spread
    lets one tell."""
    top1 = {mode: results[mode]["val_top1"]["mean"] for mode in LABEL_MODES}
    spread = {mode: results[mode]["val_top1"]["std"] for mode in LABEL_MODES}
    ranked = sorted(top1, key=top1.get, reverse=True)
    paper_ranked = sorted(PAPER_TOP1, key=PAPER_TOP1.get, reverse=True)
    baseline = max(("global_single", "original"), key=top1.get)
    gain = top1["localized_multi"] - top1[baseline]
    noise = spread["localized_multi"] + spread[baseline]
    if gain > noise:
        headline = "reappears, by more than the seeds' spread"
    elif gain > 0:
        headline = (f"reappears in the means but not beyond the seeds' spread ({gain:+.1f} pp "
                    f"against ±{noise:.1f} pp): not conclusive")
    else:
        headline = f"does NOT reappear ({gain:+.1f} pp)"
    full = "reappears" if ranked == paper_ranked else "does NOT reappear"
    return (f"Ranking here: {' > '.join(ranked)}; the paper's: {' > '.join(paper_ranked)}: "
            f"the full ordering {full}. The paper's headline, localized multi-labels above "
            f"the single global labels ({baseline} here), {headline}.")


def plot(results: Dict[str, Dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.38
    for offset, (key, name, color) in enumerate([("val_top1", "top-1", "tab:blue"),
                                                 ("val_real", "multi-label (ReaL)", "tab:green")]):
        means = [results[mode][key]["mean"] for mode in LABEL_MODES]
        stds = [results[mode][key]["std"] for mode in LABEL_MODES]
        xs = [i + (offset - 0.5) * width for i in range(len(LABEL_MODES))]
        ax.bar(xs, means, width, yerr=stds, capsize=4, label=name, color=color)
        for x, mean in zip(xs, means):
            ax.text(x, mean + 1, f"{mean:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(LABEL_MODES)))
    ax.set_xticklabels([f"{mode}\n(paper {PAPER_TOP1[mode]})" for mode in LABEL_MODES])
    ax.set_ylabel("validation accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per mode (default: 3)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default: 8)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="folder for ablation.json and .png (default: benchmarks/results)")
    parser.add_argument("--work", default="output/ablation",
                        help="folder of the runs' outputs (default: output/ablation)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    runs: Dict[str, List[Dict]] = {mode: [] for mode in LABEL_MODES}
    for seed in range(args.seeds):
        for mode in LABEL_MODES:
            output = os.path.join(args.work, f"{mode}-seed{seed}")
            os.makedirs(output, exist_ok=True)
            metrics = os.path.join(output, "metrics.jsonl")
            if os.path.exists(metrics):  # a fresh run each time: drop an earlier one's log
                os.remove(metrics)
            # --smoothing 0: the paper's "original" row is plain one-hot training (label
            # smoothing is a separate row there), so every mode gets the same recipe.
            record = run.main(["--label-mode", mode, "--seed", str(seed), "--epochs",
                               str(args.epochs), "--output", output, "--smoothing", "0"])
            runs[mode].append(record)
            logger.info("%s seed %d: top-1 %.1f, ReaL %.1f", mode, seed, record["val_top1"],
                        record["val_real"])
    results = {mode: {key: summarize([r[key] for r in records])
                      for key in ("val_top1", "val_real", "val_top5")}
               for mode, records in runs.items()}
    verdict = ordering_verdict(results)
    minutes = (time.perf_counter() - start) / 60
    table = [f"{'label mode':18} {'top-1':>14} {'ReaL':>14} {'paper top-1':>12}"]
    for mode in LABEL_MODES:
        top1, real = results[mode]["val_top1"], results[mode]["val_real"]
        table.append(f"{mode:18} {top1['mean']:7.1f} ± {top1['std']:4.1f} "
                     f"{real['mean']:7.1f} ± {real['std']:4.1f} {PAPER_TOP1[mode]:12.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(settings=dict(seeds=args.seeds, epochs=args.epochs,
                                model=run.DEMO_DEFAULTS["model"],
                                image_size=run.DEMO_DEFAULTS["image_size"],
                                dataset="dali_relabel.synthetic defaults"),
                  results=results, paper_top1=PAPER_TOP1, verdict=verdict,
                  minutes=minutes)
    (out / "ablation.json").write_text(json.dumps(result, indent=2))
    plot(results, out / "ablation.png",
         f"Factor analysis in miniature: {run.DEMO_DEFAULTS['model']}, synthetic ImageNet, "
         f"{args.epochs} epochs, {args.seeds} seeds")
    logger.info("\n%s\n%s\n%.1f min; wrote %s and %s", "\n".join(table), verdict, minutes,
                out / "ablation.json", out / "ablation.png")
    return result


if __name__ == "__main__":
    main()
