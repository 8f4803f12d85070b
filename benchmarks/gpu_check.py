"""GPU check: one command that proves dali-relabel on a GPU machine and measures it there.

Run it first on a machine with an NVIDIA GPU:

    .venv/bin/python benchmarks/gpu_check.py [--quick]

  1. kernel    compiles the Triton LabelPooling kernel and compares it with
               reference_label_pooling (densify + torchvision roi_align) on the edge cases:
               whole-pixel boxes (where approximate division or fused multiply-adds would
               change torchvision's sample count), S = 1, 2, 3, 5, 14, every mode, flips, the
               fused gather, C up to 21843, every cell a different class, boxes beyond the
               image; reruns must be bit-identical
  2. loader    ReLabelLoader with the GPU ("mixed") decoder over ImageNet-like JPEGs: every
               image against PIL's crop of the same file at the loader's box, every target
               against the reference
  3. trainer   train/run.py for one short epoch of its synthetic demo with bf16 and
               channels_last
  4. kernel timing    label_pooling against dense roi_align and the official path, B = 256 and
               1024, S = 1 and 14, C = 1000 and 21843, with the GB/s it moves
  5. loader timing    ReLabelLoader against the plain DALI graph and the official pipeline,
               and ReLabelLoader with jpeg_fancy_upsampling on and off

Writes benchmarks/results/gpu_check.{json,png}; exits 1 when a check fails. Without a GPU it
says so and exits 0 without checking anything. `--device cpu` runs the same checks on the CPU
twins (C++ kernel, CPU decoder), which is how the test suite runs this script.
"""
import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

import kernel_bench
import loader_bench
from dali_relabel import MODES, ReLabelLoader, label_pooling, reference_label_pooling
from harness import jpegs, report
from harness.inputs import make_inputs, random_boxes
from harness.timing import device_sync, endless, time_batches
from harness.training import run_training

logger = logging.getLogger("gpu_check")
ATOL = 1e-5  # LabelPooling's definition: max abs difference before the softmax
PIL_TOLERANCE = 2.5  # mean abs difference, 0-255 scale: nvJPEG's IDCT is not libjpeg's
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def kernel_cases(quick: bool) -> List[Dict]:
    """The edge cases of the kernel tests, as keyword arguments of label_pooling."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for num_classes in ((1000,) if quick else (1000, 21843)):
        values, indices, _ = make_inputs(64, 5, num_classes)
        # Whole pixels of 230 x 173 images.
        scale = torch.tensor([230.0, 173.0, 230.0, 173.0])
        boxes = (random_boxes(64, gen) * scale).round() / scale
        cases.append(dict(name=f"C={num_classes}, whole-pixel boxes, flips, fused gather",
                          values=values, indices=indices, boxes=boxes, num_classes=num_classes,
                          flip=torch.rand(64, generator=gen) < 0.5,
                          sample_index=torch.randint(0, 64, (64,), generator=gen)))
    values = torch.randn(3, 5, 15, 15, generator=gen) * 4
    indices = torch.randperm(21843, generator=gen)[:3 * 5 * 15 * 15].view(3, 5, 15, 15).int()
    cases.append(dict(name="C=21843, every entry another class, boxes beyond the image",
                      values=values, indices=indices, num_classes=21843,
                      boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.5, 1.5],
                                          [-0.4, 0.2, 1.3, 0.6]])))
    return cases


def check_kernel(device: torch.device, quick: bool) -> Dict:
    sizes = (1, 3) if quick else (1, 2, 3, 5, 14)
    worst, identical, compared = 0.0, True, 0
    for case in kernel_cases(quick):
        inputs = {key: value for key, value in case.items() if key != "name"}
        on_device = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                     for key, value in inputs.items()}
        for output_size in sizes:
            for mode in MODES:
                # check_inputs=False: the last case pools boxes beyond [0, 1] on purpose.
                want = reference_label_pooling(**inputs, output_size=output_size, mode=mode,
                                               check_inputs=False)
                runs = [label_pooling(**on_device, output_size=output_size, mode=mode,
                                      check_inputs=False) for _ in range(2)]
                worst = max(worst, float((runs[0].cpu() - want).abs().max()))
                identical &= torch.equal(runs[0], runs[1])
                compared += 1
    return dict(passed=worst <= ATOL and identical, comparisons=compared,
                max_abs_diff=worst, reruns_bit_identical=identical,
                kernel="Triton" if device.type == "cuda" else "C++")


def pil_crop(path: str, box: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """torchvision's way: PIL crop at the pixel box, bilinear resize, optional mirror."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    left, top, right, bottom = (box * [width, height, width, height]).round().astype(int)
    crop = image.crop((left, top, right, bottom)).resize((size, size), Image.BILINEAR)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32)


def check_loader(device: torch.device, data: Dict, batches: int) -> Dict:
    loader = ReLabelLoader(data["image_root"], data["store"], 16, device=str(device),
                           image_size=224, jpeg_fancy_upsampling=True, return_meta=True,
                           **RAW)
    store = loader.store
    differences, target_error = [], 0.0
    for _, batch in zip(range(batches), loader):
        rows, boxes, flip = (t.cpu() for t in (batch.sample_index, batch.boxes, batch.flip))
        want = reference_label_pooling(store.values, store.indices, boxes,
                                       num_classes=store.num_classes, sample_index=rows)
        target_error = max(target_error, float((batch.targets.cpu() - want).abs().max()))
        images = batch.images.permute(0, 2, 3, 1).cpu().numpy()
        for k, row in enumerate(rows.tolist()):
            path = os.path.join(data["image_root"], store.paths[row])
            differences.append(float(np.abs(
                pil_crop(path, boxes[k].numpy(), 224, bool(flip[k])) - images[k]).mean()))
    return dict(passed=max(differences) < PIL_TOLERANCE and target_error <= ATOL,
                images=len(differences), max_mean_abs_diff_to_pil=max(differences),
                median_mean_abs_diff_to_pil=float(np.median(differences)),
                max_target_error=target_error,
                decoder="mixed" if device.type == "cuda" else "cpu")


def check_trainer(device: torch.device, batch_size: int) -> Dict:
    with tempfile.TemporaryDirectory() as out:
        result = run_training(["--output", out, "--epochs", "1", "--warmup-epochs", "0",
                               "--batch-size", str(batch_size), "--device", device.type,
                               "--amp", "--channels-last"], out, timeout=1800)
    metrics = result.metrics
    finite = bool(metrics) and all(np.isfinite(m["train_loss"]) for m in metrics)
    row = dict(passed=result.returncode == 0 and finite, seconds=result.seconds,
               command=" ".join(result.command[1:]), returncode=result.returncode)
    if metrics:
        row.update({key: metrics[-1][key] for key in ("train_loss", "images_per_s",
                                                      "label_pooling_overhead_pct")
                    if key in metrics[-1]})
    if result.returncode != 0:
        row["stderr_tail"] = result.stderr[-2000:]
    return row


def time_kernel(device: torch.device, quick: bool, max_seconds: float) -> List[Dict]:
    configs = ([(256, 1, 1000)] if quick else
               [(b, s, c) for c in (1000, 21843) for s in (1, 14) for b in (256, 1024)])
    return [kernel_bench.run_config(batch, 5, output_size, num_classes, device=device,
                                    max_seconds=max_seconds, classes_per_image=32)
            for batch, output_size, num_classes in configs]


def time_fancy_upsampling(device: torch.device, data: Dict, batch_size: int, warmup: int,
                          batches: int) -> Dict:
    """ReLabelLoader's images/s with jpeg_fancy_upsampling off and on, alternating."""
    sync = device_sync(device)
    rates: Dict[str, List[float]] = {"off": [], "on": []}
    for _ in range(2):
        for setting in rates:
            loader = ReLabelLoader(data["image_root"], data["store"], batch_size,
                                   device=str(device), jpeg_fancy_upsampling=setting == "on")
            timing = time_batches(endless(loader), warmup, batches, sync)
            rates[setting].append(batches * batch_size / timing["seconds"])
            del loader
    return {f"fancy_{setting}_images_per_s": max(values) for setting, values in rates.items()}


def plot(result: Dict, path: Path) -> None:
    fig, (ax_status, ax_kernel, ax_loader) = report.subplots(
        1, 3, figsize=(16, 5), gridspec_kw=dict(width_ratios=[1.1, 1.4, 1.2]))
    ax_status.axis("off")
    lines = [f"{result['device_name']}"]
    for name in ("kernel", "loader", "trainer"):
        check = result["checks"][name]
        lines.append(f"{name}: {'passed' if check['passed'] else 'FAILED'}")
    kernel, loader = result["checks"]["kernel"], result["checks"]["loader"]
    lines += [f"kernel: max |diff| {kernel['max_abs_diff']:.1e} over "
              f"{kernel['comparisons']} runs", f"reruns bit-identical: "
              f"{kernel['reruns_bit_identical']}",
              f"loader vs PIL: mean |diff| max {loader['max_mean_abs_diff_to_pil']:.2f} "
              f"({loader['images']} images)"]
    ax_status.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9)
    ax_status.set_title("checks")
    rows = result["kernel_timing"]
    labels = [f"B={r['batch']} S={r['output_size']}\nC={r['num_classes']}" for r in rows]
    rates = [r.get("sparse_gb_per_s", 0.0) for r in rows]
    bars = ax_kernel.bar(range(len(rows)), rates, color="tab:green")
    for bar, row in zip(bars, rows):
        text = f"{row['sparse_ms']:.3f} ms" if "sparse_ms" in row else "skipped"
        ax_kernel.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text,
                       ha="center", va="bottom", fontsize=8)
    ax_kernel.set_xticks(range(len(rows)))
    ax_kernel.set_xticklabels(labels, fontsize=8)
    ax_kernel.set_ylabel("GB/s moved by label_pooling")
    ax_kernel.set_ylim(0, 1.2 * max(rates + [1e-9]))
    ax_kernel.set_title(f"label_pooling ({kernel['kernel']} kernel)")
    timing = result["loader_timing"]
    names = ["official", "plain DALI", "ReLabelLoader", "ReLabelLoader\nfancy chroma off",
             "ReLabelLoader\nfancy chroma on"]
    values = [timing["official_images_per_s"], timing["plain_dali_images_per_s"],
              timing["relabel_loader_images_per_s"], timing["fancy_off_images_per_s"],
              timing["fancy_on_images_per_s"]]
    bars = ax_loader.bar(range(len(names)), values,
                         color=["tab:red", "tab:purple", "tab:green", "tab:olive", "tab:olive"])
    for bar, value in zip(bars, values):
        ax_loader.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.0f}", ha="center",
                       va="bottom", fontsize=9)
    ax_loader.set_xticks(range(len(names)))
    ax_loader.set_xticklabels(names, fontsize=8)
    ax_loader.set_ylabel("images / s")
    ax_loader.set_ylim(0, 1.25 * max(values))
    ax_loader.set_title(f"loaders: ReLabelLoader at {timing['percent_of_plain']:.1f}% of "
                        "plain DALI", fontsize=10)
    report.save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda checks the GPU paths; cpu their CPU twins (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases, configurations and images (default: off)")
    parser.add_argument("--images", type=int, default=None,
                        help="JPEGs for the loader checks (default: 1024; --quick 96)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "dali-relabel" /
                                               "gpu_check"),
                        help="folder of the generated images (default: "
                             "~/.cache/dali-relabel/gpu_check)")
    report.add_out_argument(parser, "gpu_check.json and .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.info("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is "
                    "False): nothing was checked or timed. Run it on a machine with a GPU; "
                    "--device cpu runs the same checks on the CPU twins.")
        return 0
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 would run the Triton kernel in its interpreter; "
                     "unset it to check the compiled kernel")
    images = args.images or (96 if args.quick else 1024)
    batch_size = 16 if args.quick else 64
    data_args = ["--images", str(images), "--cache", args.cache, "--batch-size",
                 str(batch_size), "--threads", str(os.cpu_count() or 1)]
    source = "photos" if jpegs.load_photos() else "synthetic"
    cache = Path(args.cache).expanduser()
    manifest = jpegs.prepare_dataset(cache, images, source, seed=0,
                                     workers=os.cpu_count() or 1)
    data = jpegs.locations(cache, images)

    checks = {}
    steps = [("kernel", lambda: check_kernel(device, args.quick)),
             ("loader", lambda: check_loader(device, data, 2 if args.quick else 8)),
             ("trainer", lambda: check_trainer(device, 32))]
    for name, step in steps:
        logger.info("gpu_check: %s ...", name)
        checks[name] = step()
        logger.info("gpu_check: %s %s: %s", name,
                    "passed" if checks[name]["passed"] else "FAILED", checks[name])

    logger.info("gpu_check: timing label_pooling ...")
    kernel_timing = time_kernel(device, args.quick, 0.3 if args.quick else 1.0)
    logger.info(kernel_bench.format_table(kernel_timing))
    logger.info("gpu_check: timing the loaders ...")
    with tempfile.TemporaryDirectory() as out:
        bench = loader_bench.main([
            *data_args, "--source", source, "--device", device.type, "--out", out,
            "--methods", "official,plain_dali,relabel_loader", "--rounds",
            "1" if args.quick else "3", "--wait-idle", "0" if args.quick else "30",
            *(["--batches", "2", "--warmup", "1", "--retries", "0", "--pairs", "3",
               "--segment-batches", "1"] if args.quick else ["--pairs", "60"])])
    warmup, batches = (1, 2) if args.quick else (4, 12)
    loader_timing = dict(
        {f"{name}_images_per_s": row["images_per_s"] for name, row in bench["methods"].items()},
        percent_of_plain=bench["summary"]["percent_of_plain"],
        ratio_vs_official=bench["summary"]["ratio_vs_official"],
        **time_fancy_upsampling(device, data, batch_size, warmup, batches))

    result = dict(
        device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"CPU ({os.cpu_count()} cores)"),
        versions=dict(torch=torch.__version__, cuda=torch.version.cuda,
                      dali=report.machine_info(device)["dali_version"]),
        dataset=dict(images=images, source=source, mean_jpeg_kb=manifest["mean_jpeg_bytes"] / 1e3),
        checks=checks, kernel_timing=kernel_timing, loader_timing=loader_timing,
        passed=all(check["passed"] for check in checks.values()))
    json_path, png_path = report.write_results(Path(args.out), "gpu_check", result,
                                               lambda path: plot(result, path))
    logger.info("gpu_check on %s: %s; ReLabelLoader %.0f images/s = %.1f%% of the plain DALI "
                "graph, %.2fx the official pipeline; jpeg_fancy_upsampling on: %.0f images/s, "
                "off: %.0f. Wrote %s and %s", result["device_name"],
                "every check passed" if result["passed"] else "a check FAILED",
                loader_timing["relabel_loader_images_per_s"], loader_timing["percent_of_plain"],
                loader_timing["ratio_vs_official"], loader_timing["fancy_on_images_per_s"],
                loader_timing["fancy_off_images_per_s"], json_path, png_path)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
