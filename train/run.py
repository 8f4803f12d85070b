"""A lean DDP trainer on ReLabelLoader: image classification with ReLabel targets.

Trains any timm model with the localized multi-label supervision of Yun et al., "Re-labeling
ImageNet" (CVPR 2021): DALI decodes the random crops, LabelPooling turns each crop box into its
soft target, and the loss is the soft-target cross-entropy. Launch:

    torchrun --nproc_per_node=8 train/run.py --data TRAIN --labelmaps FILE --val-data VAL
    python train/run.py                       # the demo: a synthetic multi-object ImageNet

Without --data it builds the synthetic dataset of dali_relabel.synthetic in a cache folder and
trains a small model on whatever device exists. CUDA + NCCL when a GPU is present, CPU + gloo
otherwise. Rank 0 alone logs; outputs go to --output: args.yaml, metrics.jsonl, last.pt,
best.pt. `--resume auto` continues from last.pt, the loader's position included.
"""
import argparse
import datetime
import functools
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from token_labeling import TokenLabelingModel, create_token_model, last_batch_plan  # noqa: E402

import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

from dali_relabel import (LABEL_MODES, ReLabelLoader, ValLoader,  # noqa: E402
                          soft_target_cross_entropy)
from dali_relabel._loading import resolve_device  # noqa: E402
from dali_relabel._utils import atomic_path, check_output_path  # noqa: E402
from dali_relabel.mixing import MIXUP_MODES  # noqa: E402
from dali_relabel.targets import TargetMaker  # noqa: E402

logger = logging.getLogger("train")

# What `python train/run.py` trains when no --data is given: small enough for a 2-core CPU.
DEMO_DEFAULTS = dict(model="resnet10t", image_size=64, val_resize=72, epochs=15, batch_size=32,
                     warmup_epochs=1.0)
DEMO_SGD_LR = 0.4  # the demo's short schedule wants more than 0.1 x 32 / 256
SGD_NAMES = ("sgd", "nesterov", "momentum")
PAPER_DEFAULTS = dict(model="resnet50", image_size=224, val_resize=256, epochs=300,
                      batch_size=128, lr=None, warmup_epochs=5.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of defaults (keys are the long option names with "
                             "underscores); flags given on the command line override it")
    data = parser.add_argument_group("data")
    data.add_argument("--data", help="training ImageFolder root (default: the synthetic demo)")
    data.add_argument("--labelmaps", help="label-map file of the training images")
    data.add_argument("--val-data", help="validation ImageFolder root (default: none)")
    data.add_argument("--real-labels", help="ReaL label sets: JSON list of lists of class "
                                            "indices, in the order of the sorted val file names")
    data.add_argument("--label-mode", default="localized_multi", choices=LABEL_MODES,
                      help="targets (default: localized_multi, ReLabel)")
    data.add_argument("--image-size", type=int, help="crop size (default: 224; demo 64)")
    data.add_argument("--val-resize", type=int, help="validation resize (default: 256; demo 72)")
    data.add_argument("--exclude", help="list of images to leave out (dali-relabel verify)")
    data.add_argument("--threads", type=int, help="DALI threads per process (default: its "
                                                  "share of the CPUs)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", help="timm model name (default: resnet50; demo resnet10t)")
    model.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    model.add_argument("--checkpoint", help="initial weights (a state_dict or a train "
                                            "checkpoint's 'model')")
    model.add_argument("--drop-path", type=float, default=0.0,
                       help="stochastic depth rate (default: 0.0)")
    model.add_argument("--channels-last", action="store_true",
                       help="channels_last memory format (default: off)")
    model.add_argument("--amp", action="store_true", help="bf16 autocast (default: off)")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")
    model.add_argument("--ema", type=float, default=0.0,
                       help="EMA decay of the weights, 0 = off (default: 0.0)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help="epochs (default: 300; demo 15)")
    optim.add_argument("--batch-size", type=int, help="batch per process (default: 128; "
                                                      "demo 32)")
    optim.add_argument("--opt", default="sgd", help="timm optimizer: sgd (Nesterov), adamw, "
                                                    "adamp, ... (default: sgd)")
    optim.add_argument("--lr", type=float, help="peak learning rate (default: 0.1 x global "
                                                "batch / 256 for sgd, 1e-3 otherwise)")
    optim.add_argument("--weight-decay", type=float, default=1e-4,
                       help="weight decay (default: 1e-4)")
    optim.add_argument("--momentum", type=float, default=0.9, help="momentum (default: 0.9)")
    optim.add_argument("--warmup-epochs", type=float, help="linear warm-up (default: 5; demo 1)")
    optim.add_argument("--min-lr", type=float, default=0.0,
                       help="cosine floor (default: 0.0)")
    optim.add_argument("--smoothing", type=float, default=0.1,
                       help="label smoothing, label_mode 'original' only (default: 0.1)")
    optim.add_argument("--mixup", type=float, default=0.0,
                       help="mixup alpha, as timm's train.py (the loader mixes): > 0 turns it "
                            "on (default: 0.0)")
    optim.add_argument("--cutmix", type=float, default=0.0,
                       help="CutMix alpha: > 0 turns it on; with localized labels the pasted "
                            "rectangle's share of the target is LabelPooling over the "
                            "partner's pasted pixels (default: 0.0)")
    optim.add_argument("--cutmix-minmax", type=float, nargs=2, metavar=("MIN", "MAX"),
                       help="CutMix box sides as fractions of the image's instead of drawn "
                            "from alpha; turns CutMix on (default: off)")
    optim.add_argument("--mixup-prob", type=float, default=1.0,
                       help="probability of mixing per batch, pair or element (default: 1.0)")
    optim.add_argument("--mixup-switch-prob", type=float, default=0.5,
                       help="probability of CutMix instead of mixup when both are on "
                            "(default: 0.5)")
    optim.add_argument("--mixup-mode", default="batch", choices=MIXUP_MODES,
                       help="one draw per batch, pair or element (default: batch)")
    optim.add_argument("--cutmix-prob", type=float, default=0.0,
                       help="older spelling: --cutmix-prob P --cutmix-beta B is --cutmix B "
                            "--mixup-prob P (default: 0.0)")
    optim.add_argument("--cutmix-beta", type=float, default=1.0,
                       help="see --cutmix-prob (default: 1.0)")
    optim.add_argument("--token-targets", type=int, default=0, metavar="S",
                       help="token labeling for ViT-style models: every patch token also "
                            "trains on its own target, LabelPooling over S x S bins of the "
                            "crop (sparse); S is the model's token grid side (14 for a "
                            "/16 model at 224), 0 = off (default: 0)")
    optim.add_argument("--token-loss-weight", type=float, default=0.5,
                       help="weight of the token loss beside the class-token loss "
                            "(default: 0.5)")
    run = parser.add_argument_group("run")
    run.add_argument("--output", default="output/train", help="output folder "
                                                              "(default: output/train)")
    run.add_argument("--resume", help="'auto' (OUTPUT/last.pt if present) or a checkpoint")
    run.add_argument("--ckpt-every", type=int, default=0,
                     help="also write last.pt every N steps, 0 = per epoch only (default: 0)")
    run.add_argument("--eval-every", type=int, default=1,
                     help="evaluate every N epochs (default: 1)")
    run.add_argument("--log-every", type=int, default=20,
                     help="steps between all-reduced progress updates (default: 20)")
    run.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="per-epoch progress bar on rank 0 (default: on)")
    run.add_argument("--device", choices=("cuda", "cpu"),
                     help="device (default: cuda if available)")
    run.add_argument("--dist-backend", help="nccl or gloo (default: nccl on cuda, else gloo)")
    run.add_argument("--trace-samples", help="append every step's store rows to this JSONL "
                                             "file (to audit resumption)")
    return parser


def read_config(path: str, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The option values of a YAML config file, converted and checked as the flags are.

    Keys are the long option names with underscores (`batch_size: 64`); each value goes
    through its option's type and choices, and switches (`amp: true`) take booleans.

    Raises:
        SystemExit: One line naming the file, the line and the problem: unreadable file,
            YAML syntax, not a mapping, unknown key or bad value.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        document = yaml.compose(text)
        config = yaml.safe_load(text)
    except OSError as e:
        raise SystemExit(f"--config {path}: cannot read it ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SystemExit(f"--config {path}:{where}: not valid YAML ({problem})") from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SystemExit(f"--config {path}: line 1: expected a mapping of option names to "
                         f"values (`epochs: 90`), found a {type(config).__name__}")
    lines = {node.value: node.start_mark.line + 1 for node, _ in document.value}
    actions = {action.dest: action for action in parser._actions
               if action.option_strings and action.dest not in ("help", "config")}
    values = {}
    for key, value in config.items():
        where = f"--config {path}: line {lines.get(key, '?')}: {key}"
        action = actions.get(key)
        if action is None:
            raise SystemExit(f"{where}: unknown key (expected one of the long option names "
                             f"with underscores, e.g. batch_size)")
        if value is None:
            continue
        if action.nargs == 0:  # a switch such as --amp
            if not isinstance(value, bool):
                raise SystemExit(f"{where}: expected true or false, found {value!r}")
            values[key] = value
            continue
        if isinstance(value, (bool, list, dict)):
            raise SystemExit(f"{where}: expected a single {_type_name(action)} value, found "
                             f"{value!r}")
        try:
            converted = action.type(str(value)) if action.type else str(value)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"{where}: invalid {_type_name(action)} value {value!r}") from e
        if action.choices is not None and converted not in action.choices:
            raise SystemExit(f"{where}: {converted!r} is not one of {list(action.choices)}")
        values[key] = converted
    return values


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "str") if action.type else "str"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
    args = parser.parse_args(argv)
    try:
        check_output_path(args.output, argument="--output", directory=True)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    preset = DEMO_DEFAULTS if args.data is None else PAPER_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None and args.lr is None and args.opt in SGD_NAMES:
        args.lr = DEMO_SGD_LR
    if args.data is not None and args.labelmaps is None:
        raise SystemExit("--labelmaps is required with --data")
    if args.token_targets < 0:
        raise SystemExit(f"--token-targets must be >= 0 (0 = off), got {args.token_targets}")
    if args.cutmix_prob > 0:
        if args.cutmix > 0 or args.mixup > 0 or args.cutmix_minmax:
            raise SystemExit("--cutmix-prob P --cutmix-beta B is the older spelling of --cutmix "
                             "B --mixup-prob P; give one or the other")
        args.cutmix, args.mixup_prob = args.cutmix_beta, args.cutmix_prob
    if args.token_targets and args.label_mode == "global_multi":
        raise SystemExit("--token-targets with --label-mode global_multi: every token's "
                         "target would be the whole image's, listing every class of its "
                         "map; not supported sparse")
    if args.token_targets and (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax):
        raise SystemExit("--token-targets does not combine with --cutmix-prob, --cutmix or "
                         "--mixup yet (the loader mixes dense targets, token targets are "
                         "sparse); use one of them")
    return args


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


def smooth_labels(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of (one-hot) targets: (1 - s) * t + s / C."""
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


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


class Trainer:
    def __init__(self, args: argparse.Namespace, dist_: Distributed) -> None:
        self.args, self.dist = args, dist_
        device = dist_.device
        self.train = ReLabelLoader(
            args.data, args.labelmaps, args.batch_size, device=device,
            image_size=args.image_size, label_mode=args.label_mode, seed=args.seed,
            num_threads=args.threads, channels_last=args.channels_last,
            exclude=args.exclude, return_meta=True, output_size=args.token_targets or 1,
            sparse_targets=args.token_targets > 0, mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob,
            mixup_mode=args.mixup_mode)
        self.crop_targets = None
        if args.token_targets:  # the class token's target: the whole crop (S = 1)
            self.crop_targets = TargetMaker(
                self.train.store, device, label_mode=args.label_mode, output_size=1,
                fused_gather=self.train.targets.fused_gather)
            self.crop_targets.timer = self.train.targets.timer  # one label-pooling time
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
        self.signalled = False  # set by the SIGTERM handler only
        self.stop_agreed = False  # all ranks agreed to stop (a SIGTERM reached one)
        self.last_good: Optional[str] = None
        self.metrics_path = os.path.join(args.output, "metrics.jsonl")
        self.last_path = os.path.join(args.output, "last.pt")
        self.best_path = os.path.join(args.output, "best.pt")

    # ---- checkpoints -------------------------------------------------------------------
    def checkpoint(self, path: str) -> None:
        """All ranks call this: every rank's loader position goes into rank 0's file."""
        loaders = self.dist.gather(self.train.state_dict())
        if self.dist.main:
            save_atomic(dict(model=self.model.state_dict(),
                             ema=self.ema.module.state_dict() if self.ema else None,
                             optimizer=self.optimizer.state_dict(), epoch=self.epoch,
                             step=self.step, best=self.best, loaders=loaders,
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
        self.last_good = path
        if self.dist.main:
            logger.info("resumed from %s: epoch %d, step %d", path, self.epoch, self.step)

    # ---- training ----------------------------------------------------------------------
    def train_epoch(self) -> Dict[str, float]:
        """One epoch (or what is left of it after a resume). Losses accumulate on the device
        and are gathered only every --log-every steps and at the end, where the non-finite
        check happens; SIGTERM is agreed on every step by a vote that overlaps the step, so
        every rank stops after the same step."""
        args, train, device = self.args, self.train, self.dist.device
        self.net.train()
        steps = len(train)
        done_before = train.state_dict()["batches_done"]
        bar = tqdm(total=steps, initial=done_before, desc=f"epoch {self.epoch}",
                   disable=not (self.dist.main and args.progress), dynamic_ncols=True)
        train.label_pooling_ms()
        pooling_s = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        samples, wait_s, step_s = 0, 0.0, 0.0
        epoch_start = tick = time.perf_counter()
        for batch in train:
            fetched = time.perf_counter()
            wait_s += fetched - tick
            stop_vote = self.dist.start_vote(self.signalled)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(self.step, args, steps)
            images, targets = batch.images, batch.targets
            if args.token_targets:  # the loader's are the tokens'; the crop's come here
                token_targets, targets = targets, self.crop_targets(
                    *last_batch_plan(train))
            if args.label_mode == "original" and args.smoothing > 0:
                targets = smooth_labels(targets, args.smoothing)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = self.net(images)
            if args.token_targets:
                logits, token_logits = logits
            loss = soft_cross_entropy(logits, targets)
            if args.token_targets:
                loss = loss + args.token_loss_weight * soft_target_cross_entropy(
                    token_logits, token_targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0) * len(images)
            first_bad = torch.where(~finite & (first_bad < 0), self.step, first_bad)
            samples += len(images)
            if args.trace_samples:
                self.trace(batch)
            self.step += 1
            tick = time.perf_counter()
            step_s += tick - fetched
            bar.update(1)
            # At the epoch's last step the end-of-epoch path evaluates and checkpoints (and
            # fit() stops there on a SIGTERM).
            mid_epoch = train.state_dict()["batches_done"] < steps
            stop = stop_vote() and mid_epoch
            checkpoint_now = args.ckpt_every and self.step % args.ckpt_every == 0 and mid_epoch
            if (self.step % args.log_every == 0 and mid_epoch) or checkpoint_now or stop:
                total_loss, total_samples = self.sync(first_bad, loss_sum, samples)
                pooling_s += train.label_pooling_ms() / 1e3
                bar.set_postfix(loss=f"{total_loss / total_samples:.3f}",
                                img_s=f"{total_samples / (tick - epoch_start):.0f}",
                                pooling=f"{100 * pooling_s / (tick - epoch_start):.2f}%")
                if stop or checkpoint_now:
                    self.checkpoint(self.last_path)
                if stop:
                    self.stop_agreed = True
                    bar.close()
                    return {}
        bar.close()
        total_loss, total_samples = self.sync(first_bad, loss_sum, samples)
        elapsed = time.perf_counter() - epoch_start
        pooling_s += train.label_pooling_ms() / 1e3
        wait_s, step_s, pooling_s, elapsed = self.dist.all_sum(
            [wait_s, step_s, pooling_s, elapsed])
        world, done = self.dist.world, max(1, steps - done_before)
        busy_s = wait_s + step_s
        total_samples, busy_s = max(1, total_samples), max(busy_s, 1e-9)
        return dict(train_loss=total_loss / total_samples,
                    images_per_s=total_samples / (elapsed / world),
                    data_wait_ms=1e3 * wait_s / world / done,
                    step_ms=1e3 * busy_s / world / done,
                    label_pooling_ms=1e3 * pooling_s / world / done,
                    label_pooling_overhead_pct=100 * pooling_s / busy_s)

    def sync(self, first_bad: torch.Tensor, loss_sum: torch.Tensor, samples: int) -> tuple:
        """(loss sum, samples) over all ranks; stops on a non-finite loss. One collective,
        read back once: the only host sync of a logging step."""
        mine = torch.stack([loss_sum, torch.full_like(loss_sum, samples), first_bad.double()])
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
                self.share_buffers()
                eval_model = self.ema.module if self.ema is not None else self.model
                record.update(evaluate(eval_model, self.val, self.real, self.dist, args.amp))
            record = dict(epoch=self.epoch, lr=lr, **record)
            self.epoch += 1
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


def demo_dataset(args: argparse.Namespace, dist_: Distributed) -> None:
    """Point the data arguments at the synthetic dataset (rank 0 builds it, once)."""
    from dali_relabel.synthetic import make_synthetic_imagenet

    if dist_.main:
        dataset = make_synthetic_imagenet()
    if dist_.world > 1:
        dist.barrier()
    if not dist_.main:
        dataset = make_synthetic_imagenet(progress=False)
    args.data, args.labelmaps = dataset.train_root, dataset.labelmaps
    args.val_data = args.val_data or dataset.val_root
    args.real_labels = args.real_labels or dataset.real_labels


def summary(args: argparse.Namespace, trainer: "Trainer", record: Dict[str, float],
            seconds: float) -> str:
    if trainer.stop_agreed:
        return (f"Stopped by SIGTERM at step {trainer.step} (epoch {trainer.epoch}); continue "
                f"with --resume auto from {os.path.abspath(trainer.last_path)}.")
    if not record:  # resumed from the checkpoint of a finished run
        return (f"Run complete: all {args.epochs} epochs done, nothing to resume "
                f"({os.path.abspath(trainer.last_good or trainer.last_path)}).")
    parts = [f"Trained {args.model} for {args.epochs} epochs with {args.label_mode} targets in "
             f"{seconds / 60:.1f} min at {record['images_per_s']:.0f} images/s"]
    if "val_top1" in record:
        parts.append(f"final top-1 {record['val_top1']:.1f}%, top-5 {record['val_top5']:.1f}%"
                     + (f", ReaL {record['val_real']:.1f}%" if "val_real" in record else ""))
    parts.append(f"LabelPooling took {record['label_pooling_ms']:.2f} ms of each "
                 f"{record['step_ms']:.0f} ms step ({record['label_pooling_overhead_pct']:.2f}%"
                 " of training time; the paper reports about 0.5%)")
    return ("; ".join(parts) + f". Outputs: {os.path.abspath(args.output)} (metrics.jsonl, "
            "last.pt, best.pt, args.yaml).")


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    dist_ = Distributed(args.device, args.dist_backend)
    logging.basicConfig(level=logging.INFO if dist_.main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        if args.data is None:
            demo_dataset(args, dist_)
        os.makedirs(args.output, exist_ok=True)
        trainer = Trainer(args, dist_)
        signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "signalled", True))
        resume = args.resume
        if resume == "auto":  # rank 0 decides, so all ranks resume or none does
            found = [trainer.last_path if os.path.exists(trainer.last_path) else None]
            if dist_.world > 1:
                dist.broadcast_object_list(found, src=0)
            resume = found[0]
        if resume:
            if not os.path.exists(resume):
                raise SystemExit(f"rank {dist_.rank} cannot read the checkpoint {resume}: "
                                 "--output must be on a file system every node sees")
            trainer.resume(resume)
        if dist_.main:
            with open(os.path.join(args.output, "args.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(vars(args), f, sort_keys=False)
            logger.info("%s on %s x %d, %d steps/epoch, lr %.4g, started %s", args.model,
                        dist_.device.type, dist_.world, len(trainer.train), args.lr,
                        datetime.datetime.now().isoformat(timespec="seconds"))
        record = trainer.fit()
        if dist_.main:
            logger.info(summary(args, trainer, record, time.perf_counter() - start))
        return record
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        dist_.close()


if __name__ == "__main__":
    main()
