"""The trainer behind train/run.py: process group, training step, evaluation, checkpoints.

One ``Trainer`` owns the loaders, the model, the optimizer and the run's position. A training
step reads nothing from the GPU: losses accumulate on the device and are gathered only at the
logging steps and at the end of an epoch; every host-to-device copy goes through the loader's
pinned transfers. A checkpoint holds every rank's loader position and the epoch's running
totals, so a resumed epoch reports the whole epoch.
"""
import argparse
import functools
import json
import logging
import math
import os
import pickle
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from dali_relabel import ReLabelLoader, ValLoader, soft_target_cross_entropy
from dali_relabel.files import atomic_path
from dali_relabel.loading import resolve_device
from token_labeling import TokenLabelingModel, create_token_model

logger = logging.getLogger("train")

SGD_NAMES = ("sgd", "nesterov", "momentum")


class Distributed:
    """The process group, if torchrun started several processes (or one with WORLD_SIZE)."""

    def __init__(self, device: Optional[str], backend: Optional[str]) -> None:
        use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available; use --device cpu")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        # The loaders' rule for a bare "cuda" (LOCAL_RANK modulo the visible GPUs, so that a
        # launcher giving each process one visible GPU works too); the loaders then get this
        # device explicitly.
        self.device = resolve_device("cuda" if use_cuda else "cpu")[0]
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.vote_group = None
        if self.world > 1:
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                    device_id=self.device if use_cuda else None)
            # Votes travel as CPU tensors on their own gloo group: neither casting nor reading
            # one waits for the GPU, and they never queue behind DDP's collectives.
            self.vote_group = dist.new_group(backend="gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: List[float]) -> List[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor`, stacked: Tensor[world, *tensor.shape]."""
        if self.world == 1:
            return tensor[None]
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    def start_vote(self, yes: bool) -> Callable[[], bool]:
        """Starts asking every rank; the returned function waits for the answer: whether any
        rank voted yes. Started at the beginning of a step and read at its end, the all-reduce
        overlaps the step."""
        if self.world == 1:
            return lambda: yes
        ballot = torch.tensor([float(yes)])
        work = dist.all_reduce(ballot, group=self.vote_group, async_op=True)

        def result() -> bool:
            work.wait()
            return ballot.item() > 0  # a CPU tensor: no GPU sync

        return result

    def gather(self, obj: Any) -> List[Any]:
        if self.world == 1:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def learning_rate(step: int, args: argparse.Namespace, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine to min_lr, per step."""
    warmup = int(args.warmup_epochs * steps_per_epoch)
    total = args.epochs * steps_per_epoch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def save_atomic(obj: Dict[str, Any], path: str) -> None:
    """torch.save to `path` through a synced temporary (temporaries of killed saves are
    cleaned up by atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str, *, option: str) -> Any:
    """A checkpoint's contents, unpickled by torch's weights-only loader: tensors and plain
    Python values only (what this trainer saves). Anything else is refused: unpickling
    arbitrary objects can run code.

    Raises:
        SystemExit: One line naming the file, for a refused or unreadable checkpoint.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = str(e).splitlines()
        detail = next((line.strip() for line in lines if "WeightsUnpickler error" in line),
                      lines[0] if lines else type(e).__name__)
        raise SystemExit(f"{option} {path}: refusing to load it: it holds objects other than "
                         f"tensors and plain values, and loading those could run code "
                         f"({detail})") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise SystemExit(f"{option} {path}: cannot read the checkpoint "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e


def read_real_labels(path: str, val: ValLoader) -> List[List[int]]:
    """ReaL label sets per ValLoader path: the JSON follows the sorted val file names."""
    with open(path, encoding="utf-8") as f:
        sets = json.load(f)
    names = sorted(os.path.basename(p) for p in val.paths)
    if len(sets) != len(names):
        raise SystemExit(f"--real-labels {path}: {len(sets)} label sets for {len(names)} "
                         "validation images")
    position = {name: i for i, name in enumerate(names)}
    return [sets[position[os.path.basename(p)]] for p in val.paths]


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: ValLoader, real: Optional[List[List[int]]],
             dist_: Distributed, amp: bool) -> Dict[str, float]:
    model.eval()
    counts = np.zeros(5)  # top1, top5, real hits, images with a real label set, images
    seen = 0
    for images, labels in val:
        with torch.autocast(dist_.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == labels).sum().item()
        counts[1] += (top5 == labels[:, None]).any(1).sum().item()
        if real is not None:  # ReaL leaves out the images with an empty label set
            predicted = top5[:, 0].tolist()
            sets = [real[row] for row in val.indices[seen:seen + len(labels)]]
            counts[2] += sum(p in labels_ for p, labels_ in zip(predicted, sets))
            counts[3] += sum(bool(labels_) for labels_ in sets)
        seen += len(labels)
        counts[4] += len(labels)
    top1, top5, real_hits, real_total, total = dist_.all_sum(counts.tolist())
    result = dict(val_top1=100 * top1 / total, val_top5=100 * top5 / total)
    if real is not None:
        result["val_real"] = 100 * real_hits / max(1, real_total)
    return result


def train_loader(args: argparse.Namespace, device: torch.device) -> ReLabelLoader:
    """The training loader of the run's flags."""
    return ReLabelLoader(
        args.data, args.labelmaps, args.batch_size, device=device,
        image_size=args.image_size, label_mode=args.label_mode, seed=args.seed,
        num_threads=args.threads, channels_last=args.channels_last, exclude=args.exclude,
        return_meta=True, output_size=args.token_targets or 1,
        sparse_targets=args.token_targets > 0, crop_targets=args.token_targets > 0,
        num_crops=args.num_crops, mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax, mixup_prob=args.mixup_prob,
        mixup_switch_prob=args.mixup_switch_prob, mixup_mode=args.mixup_mode,
        auto_augment=args.aa, color_jitter=args.color_jitter, re_prob=args.reprob,
        re_mode=args.remode, re_count=args.recount,
        # --smoothing is the recipe of the original labels; ReLabel's targets are soft already.
        label_smoothing=args.smoothing if args.label_mode == "original" else 0.0)


class EpochMeter:
    """The running totals of an epoch: the loss on the device (read back only when the
    trainer synchronizes), the rest on the host; saved with a checkpoint, so that a resumed
    epoch reports the steps before the interruption too."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.samples, self.steps = 0, 0
        self.wait_s = self.step_s = self.pooling_s = self.elapsed_s = 0.0

    def add_step(self, loss: torch.Tensor, samples: int, step: int) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double(), 0.0) * samples
        self.first_bad = torch.where(~finite & (self.first_bad < 0), step, self.first_bad)
        self.samples += samples
        self.steps += 1

    def state_dict(self) -> Dict[str, float]:
        """The totals as plain values (reads the loss back from the device)."""
        return dict(loss_sum=float(self.loss_sum), first_bad=int(self.first_bad),
                    samples=self.samples, steps=self.steps, wait_s=self.wait_s,
                    step_s=self.step_s, pooling_s=self.pooling_s, elapsed_s=self.elapsed_s)

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.loss_sum.fill_(float(state["loss_sum"]))
        self.first_bad.fill_(int(state["first_bad"]))
        self.samples, self.steps = int(state["samples"]), int(state["steps"])
        for key in ("wait_s", "step_s", "pooling_s", "elapsed_s"):
            setattr(self, key, float(state[key]))


class Trainer:
    def __init__(self, args: argparse.Namespace, dist_: Distributed) -> None:
        self.args, self.dist = args, dist_
        device = dist_.device
        self.train = train_loader(args, device)
        self.val = None
        self.real = None
        if args.val_data:
            self.val = ValLoader(args.val_data, args.batch_size, device=device,
                                 image_size=args.image_size, resize_size=args.val_resize,
                                 classes=self.train.store.classes, num_threads=args.threads,
                                 channels_last=args.channels_last)
            if args.real_labels:
                self.real = read_real_labels(args.real_labels, self.val)
        if args.lr is None:
            global_batch = args.batch_size * dist_.world
            args.lr = 0.1 * global_batch / 256 if args.opt in SGD_NAMES else 1e-3
        torch.manual_seed(args.seed)
        create = (functools.partial(create_token_model, token_targets=args.token_targets,
                                    image_size=args.image_size)
                  if args.token_targets else timm.create_model)
        model = create(args.model, pretrained=args.pretrained,
                       num_classes=self.train.num_classes, drop_path_rate=args.drop_path or None)
        if args.checkpoint:
            state = load_checkpoint(args.checkpoint, option="--checkpoint")
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.ema = ModelEmaV3(model, decay=args.ema) if args.ema > 0 else None
        self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr,
                                             weight_decay=args.weight_decay,
                                             momentum=args.momentum)
        self.net = TokenLabelingModel(model) if args.token_targets else model
        if dist_.world > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            self.net = torch.compile(self.net)
        self.epoch, self.step, self.best = 0, 0, -1.0
        self.meter = EpochMeter(device)
        self.signalled = False  # set by the SIGTERM handler only
        self.stop_agreed = False  # all ranks agreed to stop (a SIGTERM reached one)
        self.last_good: Optional[str] = None
        self.metrics_path = os.path.join(args.output, "metrics.jsonl")
        self.last_path = os.path.join(args.output, "last.pt")
        self.best_path = os.path.join(args.output, "best.pt")

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint(self, path: str) -> None:
        """All ranks call this: every rank's loader position and epoch totals go into rank
        0's file."""
        ranks = self.dist.gather(dict(loader=self.train.state_dict(),
                                      meter=self.meter.state_dict()))
        if self.dist.main:
            save_atomic(dict(model=self.model.state_dict(),
                             ema=self.ema.module.state_dict() if self.ema else None,
                             optimizer=self.optimizer.state_dict(), epoch=self.epoch,
                             step=self.step, best=self.best,
                             loaders=[rank["loader"] for rank in ranks],
                             meters=[rank["meter"] for rank in ranks],
                             args=vars(self.args)), path)
        self.last_good = path

    def resume(self, path: str) -> None:
        state = load_checkpoint(path, option="--resume")
        if len(state["loaders"]) != self.dist.world:
            raise SystemExit(f"{path} was written by {len(state['loaders'])} processes; "
                             f"resume with as many (now {self.dist.world})")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        self.train.load_state_dict(state["loaders"][self.dist.rank])
        if state.get("meters") and state["loaders"][self.dist.rank]["batches_done"] > 0:
            self.meter.load_state_dict(state["meters"][self.dist.rank])
        self.last_good = path
        if self.dist.main:
            logger.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.step)

    # ---- training ----------------------------------------------------------------------
    def train_step(self, batch: Any, steps_per_epoch: int) -> None:
        """One optimizer step on a loader batch; reads nothing back from the device."""
        args = self.args
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, args, steps_per_epoch)
        with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = self.net(batch.images)
        if args.token_targets:  # class token on the crop's target, patch tokens on theirs
            logits, token_logits = logits
            loss = soft_target_cross_entropy(logits, batch.crop_targets)
            loss = loss + args.token_loss_weight * soft_target_cross_entropy(
                token_logits, batch.targets)
        else:
            loss = soft_target_cross_entropy(logits, batch.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.meter.add_step(loss.detach(), len(batch.images), self.step)
        self.step += 1

    def train_epoch(self) -> Dict[str, float]:
        """One epoch (or what is left of it after a resume). Losses accumulate on the device
        and are gathered only every --log-every steps and at the end, where the non-finite
        check happens; SIGTERM is agreed on every step by a vote that overlaps the step, so
        every rank stops after the same step."""
        args, train, meter = self.args, self.train, self.meter
        self.net.train()
        steps = len(train)
        done_before = train.state_dict()["batches_done"]
        if done_before == 0:
            self.meter = meter = EpochMeter(self.dist.device)
        bar = tqdm(total=steps, initial=done_before, desc=f"epoch {self.epoch}",
                   disable=not (self.dist.main and args.progress), dynamic_ncols=True)
        train.label_pooling_ms()
        epoch_start = tick = time.perf_counter()
        elapsed_before = meter.elapsed_s
        for batch in train:
            fetched = time.perf_counter()
            meter.wait_s += fetched - tick
            stop_vote = self.dist.start_vote(self.signalled)
            self.train_step(batch, steps)
            if args.trace_samples:
                self.trace(batch)
            tick = time.perf_counter()
            meter.step_s += tick - fetched
            meter.elapsed_s = elapsed_before + tick - epoch_start
            bar.update(1)
            # At the epoch's last step the end-of-epoch path evaluates and checkpoints (and
            # fit() stops there on a SIGTERM).
            mid_epoch = train.state_dict()["batches_done"] < steps
            stop = stop_vote() and mid_epoch
            checkpoint_now = args.ckpt_every and self.step % args.ckpt_every == 0 and mid_epoch
            if (self.step % args.log_every == 0 and mid_epoch) or checkpoint_now or stop:
                total_loss, total_samples = self.sync()
                meter.pooling_s += train.label_pooling_ms() / 1e3
                bar.set_postfix(loss=f"{total_loss / total_samples:.3f}",
                                img_s=f"{total_samples / max(meter.elapsed_s, 1e-9):.0f}",
                                pooling=f"{100 * meter.pooling_s / max(meter.elapsed_s, 1e-9):.2f}%")
                if stop or checkpoint_now:
                    self.checkpoint(self.last_path)
                if stop:
                    self.stop_agreed = True
                    bar.close()
                    return {}
        bar.close()
        total_loss, total_samples = self.sync()
        meter.pooling_s += train.label_pooling_ms() / 1e3
        wait_s, step_s, pooling_s, elapsed = self.dist.all_sum(
            [meter.wait_s, meter.step_s, meter.pooling_s, meter.elapsed_s])
        world, done = self.dist.world, max(1, meter.steps)
        busy_s = wait_s + step_s
        total_samples, busy_s = max(1, total_samples), max(busy_s, 1e-9)
        return dict(train_loss=total_loss / total_samples,
                    images_per_s=total_samples / (elapsed / world),
                    data_wait_ms=1e3 * wait_s / world / done,
                    step_ms=1e3 * busy_s / world / done,
                    label_pooling_ms=1e3 * pooling_s / world / done,
                    label_pooling_overhead_pct=100 * pooling_s / busy_s,
                    steps=done)

    def sync(self) -> tuple:
        """(loss sum, samples) over all ranks; stops on a non-finite loss. One collective,
        read back once: the only host sync of a logging step."""
        meter = self.meter
        mine = torch.stack([meter.loss_sum, torch.full_like(meter.loss_sum, meter.samples),
                            meter.first_bad.double()])
        losses, counts, bad = self.dist.all_gather(mine).T.tolist()
        bad_steps = [int(step) for step in bad if step >= 0]
        if bad_steps:
            self.fail_non_finite(min(bad_steps))
        return sum(losses), sum(counts)

    def share_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere, so every rank evaluates the saved model
        (DDP syncs buffers only at the start of a forward pass)."""
        if self.dist.world == 1:
            return
        models = [self.model] + ([self.ema.module] if self.ema is not None else [])
        for model in models:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def trace(self, batch) -> None:
        rows = self.dist.gather(batch.sample_index.tolist())
        if self.dist.main:
            with open(self.args.trace_samples, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(epoch=self.epoch, step=self.step, rows=rows)) + "\n")

    def fail_non_finite(self, step: int) -> None:
        where = self.last_good or "none written yet"
        message = (f"non-finite loss at step {step} (epoch {self.epoch}); stopping. Last good "
                   f"checkpoint: {where}. Lower --lr or check the data, then --resume it.")
        if not self.dist.main:
            raise SystemExit(1)
        logger.error(message)
        raise SystemExit(message)

    def evaluate(self) -> Dict[str, float]:
        """Top-1, top-5 (and ReaL) of the model that is saved (the EMA when there is one)."""
        self.share_buffers()
        eval_model = self.ema.module if self.ema is not None else self.model
        return evaluate(eval_model, self.val, self.real, self.dist, self.args.amp)

    def fit(self) -> Dict[str, float]:
        args = self.args
        last: Dict[str, float] = {}
        while self.epoch < args.epochs:
            self.train.set_epoch(self.epoch)
            lr = learning_rate(self.step, args, len(self.train))
            record = self.train_epoch()
            if not record:  # SIGTERM mid-epoch: train_epoch wrote the checkpoint
                if self.dist.main:
                    logger.info("stopped by SIGTERM at step %d; wrote %s", self.step,
                                self.last_path)
                return last
            evaluated = self.val is not None and (
                (self.epoch + 1) % args.eval_every == 0 or self.epoch + 1 == args.epochs)
            if evaluated:
                record.update(self.evaluate())
            record = dict(epoch=self.epoch, lr=lr, **record)
            self.epoch += 1
            self.meter = EpochMeter(self.dist.device)
            improved = evaluated and record["val_top1"] > self.best
            if improved:
                self.best = record["val_top1"]
            self.checkpoint(self.last_path)
            if self.dist.main:
                if improved:
                    with atomic_path(self.best_path) as tmp:
                        shutil.copyfile(self.last_path, tmp)
                with open(self.metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items()))
            last = record
            self.stop_agreed = self.dist.start_vote(self.signalled)()
            if self.stop_agreed:  # SIGTERM at the end of an epoch: it is saved
                if self.dist.main:
                    logger.info("stopped by SIGTERM after epoch %d; wrote %s", self.epoch - 1,
                                self.last_path)
                return last
        return last
