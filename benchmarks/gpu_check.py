"""GPU check: one command that proves dali-relabel on a GPU machine and measures it there.

    PYTHONPATH=. python benchmarks/gpu_check.py [--quick] [--steps a,b,...]

Sized to take under 8 minutes on one H100 (--quick under 3), an estimate: no GPU has run it
yet. Every step is independent: on a GPU each runs in a child process of its own (--isolate),
under a time limit (--step-timeout): a CUDA error that poisons a process, or a hang, cannot
hide the later steps. Each is recorded in the JSON, written after every step, as passed,
failed (with the cases that failed), skipped (with the reason) or error (with the error and
its traceback); a one-screen summary closes the run. --steps picks some, e.g. to rerun one.

  a  kernel grid     every launch of dali_relabel.ops.testing's grid (the real Triton JIT on
                     a GPU) against reference_label_pooling: max abs diff <= 1e-5, reruns
                     bit-identical; and boxes beyond the image with every entry another
                     ImageNet-21k class
  b  sparse targets  sparse_label_pooling(...).dense() against label_pooling
  c  augment, mix    random_erase on the device against the CPU with the same rectangles and
                     seed ("const" exact; "rand" and "pixel" in place, outside untouched,
                     reruns identical), and the loader's mixup/CutMix (localized CutMix
                     targets, tokens too) on device tensors against the CPU
  d  decoding        (DALI) decode="roi" and "full": each crop against PIL's crop of the
                     same file at the loader's box (mean abs difference), targets against the
                     reference, images/s each; num_crops=1, 2, 4: training samples/s
  e  loaders         (DALI) ReLabelLoader against the plain DALI graph: images/s, the peak
                     GPU memory while two epochs' pipelines are alive, the longest wait at
                     an epoch boundary against the median wait
  f  ResNet-50       LabelPooling's share of a training step (timm resnet50, random init,
                     B=256, bf16, channels_last, synthetic tensors)
  g  host syncs      torch.cuda.set_sync_debug_mode("warn") over DALI-free training steps on
                     GPU tensors: targets from label_pooling with the store on the device,
                     mixing, erasing, forward, backward, optimizer step (expected: 0)
  h  kernel timing   label_pooling alone, CUDA events, check_inputs=False: us and GB/s for
                     S = 1, 14; B = 256, 1024; C = 1000, 21843
  i  DDP             two ranks (NCCL on 2 GPUs), LabelPooling targets and DDP steps:
                     parameters equal across ranks; skipped with fewer than 2 GPUs

Without nvidia.dali (the borrowed GPU machines have none) or without the compiled CPU kernel
the DALI-free steps (a, b, c, f, g, h, i) still run and d, e are skipped with the reason.
`--device cpu` runs every step that has a CPU twin (the C++ kernel, DALI's CPU decoder,
gloo); what only a GPU measures is skipped. Without a GPU and without --device cpu it says
so and exits 0. Writes benchmarks/results/gpu_check.{json,png}; exits 1 when a step failed.
"""
import argparse
import gc
import importlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from dali_relabel import (LabelMapStore, label_pooling, reference_label_pooling,
                          sparse_label_pooling)
from dali_relabel.augment import RE_MODES, random_erase
from dali_relabel.ops import MODES, testing
from harness import report, train_step
from harness.inputs import make_inputs
from harness.timing import device_sync, endless, time_batches

logger = logging.getLogger("gpu_check")
ATOL = 1e-5  # LabelPooling's definition: max abs difference before the softmax
PIL_TOLERANCE = 2.5  # mean abs difference, 0-255 scale: nvJPEG's IDCT is not libjpeg's
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
CPU_QUICK_STRIDE = 8  # the CPU twin's --quick checks every 8th launch (the dense reference)
# The CPU twins train timm's smallest model: the same code path in seconds.
CPU_MODEL = "test_resnet"
STATUSES = ("passed", "failed", "skipped", "error")


class Skipped(Exception):
    """A step that cannot run here; its message says why."""


class Context:
    """What the steps share: the device, --quick, the JPEG cache, threads, a scratch folder."""

    def __init__(self, args: argparse.Namespace, scratch: Path):
        self.device = torch.device(args.device)
        self.quick, self.threads, self.scratch = args.quick, args.threads, scratch
        self.cache = Path(args.cache).expanduser()
        self.images = args.images or (64 if args.quick else 1024)
        self.batch = 8 if args.quick else 64
        self.sync = device_sync(self.device)
        self._store: Optional[Path] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def store(self) -> Path:
        """A label-map file of 2,048 random ImageNet-like maps (1000 classes)."""
        if self._store is None:
            self._store = train_step.random_store(self.scratch / "random.h5", 2048)
        return self._store

    def dataset(self) -> Dict:
        """The benchmarks' ImageNet-like JPEG set (generated once into --cache)."""
        from harness import jpegs

        source = "photos" if jpegs.load_photos() else "synthetic"
        jpegs.prepare_dataset(self.cache, self.images, source, seed=0, workers=self.threads)
        return dict(jpegs.locations(self.cache, self.images), source=source)


def require_dali(ctx: Optional["Context"] = None) -> None:
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as error:
        raise Skipped(f"needs NVIDIA DALI: nvidia.dali is not installed here ({error})")


def kernel_name(device: torch.device) -> str:
    if device.type == "cuda":
        import triton

        return f"Triton {triton.__version__}"
    try:
        importlib.import_module("dali_relabel.ops.kernels._label_pooling_cpu")
        return "C++"
    except ImportError:
        return "dense reference (the compiled CPU kernel is missing)"


def compare(name: str, run: Callable[[], torch.Tensor], want: Callable[[], torch.Tensor],
            failures: List[Dict], tolerance: float = ATOL, reruns: bool = True) -> float:
    """Max abs difference of run() to want() (inf on an error), recorded in `failures` when
    beyond `tolerance` or, with `reruns`, when a second run() is not bit-identical."""
    try:
        got = run()
        same = torch.equal(got, run()) if reruns else True
        expected = want()
        diff = float((got - expected).abs().max()) if got.numel() else 0.0
    except Exception as error:  # noqa: BLE001 (each case is reported by name)
        failures.append(dict(name=name, error=f"{type(error).__name__}: {error}"[-1500:]))
        return math.inf
    if not diff <= tolerance or not same:  # NaN fails too
        failures.append(dict(name=name, max_abs_diff=diff, bit_identical=same))
    return diff


def verdict(failures: List[Dict], **row) -> Dict:
    return dict(row, status="failed" if failures else "passed", failure_count=len(failures),
                failures=failures[:20])


def step_kernel_grid(ctx: Context) -> Dict:
    stride = CPU_QUICK_STRIDE if ctx.quick and not ctx.cuda else 1
    failures: List[Dict] = []
    worst, count = 0.0, 0
    cases = [case for n, case in enumerate(testing.launches(ctx.device, quick=ctx.quick))
             if n % stride == 0]
    # Boxes beyond the image (several register tiles) with every entry another class.
    gen = torch.Generator().manual_seed(4)
    values = (torch.randn(3, 5, 15, 15, generator=gen) * 4).to(ctx.device)
    indices = torch.randperm(21843, generator=gen)[:3 * 5 * 15 * 15].view(3, 5, 15, 15).int()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.5, 1.5], [-0.4, 0.2, 1.3, 0.6]])
    for size in (1, 3, 14):
        for mode in MODES:
            cases.append((f"edge: S={size} {mode} C=21843 every entry another class, boxes "
                          "beyond the image", dict(values=values, indices=indices.to(ctx.device),
                                                   boxes=boxes.to(ctx.device), num_classes=21843,
                                                   output_size=size, mode=mode)))
    for name, kwargs in cases:
        count += 1
        worst = max(worst, compare(
            name, lambda: label_pooling(**kwargs, check_inputs=False),
            lambda: reference_label_pooling(**kwargs, check_inputs=False), failures))
    return verdict(failures, kernel=kernel_name(ctx.device), launches=count,
                   max_abs_diff=worst, every_nth_launch=stride,
                   summary=f"{count} launches ({kernel_name(ctx.device)}), max |diff| "
                           f"{worst:.1e}, {len(failures)} beyond 1e-5 or not bit-identical")


def step_sparse(ctx: Context) -> Dict:
    failures: List[Dict] = []
    worst, count = 0.0, 0
    gen = torch.Generator().manual_seed(1)
    classes = (1000,) if ctx.quick and not ctx.cuda else (1000, 21843)
    for size in (1, 2, 14):
        for mode in ("softmax", "argmax"):
            for num_classes in classes:
                kwargs = testing.launch_arguments(16, 5, 15, 15, num_classes, size, mode, True,
                                                  True, device=ctx.device, generator=gen)
                count += 1
                worst = max(worst, compare(
                    f"S={size} {mode} C={num_classes}",
                    lambda: sparse_label_pooling(**kwargs, check_inputs=False).dense(),
                    lambda: label_pooling(**kwargs, check_inputs=False), failures))
    return verdict(failures, cases=count, max_abs_diff=worst,
                   summary=f"{count} cases, SparseTargets.dense() vs label_pooling: max |diff| "
                           f"{worst:.1e}")


def erase_mask(boxes: np.ndarray, shape) -> torch.Tensor:
    """Where the rectangles [B, K, 4] (top, left, height, width) lie, [B, C, H, W] bool."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for i, k in zip(*np.nonzero((boxes[..., 2] > 0) & (boxes[..., 3] > 0))):
        top, left, h, w = boxes[i, k]
        mask[i, :, top:top + h, left:left + w] = True
    return mask


def step_augment(ctx: Context) -> Dict:
    failures: List[Dict] = []
    batch, size = 16, 32
    rng = np.random.default_rng(0)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    boxes = train_step.erase_boxes(batch, size, 3, rng, prob=0.75)
    mask = erase_mask(boxes, images.shape)
    erasing = {}
    for mode in RE_MODES:
        on_cpu = random_erase(images, boxes, mode, 5)
        runs = [random_erase(images.to(ctx.device), boxes, mode, 5) for _ in range(2)]
        got = runs[0].cpu()
        row = dict(outside_untouched=torch.equal(got[~mask], images[~mask]),
                   reruns_identical=torch.equal(runs[0], runs[1]),
                   equal_to_cpu=torch.equal(got, on_cpu))
        if mode == "const":
            row["exact"] = row["equal_to_cpu"] and torch.equal(got, images.masked_fill(mask, 0))
        else:  # the device's generator is not the CPU's: the fill differs, not the place
            row["inside_erased"] = bool((got[mask] != images[mask]).all())
            row["fill_mean"], row["fill_std"] = float(got[mask].mean()), float(got[mask].std())
        erasing[mode] = row
        if not all(v for k, v in row.items() if not k.startswith("fill") and k != "equal_to_cpu"):
            failures.append(dict(name=f"random_erase {mode}", **row))
    mixing = {}
    store_path = ctx.store()
    host = LabelMapStore.open(store_path, placement="memory")
    on_device = train_step.open_store(store_path, ctx.device)
    cpu = torch.device("cpu")
    for output_size in (1, 2):
        plan, mix_host = train_step.loader_mixing(host, cpu, size, output_size=output_size,
                                                  fused_gather=False)
        _, mix_device = train_step.loader_mixing(on_device, ctx.device, size,
                                                 output_size=output_size, fused_gather=True)
        gen = torch.Generator().manual_seed(output_size)
        draws = plan(batch, np.random.default_rng(output_size))
        rows = torch.randint(0, len(host), (batch,), generator=gen)
        crops = testing.launch_arguments(batch, 5, 15, 15, 1000, 1, "softmax", False, True,
                                         generator=gen)
        crop_boxes, flips = crops["boxes"], crops["flip"]

        def targets(store, device):
            return label_pooling(store.values, store.indices, crop_boxes.to(device),
                                 num_classes=store.num_classes, output_size=output_size,
                                 flip=flips.to(device), sample_index=rows.to(device))

        want = mix_host(images, targets(host, cpu), crop_boxes, flips, rows, draws)
        got = mix_device(images.to(ctx.device), targets(on_device, ctx.device), crop_boxes,
                         flips, rows, draws)
        row = dict(mixup=int((~draws.cut & (draws.lam < 1)).sum()), cutmix=int(draws.cut.sum()),
                   image_max_abs_diff=float((got[0].cpu() - want[0]).abs().max()),
                   target_max_abs_diff=float((got[1].cpu() - want[1]).abs().max()),
                   target_sums_off_by=float((got[1].sum(-1) - 1).abs().max()))
        mixing[f"S={output_size}"] = row
        if not (row["image_max_abs_diff"] <= 1e-5 and row["target_max_abs_diff"] <= ATOL
                and row["target_sums_off_by"] <= 1e-4 and row["mixup"] and row["cutmix"]):
            failures.append(dict(name=f"mixing S={output_size}", **row))
    against = "the CPU" if ctx.cuda else "the CPU's host-gather path"
    return verdict(failures, erasing=erasing, mixing=mixing, compared_against=against,
                   summary=f"random_erase {'/'.join(RE_MODES)} and mixup/CutMix (S=1, 2) on "
                           f"{ctx.device.type} against {against}: {len(failures)} mismatches")


def pil_crop(path: str, box: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """torchvision's way: PIL crop at the pixel box, bilinear resize, optional mirror."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    width, height = image.size
    left, top, right, bottom = (box * [width, height, width, height]).round().astype(int)
    crop = image.crop((left, top, right, bottom)).resize((size, size), Image.BILINEAR)
    if flip:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop, dtype=np.float32)


def rate(ctx: Context, loader, samples_per_batch: int) -> float:
    """Samples per second of a loader over a few batches after a warm-up."""
    warmup, batches = (2, 3) if ctx.quick else (len(loader) + 4, 24)
    timing = time_batches(endless(loader), warmup, batches, ctx.sync)
    return batches * samples_per_batch / timing["seconds"]


def step_decoding(ctx: Context) -> Dict:
    require_dali()
    from dali_relabel import ReLabelLoader

    data = ctx.dataset()
    root, size = data["image_root"], 224
    failures: List[Dict] = []
    decodes = {}
    for decode in ("roi", "full"):
        loader = ReLabelLoader(root, data["store"], ctx.batch, device=str(ctx.device),
                               image_size=size, decode=decode, jpeg_fancy_upsampling=True,
                               return_meta=True, num_threads=ctx.threads, **RAW)
        store, differences, target_error = loader.store, [], 0.0
        for _, batch in zip(range(2 if ctx.quick else 8), loader):
            rows, boxes, flip = (t.cpu() for t in (batch.sample_index, batch.boxes, batch.flip))
            want = reference_label_pooling(store.values, store.indices, boxes,
                                           num_classes=store.num_classes, sample_index=rows)
            target_error = max(target_error, float((batch.targets.cpu() - want).abs().max()))
            pixels = batch.images.permute(0, 2, 3, 1).cpu().numpy()
            for k, row in enumerate(rows.tolist()):
                path = os.path.join(root, store.paths[row])
                differences.append(float(np.abs(
                    pil_crop(path, boxes[k].numpy(), size, bool(flip[k])) - pixels[k]).mean()))
        row = dict(took=loader.decode, images=len(differences),
                   max_mean_abs_diff_to_pil=max(differences),
                   median_mean_abs_diff_to_pil=statistics.median(differences),
                   max_target_error=target_error, images_per_s=rate(ctx, loader, ctx.batch))
        decodes[decode] = row
        del loader
        if not (row["took"] == decode and row["max_mean_abs_diff_to_pil"] < PIL_TOLERANCE
                and target_error <= ATOL):
            failures.append(dict(name=f"decode={decode}", **row))
    crops = {}
    for num_crops in (1, 2, 4):
        loader = ReLabelLoader(root, data["store"], ctx.batch, device=str(ctx.device),
                               image_size=size, num_crops=num_crops, num_threads=ctx.threads)
        crops[str(num_crops)] = dict(decode=loader.decode,
                                     samples_per_s=rate(ctx, loader, ctx.batch))
        del loader
    worst = max(row["max_mean_abs_diff_to_pil"] for row in decodes.values())
    return verdict(failures, decoder="mixed" if ctx.cuda else "cpu", images=ctx.images,
                   batch=ctx.batch, source=data["source"], decode=decodes, num_crops=crops,
                   summary=f"roi {decodes['roi']['images_per_s']:.0f} and full "
                           f"{decodes['full']['images_per_s']:.0f} images/s, PIL max mean "
                           f"|diff| {worst:.2f}; num_crops 1/2/4: " + "/".join(
                               f"{row['samples_per_s']:.0f}" for row in crops.values())
                           + " samples/s")


class MemorySampler:
    """The GPU's used memory, sampled every few milliseconds on a thread: pynvml where it is
    installed, else torch.cuda.mem_get_info (total - free); both see DALI's allocations,
    which torch.cuda.max_memory_allocated does not."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
            self.method = "pynvml nvmlDeviceGetMemoryInfo(...).used (the whole GPU)"
        except Exception:  # noqa: BLE001 (not installed, or the handle is not found)
            self.read = lambda: (lambda free, total: total - free)(
                *torch.cuda.mem_get_info(device))
            self.method = "torch.cuda.mem_get_info: total - free (the whole GPU)"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.005)

    def __enter__(self) -> "MemorySampler":
        self.base = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def release_gpu_memory() -> bool:
    """Frees what torch and DALI hold unused (DALI keeps a memory pool); whether DALI could."""
    gc.collect()
    torch.cuda.empty_cache()
    try:
        from nvidia.dali.backend import ReleaseUnusedMemory
    except ImportError:
        return False
    ReleaseUnusedMemory()
    return True


def step_loaders(ctx: Context) -> Dict:
    require_dali()
    import loader_bench

    data = ctx.dataset()
    args = argparse.Namespace(batch_size=ctx.batch, threads=ctx.threads, seed=0,
                              boundary_epochs=4 if ctx.quick else 6,
                              warmup=2 if ctx.quick else ctx.images // ctx.batch + 4,
                              batches=3 if ctx.quick else 24)
    names = ("relabel_loader", "plain_dali")
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for turn in range(2):
        for name in names[turn % 2:] + names[:turn % 2]:
            rates[name].append(loader_bench.run_method(name, data, args, ctx.device)
                               ["images_per_s"])
    ratios = [a / b for a, b in zip(rates["relabel_loader"], rates["plain_dali"])]
    row = dict(images=ctx.images, batch=ctx.batch, images_per_s={
        name: statistics.median(values) for name, values in rates.items()},
        percent_of_plain=100 * statistics.median(ratios), rounds_images_per_s=rates)
    row["epoch_boundary"] = loader_bench.epoch_boundary(data, args, ctx.device, names)
    if ctx.cuda:
        memory = {}
        for name in names:
            released = release_gpu_memory()
            loader, batches = loader_bench.open_method(name, data, args, ctx.device)
            with MemorySampler(ctx.device) as sampler:
                for _ in range(2 * len(loader) + 1):  # past the end of the second epoch
                    next(batches)
                ctx.sync()
            batches.close()
            del batches, loader
            memory[name] = dict(peak_mib=(sampler.peak - sampler.base) / 2 ** 20,
                                method=sampler.method, dali_pool_released_before=released)
        row["gpu_memory"] = memory
    else:
        row["skipped_parts"] = dict(gpu_memory="needs a GPU")
    boundary = row["epoch_boundary"]["relabel_loader"]
    row["summary"] = (f"ReLabelLoader {row['images_per_s']['relabel_loader']:.0f} images/s = "
                      f"{row['percent_of_plain']:.1f}% of the plain graph; boundary wait "
                      f"{boundary['ratio_to_median']:.2f}x the median" + (
                          "; peak GPU memory {:.0f} vs {:.0f} MiB".format(
                              *(row["gpu_memory"][n]["peak_mib"] for n in names))
                          if ctx.cuda else ""))
    return row


def step_resnet(ctx: Context) -> Dict:
    batch, size, repeats = (256, 224, 5 if ctx.quick else 15) if ctx.cuda else (4, 32, 2)
    model = "resnet50" if ctx.cuda else CPU_MODEL
    row = train_step.label_pooling_share(ctx.device, ctx.store(), model=model, batch=batch,
                                         image_size=size, repeats=repeats)
    if not ctx.cuda:
        row["cpu_twin"] = f"{model}, B=4 at 32 px on the CPU: the code path, not a GPU's figure"
    row["summary"] = (f"{model} B={batch} bf16 channels_last: step {row['step_ms']:.1f} ms, "
                      f"label_pooling {row['label_pooling_ms']:.3f} ms = "
                      f"{row['share_percent']:.2f}% of a step")
    return row


def step_syncs(ctx: Context) -> Dict:
    batch, size = (16 if ctx.quick else 64, 128 if ctx.quick else 224) if ctx.cuda else (4, 32)
    model = "resnet50" if ctx.cuda else CPU_MODEL
    step = train_step.loader_like_step(ctx.device, ctx.store(), model=model, batch=batch,
                                       image_size=size, seed=0)
    if not ctx.cuda:
        step(0)
        raise Skipped("host syncs are counted by CUDA's sync debug mode, on a GPU only; the "
                      "step itself (targets, mixing, erasing, forward, backward, optimizer) "
                      "ran on the CPU without error")
    row = train_step.count_host_syncs(step, ctx.device, 3 if ctx.quick else 10)
    row.update(batch=batch, image_size=size, model=model,
               status="passed" if row["host_syncs"] == 0 else "failed",
               summary=f"{row['host_syncs']} host syncs in {row['steps']} training steps")
    return row


def step_kernel_timing(ctx: Context) -> Dict:
    configs = [(b, s, c) for c in (1000, 21843) for b in (256, 1024) for s in (1, 14)]
    if ctx.quick and not ctx.cuda:
        configs = configs[:1]
    rows, inputs = [], {}
    for batch, size, num_classes in configs:
        row = dict(batch=batch, output_size=size, num_classes=num_classes)
        rows.append(row)
        out_bytes = batch * size * size * num_classes * 4
        if not ctx.cuda and out_bytes > 2 ** 31:
            row["skipped"] = f"the output needs {out_bytes / 2 ** 30:.1f} GiB on the CPU"
            continue
        if (batch, num_classes) not in inputs:  # the maps do not depend on S
            inputs.clear()
            inputs[batch, num_classes] = [t.to(ctx.device)
                                          for t in make_inputs(batch, 5, num_classes)]
        values, indices, boxes = inputs[batch, num_classes]
        ms, _ = train_step.event_ms(
            lambda: label_pooling(values, indices, boxes, num_classes=num_classes,
                                  output_size=size, check_inputs=False),
            ctx.device, 10 if ctx.quick else 30, warmup=3)
        from kernel_bench import sparse_bytes

        moved = sparse_bytes(batch, 5, num_classes, size, values.element_size(),
                                          indices.element_size())
        row.update(us=ms * 1e3, bytes=moved, gb_per_s=moved / (ms * 1e-3) / 1e9)
    timed = [r for r in rows if "us" in r]
    return dict(kernel=kernel_name(ctx.device), clock="CUDA events" if ctx.cuda else
                "wall clock", configs=rows,
                summary="; ".join(f"B={r['batch']} S={r['output_size']} C={r['num_classes']}: "
                                  f"{r['us']:.0f} us {r['gb_per_s']:.3g} GB/s" for r in timed[:4])
                + (" ..." if len(timed) > 4 else ""))


def require_two_gpus(ctx: Context) -> None:
    if ctx.cuda and torch.cuda.device_count() < 2:
        raise Skipped(f"needs 2 GPUs, {torch.cuda.device_count()} visible")


def step_ddp(ctx: Context) -> Dict:
    require_two_gpus(ctx)
    out = ctx.scratch / "ddp"
    out.mkdir(exist_ok=True)
    row = train_step.run_ddp(ctx.device, ctx.store(), out,
                             model="resnet18" if ctx.cuda else CPU_MODEL, batch=16,
                             image_size=128 if ctx.cuda else 32, steps=3,
                             timeout=240 if ctx.cuda else 180)
    finite = all(math.isfinite(v) for rank in row["ranks"] for v in rank["losses"])
    row.update(status="passed" if finite and row["max_param_diff"] == 0 else "failed",
               summary=f"{row['backend']}, 2 ranks x {row['steps']} steps: parameters "
                       f"{'equal' if row['max_param_diff'] == 0 else 'DIFFER'} across ranks")
    return row


STEPS = {
    "a": ("kernel_grid", step_kernel_grid),
    "b": ("sparse_targets", step_sparse),
    "c": ("augment_and_mixing", step_augment),
    "d": ("decoding", step_decoding),
    "e": ("loaders", step_loaders),
    "f": ("resnet50_share", step_resnet),
    "g": ("host_syncs", step_syncs),
    "h": ("kernel_timing", step_kernel_timing),
    "i": ("ddp", step_ddp),
}
# What a step needs, checked before a process is started for it.
PRECHECKS = {"d": require_dali, "e": require_dali, "i": require_two_gpus}


def run_here(key: str, ctx: Context) -> Dict:
    """Runs step `key` in this process; its row, never an exception."""
    start = time.perf_counter()
    try:
        row = STEPS[key][1](ctx)
        row.setdefault("status", "passed")
    except Skipped as skip:
        row = dict(status="skipped", reason=str(skip))
    except Exception as error:  # noqa: BLE001 (recorded; the next steps run)
        row = dict(status="error", error=f"{type(error).__name__}: {error}"[-2000:],
                   traceback=traceback.format_exc()[-6000:])
    row["seconds"] = time.perf_counter() - start
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


def run_isolated(key: str, args: argparse.Namespace, ctx: Context) -> Dict:
    """Runs step `key` in a child process (its own CUDA context) under --step-timeout;
    a step that cannot run here (no DALI, one GPU) is skipped without one."""
    start = time.perf_counter()
    try:
        PRECHECKS.get(key, lambda ctx: None)(ctx)
    except Skipped as skip:
        return dict(status="skipped", reason=str(skip), seconds=time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "step.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device,
                   "--cache", args.cache, "--threads", str(args.threads), "--steps", key,
                   "--isolate", "no", "--step-result", str(result)]
        command += (["--quick"] if args.quick else []) + (
            ["--images", str(args.images)] if args.images else [])
        # A session of its own: a step past its time is stopped with what it started (DDP
        # ranks, DALI workers).
        child = subprocess.Popen(command, start_new_session=True)
        try:
            code = child.wait(timeout=args.step_timeout[key])
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return dict(status="error", error=f"timed out after {args.step_timeout[key]:g} s "
                        "(stopped)", seconds=time.perf_counter() - start)
        except BaseException:  # interrupted: the step's processes go too
            os.killpg(child.pid, signal.SIGKILL)
            raise
        if result.is_file():
            return json.loads(result.read_text())
        return dict(status="error", error=f"the step's process exited {code} without a result",
                    seconds=time.perf_counter() - start)


def versions() -> Dict:
    found = dict(python=platform.python_version(), torch=torch.__version__,
                 cuda=torch.version.cuda)
    for name, module in (("triton", "triton"), ("torchvision", "torchvision"), ("timm", "timm"),
                         ("dali", "nvidia.dali"), ("dali_relabel", "dali_relabel")):
        try:
            found[name] = importlib.import_module(module).__version__
        except Exception as error:  # noqa: BLE001
            found[name] = f"not installed ({type(error).__name__})"
    found["label_pooling_cpu_kernel"] = kernel_name(torch.device("cpu"))
    return found


def headline(name: str, row: Dict) -> str:
    text = row.get("summary") or row.get("reason") or row.get("error", "")
    return text.splitlines()[0][:150] if text else ""


def summary_lines(result: Dict) -> List[str]:
    lines = [f"gpu_check on {result['device_name']} ({result['device']}"
             f"{', --quick' if result['quick'] else ''}): torch {result['versions']['torch']}, "
             f"triton {result['versions']['triton']}, DALI {result['versions']['dali']}"]
    for key, (name, _) in STEPS.items():
        row = result["steps"].get(name)
        if row is not None:
            shown = row["status"].upper() if row["status"] in ("failed", "error") else \
                row["status"]
            lines.append(f" {key} {name:<19} {shown:<8}{row.get('seconds', 0):6.1f} s  "
                         f"{headline(name, row)}")
    counts = {s: sum(r["status"] == s for r in result["steps"].values()) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) +
                 f"; {result['seconds']:.0f} s in all")
    return lines


def plot(result: Dict, path: Path) -> None:
    fig, axes = report.subplots(2, 3, figsize=(19, 10), gridspec_kw=dict(height_ratios=[2, 3]))
    for ax in axes[0]:
        ax.remove()
    status = fig.add_subplot(axes[0, 0].get_gridspec()[0, :])
    kernel, loaders, boundary = axes[1]
    status.axis("off")
    status.text(0.0, 1.0, "\n".join(line[:200] for line in summary_lines(result)), va="top",
                family="monospace", fontsize=8)
    status.set_title("gpu_check: every step")
    steps = result["steps"]
    timing = [r for r in steps.get("kernel_timing", {}).get("configs", []) if "us" in r]
    if timing:
        bars = kernel.bar(range(len(timing)), [r["gb_per_s"] for r in timing], color="tab:green")
        for bar, row in zip(bars, timing):
            kernel.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                        f"{row['us']:.0f} us", ha="center", va="bottom", fontsize=8)
        kernel.set_xticks(range(len(timing)))
        kernel.set_xticklabels([f"B={r['batch']}\nS={r['output_size']}\nC={r['num_classes']}"
                                for r in timing], fontsize=8)
        kernel.set_ylabel("GB/s moved (check_inputs=False)")
    kernel.set_title("h: label_pooling alone "
                     f"({steps.get('kernel_timing', {}).get('kernel', 'not run')})")
    bars_data = {}
    for name, row in steps.get("decoding", {}).get("decode", {}).items():
        bars_data[f"decode={name}"] = row["images_per_s"]
    for crops, row in steps.get("decoding", {}).get("num_crops", {}).items():
        bars_data[f"num_crops={crops}"] = row["samples_per_s"]
    for name, value in steps.get("loaders", {}).get("images_per_s", {}).items():
        bars_data[name.replace("_", " ")] = value
    if bars_data:
        loaders.bar(range(len(bars_data)), list(bars_data.values()), color="tab:blue")
        loaders.set_xticks(range(len(bars_data)))
        loaders.set_xticklabels(list(bars_data), fontsize=8, rotation=20)
        loaders.set_ylabel("images (samples) / s")
    loaders.set_title("d, e: loaders" + ("" if bars_data else " (skipped)"))
    waits = steps.get("loaders", {}).get("epoch_boundary", {})
    for name, row in waits.items():
        flat = [w for epoch in row["waits_ms"] for w in epoch]
        boundary.plot(flat, ".-", markersize=3, linewidth=0.6,
                      label=f"{name}: longest at a boundary {row['ratio_to_median']:.2f}x the "
                            "median")
    if waits:
        row = next(iter(waits.values()))
        for epoch in range(1, row["epochs"]):
            boundary.axvline(epoch * row["batches_per_epoch"] - 0.5, color="grey",
                             linestyle=":", linewidth=1)
        boundary.set_xlabel("batch (dotted: epoch boundaries)")
        boundary.set_yscale("log")
        boundary.set_ylabel("wait for a batch (ms)")
        boundary.legend(fontsize=8)
    boundary.set_title("e: waits across epochs" + ("" if waits else " (skipped)"))
    report.save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda checks the GPU paths; cpu their CPU twins (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer launches, configurations, images and steps (default: off)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated steps to run (default: {','.join(STEPS)})")
    parser.add_argument("--images", type=int, default=None,
                        help="JPEGs for the loader steps (default: 1024; --quick 64)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="DALI threads (default: os.cpu_count())")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "dali-relabel" /
                                               "gpu_check"),
                        help="folder of the generated images (default: "
                             "~/.cache/dali-relabel/gpu_check)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each step in a child process of its own: auto = on a GPU "
                             "(default: auto)")
    parser.add_argument("--step-timeout", default="",
                        help="seconds an isolated step may take: one number for every step "
                             "and/or KEY=SECONDS for some, e.g. 'a=400,i=120' (default: 300; "
                             "--quick 150; the kernel grid 420, --quick 240)")
    parser.add_argument("--step-result", help=argparse.SUPPRESS)
    report.add_out_argument(parser, "gpu_check.json and .png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keys = [key.strip() for key in args.steps.split(",") if key.strip()]
    if not keys or set(keys) - set(STEPS):
        parser.error(f"--steps: choose from {','.join(STEPS)}, got {args.steps!r}")
    # The kernel grid compiles every variant (Triton's JIT, a cold cache): more time.
    limits: Dict[str, float] = {key: 150.0 if args.quick else 300.0 for key in STEPS}
    limits["a"] = 240.0 if args.quick else 420.0
    try:
        for part in filter(None, (p.strip() for p in args.step_timeout.split(","))):
            key, _, value = part.rpartition("=")
            for name in ([key] if key else STEPS):
                if name not in STEPS:
                    raise ValueError(f"unknown step {name!r}")
                limits[name] = float(value)
    except ValueError as error:
        parser.error(f"--step-timeout {args.step_timeout!r}: {error}")
    args.step_timeout = limits
    if args.device == "cuda" and not torch.cuda.is_available():
        logger.info("gpu_check: no CUDA GPU is visible here (torch.cuda.is_available() is "
                    "False): nothing was checked or timed. Run it on a machine with a GPU; "
                    "--device cpu runs the same checks on the CPU twins.")
        return 0
    if args.device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 would run the Triton kernel in its interpreter; "
                     "unset it to check the compiled kernel")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
        ctx = Context(args, Path(scratch))
        if args.step_result:  # a child of run_isolated: one step, its row to a file
            row = run_here(keys[0], ctx)
            Path(args.step_result).write_text(json.dumps(row, default=str))
            return 0
        isolate = args.isolate == "yes" or (args.isolate == "auto" and ctx.cuda)
        start = time.perf_counter()
        result = dict(device=str(ctx.device), device_name=report.device_name(ctx.device),
                      gpus=torch.cuda.device_count() if ctx.cuda else 0, quick=args.quick,
                      isolated=isolate, versions=versions(), steps={}, seconds=0.0)
        out = Path(args.out)
        for key in keys:
            name = STEPS[key][0]
            logger.info("gpu_check: %s %s ...", key, name)
            row = run_isolated(key, args, ctx) if isolate else run_here(key, ctx)
            result["steps"][name] = row
            result["seconds"] = time.perf_counter() - start
            logger.info("gpu_check: %s %s %s (%.1f s): %s", key, name, row["status"],
                        row.get("seconds", 0.0), headline(name, row))
            if row["status"] == "error":
                logger.info("%s", row.get("traceback", row.get("error")))
            report.write_results(out, "gpu_check", result)  # after every step
        result["passed"] = all(r["status"] in ("passed", "skipped")
                               for r in result["steps"].values())
        try:
            report.write_results(out, "gpu_check", result, lambda path: plot(result, path))
        except Exception as error:  # noqa: BLE001 (the JSON stands without the picture)
            result["plot_error"] = f"{type(error).__name__}: {error}"
            report.write_results(out, "gpu_check", result)
    print("\n".join(summary_lines(result)), flush=True)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.png'}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
