"""Training steps on device tensors without DALI, for gpu_check: a label-map store of random
maps, a timm model's step (bf16 autocast, channels_last), timing with CUDA events, the host
syncs of a whole step (targets from label_pooling with the store on the device, the loader's
mixing, random erasing, forward, backward, optimizer step) and a DDP run on two processes.

The mixing is the loader's own (``Mixing`` plans it on the host, ``Mixer`` applies it on the
device, as ReLabelLoader does); ``dali_relabel.loading`` exports neither yet, so
``loader_mixing`` imports them from their module, the one import here outside the public
fronts.
"""
import json
import os
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from dali_relabel import LabelMapStore, label_pooling, soft_target_cross_entropy, write_labelmaps
from dali_relabel.augment import random_erase
from harness.inputs import make_inputs, random_boxes

SYNC_WARNING = "synchroniz"  # torch's sync debug mode: "called a synchronizing CUDA operation"


def random_store(path: Path, rows: int, num_classes: int = 1000, seed: int = 0) -> Path:
    """An HDF5 label-map file of `rows` random top-5 15 x 15 maps (harness.inputs)."""
    values, indices, _ = make_inputs(rows, 5, num_classes, classes_per_image=32, seed=seed)
    labels = indices[:, 0, 7, 7].long()
    write_labelmaps(path, values, indices, labels, [f"img_{n:06d}.JPEG" for n in range(rows)],
                    [f"class_{c}" for c in range(num_classes)])
    return path


def open_store(path: Path, device: torch.device) -> LabelMapStore:
    """The store on `device` ("device" placement on a GPU, in memory on the CPU)."""
    if device.type == "cuda":
        return LabelMapStore.open(path, placement="device", device=device)
    return LabelMapStore.open(path, placement="memory")


def pinned(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, copied from pinned memory without waiting for the GPU."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def loader_mixing(store: LabelMapStore, device: torch.device, image_size: int, *,
                  output_size: int = 1, fused_gather: bool = True, mode: str = "elem"):
    """The loader's mixup and CutMix (timm's parameters, localized CutMix targets):
    (plan(n, rng) -> the draws of n samples, mix(images, targets, boxes, flips, rows, draws)
    -> mixed images and targets); boxes, flips and rows on the CPU, as the loader passes
    them."""
    from dali_relabel.loading import Mixer, Mixing, TargetMaker

    mixing = Mixing.create(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=None,
                           mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode=mode,
                           image_size=image_size)
    maker = TargetMaker(store, device, label_mode="localized_multi", output_size=output_size,
                        fused_gather=fused_gather)
    mixer = Mixer(maker, image_size)
    return (lambda n, rng: mixing.plan(n, n, image_size, rng)), mixer


def erase_boxes(n: int, size: int, count: int, rng: np.random.Generator,
                prob: float = 0.5) -> np.ndarray:
    """Random erasing rectangles int32 [n, count, 4] (top, left, height, width), zero-sized
    where nothing is erased (about 1 - prob of the images), as the loader plans them."""
    boxes = np.zeros((n, count, 4), np.int32)
    for i in np.flatnonzero(rng.random(n) < prob):
        for k in range(rng.integers(1, count + 1)):
            h, w = rng.integers(1, size, size=2)
            boxes[i, k] = (rng.integers(0, size - h + 1), rng.integers(0, size - w + 1), h, w)
    return boxes


class TrainStep:
    """One SGD step of a timm model (random init) on soft targets: bf16 autocast where
    `amp`, channels_last where asked."""

    def __init__(self, model: str, num_classes: int, device: torch.device, *,
                 channels_last: bool = True, amp: bool = True, ddp_rank: Optional[int] = None):
        import timm

        self.device, self.amp, self.channels_last = device, amp, channels_last
        net = timm.create_model(model, num_classes=num_classes).to(device)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if ddp_rank is not None:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[ddp_rank] if device.type == "cuda" else None)
        self.model = net
        self.optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                         weight_decay=1e-4)

    def images(self, batch: int, size: int, generator: Optional[torch.Generator] = None):
        images = torch.randn(batch, 3, size, size, device=self.device, generator=generator)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last \
            else images

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(images)
        loss = soft_target_cross_entropy(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def event_ms(fn: Callable[[], object], device: torch.device, repeats: int,
              warmup: int = 2) -> Tuple[float, List[float]]:
    """Median milliseconds of `fn` (CUDA events on a GPU, wall clock on the CPU) after
    `warmup` untimed calls: (median, every time)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in pairs]
    else:
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), times


def label_pooling_share(device: torch.device, store_path: Path, *, model: str, batch: int,
                        image_size: int, repeats: int, warmup: int = 2) -> Dict:
    """LabelPooling's share of a training step: the step (forward, backward, optimizer) and
    label_pooling of the batch (store on the device, gather fused, no data checks), timed
    apart."""
    torch.backends.cudnn.benchmark = True
    store = open_store(store_path, device)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, len(store), (batch,), generator=gen).to(device)
    boxes = random_boxes(batch, gen).to(device)
    step = TrainStep(model, store.num_classes, device)
    images = step.images(batch, image_size)

    def pool():
        return label_pooling(store.values, store.indices, boxes, num_classes=store.num_classes,
                             sample_index=rows, check_inputs=False)

    targets = pool()
    step_ms, _ = event_ms(lambda: step(images, targets), device, repeats, warmup)
    pool_ms, _ = event_ms(pool, device, max(repeats, 20))
    return dict(model=model, batch=batch, image_size=image_size, amp="bf16",
                channels_last=True, step_ms=step_ms, label_pooling_ms=pool_ms,
                share_percent=100 * pool_ms / (step_ms + pool_ms))


def loader_like_step(device: torch.device, store_path: Path, *, model: str, batch: int,
                     image_size: int, seed: int) -> Callable[[int], torch.Tensor]:
    """A training step as ReLabelLoader and the trainer make it, minus DALI: crop boxes,
    flips, rows and the mixing and erasing draws planned on the host; on the device the
    targets (label_pooling, store on the device), mixup/CutMix, random erasing ("pixel"),
    forward, backward and the optimizer step. Returns step(i) -> the loss (not read)."""
    store = open_store(store_path, device)
    plan_mixing, mix = loader_mixing(store, device, image_size)
    train = TrainStep(model, store.num_classes, device)
    noise = torch.Generator(device=device).manual_seed(seed)

    def step(i: int) -> torch.Tensor:
        rng = np.random.default_rng([seed, i])
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        rows = torch.from_numpy(rng.integers(0, len(store), batch))
        boxes = random_boxes(batch, gen)
        flips = torch.from_numpy(rng.random(batch) < 0.5)
        targets = label_pooling(store.values, store.indices, pinned(boxes.numpy(), device),
                                num_classes=store.num_classes, flip=pinned(flips.numpy(), device),
                                sample_index=pinned(rows.numpy(), device), check_inputs=False)
        images = train.images(batch, image_size, noise)
        images, targets = mix(images, targets, boxes, flips, rows, plan_mixing(batch, rng))
        images = random_erase(images, erase_boxes(batch, image_size, 1, rng), "pixel",
                              seed * 1000 + i)
        return train(images, targets)

    return step


def count_host_syncs(step: Callable[[int], torch.Tensor], device: torch.device,
                     steps: int) -> Dict:
    """Warnings of torch.cuda.set_sync_debug_mode("warn") over `steps` steps after one
    untimed step: the count, and where the first ones were made."""
    step(0)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in range(1, steps + 1):
                step(i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    return dict(steps=steps, host_syncs=len(syncs),
                first=[f"{w.filename}:{w.lineno}: {str(w.message)[:200]}" for w in syncs[:5]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world: int, backend: str, port: int, out: str, store_path: str,
               model: str, batch: int, image_size: int, steps: int) -> None:
    """One rank of a DDP run (torch.multiprocessing.spawn): each rank pools its own rows'
    targets and trains `steps` steps; writes its parameters' checksum and whether they
    equal rank 0's after the last step (DDP averaged the gradients) to out/rank{r}.json."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "gloo":
        torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        store = open_store(Path(store_path), device)
        train = TrainStep(model, store.num_classes, device, ddp_rank=rank)
        gen = torch.Generator().manual_seed(rank)
        losses = []
        for _ in range(steps):
            rows = torch.randint(0, len(store), (batch,), generator=gen).to(device)
            boxes = random_boxes(batch, gen).to(device)
            targets = label_pooling(store.values, store.indices, boxes,
                                    num_classes=store.num_classes, sample_index=rows,
                                    check_inputs=False)
            losses.append(train(train.images(batch, image_size), targets))
        flat = torch.cat([p.detach().float().flatten() for p in train.model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result = dict(rank=rank, device=str(device), losses=[float(v) for v in losses],
                      max_param_diff_to_rank0=float((gathered[0] - flat).abs().max()),
                      parameters=flat.numel())
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ddp(device: torch.device, store_path: Path, out: Path, *, model: str, batch: int,
            image_size: int, steps: int, timeout: float) -> Dict:
    """ddp_worker on 2 processes (NCCL on GPUs 0 and 1, gloo on the CPU); each rank's
    result. A run past `timeout` seconds is stopped (TimeoutError)."""
    import torch.multiprocessing as mp

    backend = "nccl" if device.type == "cuda" else "gloo"
    context = mp.start_processes(
        ddp_worker, args=(2, backend, free_port(), str(out), str(store_path), model, batch,
                          image_size, steps), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"the DDP run did not finish in {timeout:.0f} s")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return dict(backend=backend, world=2, model=model, batch_per_rank=batch,
                image_size=image_size, steps=steps, ranks=ranks,
                max_param_diff=max(r["max_param_diff_to_rank0"] for r in ranks))
