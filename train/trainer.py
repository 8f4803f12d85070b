"""The trainer behind train/run.py: process group, training step, evaluation, checkpoints.

One ``Trainer`` owns the loaders, the model, the optimizer and the run's position. A training
step reads nothing from the GPU: losses accumulate on the device and are gathered only at the
logging steps and at the end of an epoch; every host-to-device copy goes through the loader's
pinned transfers. A checkpoint holds every rank's loader position and the epoch's running
totals, so a resumed epoch reports the whole epoch.

Bad input stops a run before its first step, in one line naming the flag: the loaders' argument
errors are mapped to the flags that set them, checkpoints are checked against the model, the
optimizer and the loader before anything is loaded, and a failed write (a full disk) names the
file and the last good checkpoint, which it leaves as it was.
"""
import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import pickle
import re
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from tqdm import tqdm

from dali_relabel import LabelMapError, ReLabelLoader, ValLoader, soft_target_cross_entropy
from dali_relabel.files import atomic_path
from dali_relabel.loading import resolve_device
from token_labeling import TokenLabelingModel, create_token_model

logger = logging.getLogger("train")

SGD_NAMES = ("sgd", "nesterov", "momentum")
# The loaders' arguments and the flags that set them, to name the flag in their errors.
LOADER_FLAGS = dict(
    image_root="--data", labelmaps="--labelmaps", exclude="--exclude", batch_size="--batch-size",
    image_size="--image-size", resize_size="--val-resize", num_threads="--threads",
    num_crops="--num-crops", seed="--seed", output_size="--token-targets", auto_augment="--aa",
    color_jitter="--color-jitter", re_prob="--reprob", re_mode="--remode", re_count="--recount",
    mixup_alpha="--mixup", cutmix_alpha="--cutmix", cutmix_minmax="--cutmix-minmax",
    mixup_prob="--mixup-prob", mixup_switch_prob="--mixup-switch-prob",
    mixup_mode="--mixup-mode", label_smoothing="--smoothing")
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # EFBIG: over RLIMIT_FSIZE


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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (over the gloo group: no GPU sync)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.vote_group)
        return box[0]

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


class WriteError(Exception):
    """A file that could not be written, and the OSError why."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error

    def describe(self, last_good: Optional[str]) -> str:
        """One line: the file, why, and the checkpoint to continue from."""
        full = self.error.errno in NO_SPACE
        why = ("no space left on the device (or over the file-size limit)" if full else
               self.error.strerror or str(self.error))
        return (f"cannot write {self.path}: {why}; last good checkpoint: "
                f"{last_good or 'none written yet'}; {'free some space, then ' if full else ''}"
                "continue with --resume auto")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turns a failed write of `path` into a WriteError (torch.save reports its file's
    OSError as the context of a RuntimeError)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause: Optional[BaseException] = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise WriteError(path, cause) from error


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@contextlib.contextmanager
def flags_named(default: str, labelmaps: Optional[str] = None) -> Iterator[None]:
    """A loader's ValueError or OSError as SystemExit, in one line naming the flag: its
    arguments become the flags that set them (LOADER_FLAGS); a message that names none is
    put under `default` (under --labelmaps when it is about that file)."""
    try:
        yield
    except (ValueError, OSError) as error:
        message = one_line(error)
        for name, flag in LOADER_FLAGS.items():
            message = re.sub(rf"\b{name}=", f"{flag} ", message)  # batch_size=8: --batch-size 8
        name = re.match(r"\w*", message).group()
        if name in LOADER_FLAGS:
            message = LOADER_FLAGS[name] + message[len(name):]
        elif not message.startswith("--"):
            about_maps = labelmaps and (isinstance(error, LabelMapError) or labelmaps in message)
            message = f"{'--labelmaps' if about_maps else default}: {message}"
        raise SystemExit(message) from error


def read_real_labels(path: str, val: ValLoader, num_classes: int) -> List[List[int]]:
    """ReaL label sets per ValLoader path: the JSON follows the sorted val file names.

    Raises:
        SystemExit: One line naming the file: unreadable, not JSON, not one list of class
            indices in [0, num_classes) per validation image.
    """
    where = f"--real-labels {path}"
    expected = (f"a JSON list of ReaL label sets, one list of class indices in [0, "
                f"{num_classes}) per validation image (in the order of the sorted file names)")
    try:
        with open(path, encoding="utf-8") as f:
            sets = json.load(f)
    except OSError as e:
        raise SystemExit(f"{where}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SystemExit(f"{where}: not valid JSON ({one_line(e)}); expected {expected}") from e
    if not isinstance(sets, list):
        raise SystemExit(f"{where}: found a JSON {type(sets).__name__}; expected {expected}")
    for i, labels in enumerate(sets):
        if not isinstance(labels, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes
                for c in labels):
            raise SystemExit(f"{where}: entry {i} is {json.dumps(labels)[:60]}; expected "
                             f"{expected}")
    names = sorted(os.path.basename(p) for p in val.paths)
    if len(sets) != len(names):
        raise SystemExit(f"{where}: {len(sets)} label sets for {len(names)} validation images")
    position = {name: i for i, name in enumerate(names)}
    return [sets[position[os.path.basename(p)]] for p in val.paths]


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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

    KEYS = ("loss_sum", "first_bad", "samples", "steps", "wait_s", "step_s", "pooling_s",
            "elapsed_s")

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


# What a checkpoint of this trainer holds: key -> (what it must be, its check); all but
# 'meters' (the epoch's totals, absent from older checkpoints) are required.
CHECKPOINT_KEYS: Dict[str, Any] = {
    "model": ("a state_dict (names to tensors)", _is_state_dict),
    "ema": ("None or a state_dict", lambda v: v is None or _is_state_dict(v)),
    "optimizer": ("an optimizer state_dict",
                  lambda v: isinstance(v, dict) and {"state", "param_groups"} <= set(v)),
    "epoch": ("an int >= 0", _is_count),
    "step": ("an int >= 0", _is_count),
    "best": ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    "loaders": ("a list of loader positions (dicts), one per process",
                lambda v: isinstance(v, list) and v and all(isinstance(x, dict) for x in v)),
    "meters": ("None or a list of epoch totals with the keys " + ", ".join(EpochMeter.KEYS),
               lambda v: v is None or isinstance(v, list) and all(
                   isinstance(m, dict) and all(isinstance(m.get(k), (int, float))
                                               for k in EpochMeter.KEYS) for m in v)),
}


def check_train_checkpoint(state: Any, where: str) -> None:
    """Refuses contents that are not a checkpoint of this trainer, in one line."""
    if not isinstance(state, dict) or "loaders" not in state and "model" not in state:
        what = "a model state_dict" if _is_state_dict(state) else f"a {type(state).__name__}"
        raise SystemExit(f"{where}: not a checkpoint of train/run.py (found {what}); to "
                         "start from a model's weights, pass it as --checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in state and key != "meters"]
    if missing:
        raise SystemExit(f"{where}: not a checkpoint of train/run.py: it lacks "
                         f"{', '.join(map(repr, missing))}")
    for key, (expected, ok) in CHECKPOINT_KEYS.items():
        if not ok(state.get(key)):
            found = type(state.get(key)).__name__
            raise SystemExit(f"{where}: its {key!r} is not {expected} (found a {found})")


class Trainer:
    def __init__(self, args: argparse.Namespace, dist_: Distributed) -> None:
        self.args, self.dist = args, dist_
        device = dist_.device
        with flags_named("--data", labelmaps=args.labelmaps and str(args.labelmaps)):
            self.train = train_loader(args, device)
        self.val = None
        self.real = None
        if args.val_data:
            with flags_named("--val-data"):
                self.val = ValLoader(args.val_data, args.batch_size, device=device,
                                     image_size=args.image_size, resize_size=args.val_resize,
                                     classes=self.train.store.classes, num_threads=args.threads,
                                     channels_last=args.channels_last)
            if args.real_labels:
                self.real = read_real_labels(args.real_labels, self.val, self.train.num_classes)
        if args.lr is None:
            global_batch = args.batch_size * dist_.world
            args.lr = 0.1 * global_batch / 256 if args.opt in SGD_NAMES else 1e-3
        torch.manual_seed(args.seed)
        create = (functools.partial(create_token_model, token_targets=args.token_targets,
                                    image_size=args.image_size)
                  if args.token_targets else timm.create_model)
        try:
            model = create(args.model, pretrained=args.pretrained,
                           num_classes=self.train.num_classes,
                           drop_path_rate=args.drop_path or None)
        except (RuntimeError, ValueError, OSError) as e:  # e.g. --pretrained weights missing
            raise SystemExit(f"--model {args.model}: cannot create it ({one_line(e)})") from e
        self.model, self.ema = model, None
        if args.checkpoint:  # --evaluate evaluates what the run reported: its EMA, if any
            self.load_weights(args.checkpoint, "--checkpoint", prefer_ema=args.evaluate)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(model, decay=args.ema) if args.ema > 0 else None
        try:
            self.optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr,
                                                 weight_decay=args.weight_decay,
                                                 momentum=args.momentum)
        except ValueError as e:
            raise SystemExit(f"--opt {args.opt}: cannot create the optimizer "
                             f"({one_line(e)})") from e
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
    def write_on_main(self, write: Callable[[], None]) -> None:
        """Runs `write` on rank 0. A failed write (a WriteError) stops every rank: rank 0
        with one line naming the file, the others with status 1."""
        failure = None
        if self.dist.main:
            try:
                write()
            except WriteError as e:
                failure = e.describe(self.last_good)
        failure = self.dist.broadcast(failure)
        if failure:
            raise SystemExit(failure if self.dist.main else 1)

    def checkpoint(self, path: str, *, best: bool = False) -> None:
        """All ranks call this: every rank's loader position and epoch totals go into rank
        0's file (and into best.pt too with `best`, written first: if it cannot be, `path`
        keeps the last good checkpoint)."""
        ranks = self.dist.gather(dict(loader=self.train.state_dict(),
                                      meter=self.meter.state_dict()))

        def save() -> None:
            state = dict(model=self.model.state_dict(),
                         ema=self.ema.module.state_dict() if self.ema else None,
                         optimizer=self.optimizer.state_dict(), epoch=self.epoch,
                         step=self.step, best=self.best,
                         loaders=[rank["loader"] for rank in ranks],
                         meters=[rank["meter"] for rank in ranks], args=vars(self.args))
            for target in ([self.best_path] if best else []) + [path]:
                with writing(target):
                    save_atomic(state, target)

        self.write_on_main(save)
        self.last_good = path

    def load_weights(self, path: str, option: str, *, prefer_ema: bool = False) -> None:
        """The model's weights from a state_dict or a train checkpoint ('model', or its
        'ema' with `prefer_ema` when it holds one), checked against the model first."""
        state = load_checkpoint(path, option=option)
        train_checkpoint = isinstance(state, dict) and isinstance(state.get("model"), Mapping)
        weights = state
        if train_checkpoint:
            use_ema = prefer_ema and state.get("ema") is not None
            weights = state["ema"] if use_ema else state["model"]
            if use_ema and self.dist.main:
                logger.info("%s %s: its EMA weights, which the run evaluated", option, path)
        self.check_weights(weights, f"{option} {path}",
                           state.get("args") if train_checkpoint else None)
        for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
            model.load_state_dict(weights)

    def check_weights(self, weights: Any, where: str, saved_args: Any = None) -> None:
        """Refuses weights that do not fit the model, in one line: the keys it lacks or does
        not know and the shapes that differ."""
        if not _is_state_dict(weights):
            raise SystemExit(f"{where}: expected a state_dict (parameter names to tensors) or "
                             f"a train checkpoint holding one, found a {type(weights).__name__}")
        own = self.model.state_dict()
        missing = [key for key in own if key not in weights]
        unknown = [key for key in weights if key not in own]
        reshaped = [f"{key}: saved shape {list(weights[key].shape)}, now {list(value.shape)}"
                    for key, value in own.items()
                    if key in weights and weights[key].shape != value.shape]
        if missing or unknown or reshaped:
            problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in (
                (missing, "weights missing"), (unknown, "unknown")) if keys] + reshaped[:2]
            saved = (saved_args or {}).get("model") if isinstance(saved_args, dict) else None
            by = f"saved by --model {saved}, " if saved and saved != self.args.model else ""
            raise SystemExit(f"{where}: its weights do not fit --model {self.args.model} with "
                             f"{self.train.num_classes} classes ({by}{'; '.join(problems)})")

    def resume(self, path: str) -> None:
        """Continues the run of a checkpoint, checked first in full: its structure, its
        world size, optimizer, weights and loader position must be this run's."""
        where = f"--resume {path}"
        state = load_checkpoint(path, option="--resume")
        check_train_checkpoint(state, where)
        if len(state["loaders"]) != self.dist.world:
            raise SystemExit(f"{where}: written by {len(state['loaders'])} processes; "
                             f"resume with as many (now {self.dist.world})")
        saved = state.get("args") if isinstance(state.get("args"), dict) else {}
        if str(saved.get("opt", self.args.opt)).lower() != self.args.opt.lower():
            raise SystemExit(f"{where}: saved by a run with --opt {saved['opt']}, now --opt "
                             f"{self.args.opt}; resume with the same optimizer, or start from "
                             "its weights with --checkpoint")
        self.check_weights(state["model"], where, saved)
        if self.ema is not None and state["ema"] is not None:
            self.check_weights(state["ema"], f"{where} (its 'ema')", saved)
        meters = state.get("meters")
        if meters is not None and len(meters) != len(state["loaders"]):
            raise SystemExit(f"{where}: {len(meters)} 'meters' for {len(state['loaders'])} "
                             "'loaders'")
        position = state["loaders"][self.dist.rank]
        try:
            self.train.load_state_dict(position)
        except ValueError as e:
            raise SystemExit(f"{where}: its loader position is not this run's: "
                             f"{one_line(e)}") from e
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"{where}: its optimizer state does not fit --opt {self.args.opt} "
                             f"({one_line(e)})") from e
        self.epoch, self.step, self.best = state["epoch"], state["step"], state["best"]
        if meters and position["batches_done"] > 0:
            self.meter.load_state_dict(meters[self.dist.rank])
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
        # Closed however the epoch ends (a non-finite loss exits from sync), so that no
        # stale bar is drawn again when the process exits.
        with tqdm(total=steps, initial=done_before, desc=f"epoch {self.epoch}",
                  disable=not (self.dist.main and args.progress), dynamic_ncols=True) as bar:
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
                # At the epoch's last step the end-of-epoch path evaluates and checkpoints
                # (and fit() stops there on a SIGTERM).
                mid_epoch = train.state_dict()["batches_done"] < steps
                stop = stop_vote() and mid_epoch
                checkpoint_now = (args.ckpt_every and self.step % args.ckpt_every == 0
                                  and mid_epoch)
                if (self.step % args.log_every == 0 and mid_epoch) or checkpoint_now or stop:
                    total_loss, total_samples = self.sync()
                    meter.pooling_s += train.label_pooling_ms() / 1e3
                    elapsed_s = max(meter.elapsed_s, 1e-9)
                    bar.set_postfix(loss=f"{total_loss / total_samples:.3f}",
                                    img_s=f"{total_samples / elapsed_s:.0f}",
                                    pooling=f"{100 * meter.pooling_s / elapsed_s:.2f}%")
                    if stop or checkpoint_now:
                        self.checkpoint(self.last_path)
                    if stop:
                        self.stop_agreed = True
                        return {}
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
        self.write_on_main(lambda: self.append_line(
            self.args.trace_samples, dict(epoch=self.epoch, step=self.step, rows=rows)))

    @staticmethod
    def append_line(path: str, record: Dict[str, Any]) -> None:
        with writing(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

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
            self.checkpoint(self.last_path, best=improved)
            self.write_on_main(lambda: self.append_line(self.metrics_path, record))
            if self.dist.main:
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
