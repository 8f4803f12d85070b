"""A lean DDP trainer on ReLabelLoader: image classification with ReLabel targets.

Trains any timm model with the localized multi-label supervision of Yun et al., "Re-labeling
ImageNet" (CVPR 2021): DALI decodes the random crops, LabelPooling turns each crop box into its
soft target, and the loss is the soft-target cross-entropy. Launch:

    torchrun --nproc_per_node=8 train/run.py --data TRAIN --labelmaps FILE --val-data VAL
    python train/run.py                       # the demo: a synthetic multi-object ImageNet

Without --data it builds the synthetic dataset of `dali-relabel synthetic` in a cache folder
and trains a small model on whatever device exists. CUDA + NCCL when a GPU is present, CPU + gloo
otherwise. Rank 0 alone logs; outputs go to --output: args.yaml, metrics.jsonl, last.pt,
best.pt. `--resume auto` continues from last.pt, the loader's position included;
`--evaluate --resume auto` reports its accuracy. Every flag and input file is checked before
the first step: a bad one stops the run in one line naming the flag.
"""
import argparse
import datetime
import difflib
import logging
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import timm
import torch.distributed as dist
import yaml

from dali_relabel import LABEL_MODES, MIXUP_MODES
from dali_relabel.augment import RE_MODES
from dali_relabel.files import check_output_path
from dali_relabel.tools import make_synthetic_imagenet
from trainer import SGD_NAMES, Distributed, Trainer, writing

logger = logging.getLogger("train")

# What `python train/run.py` trains when no --data is given: small enough for a 2-core CPU.
DEMO_DEFAULTS = dict(model="resnet10t", image_size=64, val_resize=72, epochs=15, batch_size=32,
                     warmup_epochs=1.0)
DEMO_SGD_LR = 0.4  # the demo's short schedule wants more than 0.1 x 32 / 256
PAPER_DEFAULTS = dict(model="resnet50", image_size=224, val_resize=256, epochs=300,
                      batch_size=128, lr=None, warmup_epochs=5.0)
# The ranges of the numeric flags the loaders do not see (the loaders check theirs, and the
# trainer names the flag in their errors). "[1, inf)": >= 1; NaN and infinities never pass.
FLAG_RANGES = {
    "--epochs": "[1, inf)", "--eval-every": "[1, inf)", "--log-every": "[1, inf)",
    "--ckpt-every": "[0, inf)", "--token-targets": "[0, inf)", "--lr": "(0, inf)",
    "--min-lr": "[0, inf)", "--warmup-epochs": "[0, inf)", "--weight-decay": "[0, inf)",
    "--momentum": "[0, 1)", "--ema": "[0, 1)", "--smoothing": "[0, 1)", "--drop-path": "[0, 1)",
    "--token-loss-weight": "[0, inf)", "--cutmix-prob": "[0, 1]", "--cutmix-beta": "(0, inf)",
}


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
    augment = parser.add_argument_group("augmentation (in the loader, planned per sample)")
    augment.add_argument("--num-crops", type=int, default=1, metavar="N",
                         help="crops per decoded image, each with its own target; an epoch "
                              "takes 1/N of the images (timm's --aug-repeats, torchvision's "
                              "--ra-reps) (default: 1)")
    augment.add_argument("--aa", metavar="POLICY",
                         help="auto-augment policy, timm's (rand-m9-mstd0.5-inc1, original, "
                              "...) or torchvision's (ra, ta_wide, imagenet) (default: off)")
    augment.add_argument("--color-jitter", type=float, metavar="X",
                         help="colour jitter strength (brightness, contrast, saturation); a "
                              "policy replaces it, as in timm (default: off)")
    augment.add_argument("--reprob", type=float, default=0.0,
                         help="random erasing probability (default: 0.0)")
    augment.add_argument("--remode", default="const", choices=RE_MODES,
                         help="random erasing fill (default: const)")
    augment.add_argument("--recount", type=int, default=1,
                         help="random erasing rectangles per image, at most (default: 1)")
    optim.add_argument("--token-loss-weight", type=float, default=0.5,
                       help="weight of the token loss beside the class-token loss "
                            "(default: 0.5)")
    run = parser.add_argument_group("run")
    run.add_argument("--evaluate", action="store_true",
                     help="evaluate --checkpoint (or --resume) on --val-data and exit: "
                          "top-1, top-5 and, with --real-labels, ReaL; of a train "
                          "checkpoint its EMA weights if it has them, as the run evaluated")
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
    except UnicodeDecodeError as e:
        raise SystemExit(f"--config {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                         f"offset {e.start}); save it as UTF-8") from e
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


def check_range(flag: str, value: Any, bounds: str) -> None:
    """Refuses `value` of `flag` outside `bounds` ("[low, high)", "(0, inf)", ...; NaN and
    infinities never pass): SystemExit, one line naming the flag and the range."""
    low, high = (float(bound) for bound in bounds[1:-1].split(","))
    above = value > low if bounds[0] == "(" else value >= low
    below = value < high if bounds[-1] == ")" else value <= high
    if not (math.isfinite(value) and above and below):
        expected = (f"{'>' if bounds[0] == '(' else '>='} {low:g}" if math.isinf(high) else
                    f"in {bounds}")
        finite = "finite and " if isinstance(value, float) else ""
        raise SystemExit(f"{flag} must be {finite}{expected}, got {value!r}")


def check_args(args: argparse.Namespace) -> None:
    """The flags the loaders do not see, at the start; the loaders' own (--data,
    --batch-size, --aa, ...) are checked when the trainer builds them."""
    for flag, bounds in FLAG_RANGES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            check_range(flag, value, bounds)
    if ":" not in args.model and not timm.is_model(args.model):  # hf-hub:, local-dir: aside
        close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise SystemExit(f"--model {args.model}: not a timm model ({hint})")
    try:
        check_output_path(args.output, argument="--output", directory=True)
        if args.trace_samples:
            check_output_path(args.trace_samples, argument="--trace-samples")
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if args.data is not None and args.labelmaps is None:
        raise SystemExit("--labelmaps is required with --data")
    if args.real_labels and args.data is not None and not args.val_data:
        raise SystemExit("--real-labels needs --val-data (the images the label sets are of)")
    if args.evaluate and not (args.checkpoint or args.resume):
        raise SystemExit("--evaluate needs the weights to evaluate: --checkpoint FILE or "
                         "--resume FILE")
    if args.evaluate and args.checkpoint and args.resume:
        raise SystemExit("--evaluate evaluates one checkpoint: give --checkpoint or --resume, "
                         "not both")
    if args.evaluate and args.data is not None and not args.val_data:
        raise SystemExit("--evaluate needs --val-data")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**read_config(args.config, parser))
    args = parser.parse_args(argv)
    preset = DEMO_DEFAULTS if args.data is None else PAPER_DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None and args.lr is None and args.opt in SGD_NAMES:
        args.lr = DEMO_SGD_LR
    check_args(args)
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


def demo_dataset(args: argparse.Namespace, dist_: Distributed) -> None:
    """Point the data arguments at the synthetic dataset (rank 0 builds it, once)."""
    if dist_.main:
        dataset = make_synthetic_imagenet()
    if dist_.world > 1:
        dist.barrier()
    if not dist_.main:
        dataset = make_synthetic_imagenet(progress=False)
    args.data, args.labelmaps = dataset.train_root, dataset.labelmaps
    args.val_data = args.val_data or dataset.val_root
    args.real_labels = args.real_labels or dataset.real_labels


def resume_path(args: argparse.Namespace, dist_: Distributed) -> Optional[str]:
    """The checkpoint --resume names: 'auto' is OUTPUT/last.pt if rank 0 finds it (so all
    ranks resume or none does)."""
    resume = args.resume
    if resume == "auto":
        last = os.path.join(args.output, "last.pt")
        found = [last if os.path.exists(last) else None]
        if dist_.world > 1:
            dist.broadcast_object_list(found, src=0)
        resume = found[0]
        if resume is None and args.evaluate:
            raise SystemExit(f"--resume auto: nothing to evaluate, no {last}")
    if resume and not os.path.isfile(resume):
        if args.resume == "auto":  # rank 0 found it
            raise SystemExit(f"--resume auto: rank {dist_.rank} cannot read {resume}: --output "
                             "must be on a file system every node sees")
        raise SystemExit(f"--resume {resume}: no such file")
    return resume


def write_args(args: argparse.Namespace) -> None:
    path = os.path.join(args.output, "args.yaml")
    with writing(path), open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(vars(args), f, sort_keys=False)


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
        resume = resume_path(args, dist_)
        os.makedirs(args.output, exist_ok=True)
        trainer = Trainer(args, dist_)
        signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "signalled", True))
        if args.evaluate:  # the weights alone (the EMA the run evaluated, if any)
            if resume:
                trainer.load_weights(resume, "--resume", prefer_ema=True)
            record = trainer.evaluate()
            if dist_.main:
                logger.info("evaluated %s on %s: %s", args.checkpoint or resume,
                            args.val_data, ", ".join(f"{k}={v:.2f}%" for k, v in record.items()))
            return record
        if resume:
            trainer.resume(resume)
        trainer.write_on_main(lambda: write_args(args))
        if dist_.main:
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
