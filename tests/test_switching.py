"""docs/switching.md on the real scripts: torchvision's references/classification/train.py and
timm's train.py (copies in tests/reference_scripts/), switched by the page's diffs. Their own
parsers give the namespaces; from_torchvision_args / from_timm_args must give the loader of
explicit arguments, refuse what they cannot honour by name, and the switched scripts must
train on the synthetic set."""
import argparse
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dali_relabel import ReLabelLoader, ValLoader
from dali_relabel.tools import make_synthetic_imagenet
from script_runner import run_python

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "reference_scripts"
DIFFS = re.findall(r"```diff\n(.*?)```", (REPO / "docs" / "switching.md").read_text(), re.S)


def apply_diff(text: str, diff: str) -> str:
    """The page's hunks ("@@ where @@", then context ' ', added '+' and removed '-' lines)
    applied to `text`; each hunk's context must appear once, in order."""
    lines = text.split("\n")
    for hunk in re.split(r"^@@.*@@\n", diff, flags=re.M)[1:]:
        body = [line for line in hunk.rstrip("\n").split("\n")]
        old = [line[1:] if line[:1] in " -" else "" for line in body if line[:1] != "+"]
        new = [line[1:] if line[:1] in " +" else "" for line in body if line[:1] != "-"]
        starts = [i for i in range(len(lines) - len(old) + 1) if lines[i:i + len(old)] == old]
        assert len(starts) == 1, f"hunk context found {len(starts)} times: {old}"
        lines[starts[0]:starts[0] + len(old)] = new
    return "\n".join(lines)


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    """The two scripts, switched as the page shows: {name: folder}."""
    out = tmp_path_factory.mktemp("scripts")
    folders = {}
    for name, diff in zip(("torchvision", "timm"), DIFFS):
        folder = out / name
        shutil.copytree(SCRIPTS / name, folder)
        script = folder / "train.py"
        script.write_text(apply_diff(script.read_text(), diff))
        folders[name] = folder
    return folders


def import_script(folder: Path, name: str):
    """The switched train.py as a module (its siblings importable, as when it runs)."""
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(name, folder / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
        for sibling in ("presets", "sampler", "transforms", "utils"):
            sys.modules.pop(sibling, None)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six classes: torchvision's script measures top-5."""
    return make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic"), num_classes=6,
                                   train_per_class=6, val_per_class=2, topk=3,
                                   image_size=(40, 64), progress=False)


def first_batch(loader):
    return next(iter(loader))


def assert_same_first_batch(a, b):
    (images_a, targets_a), (images_b, targets_b) = first_batch(a), first_batch(b)
    assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b)


def test_the_page_has_both_diffs():
    assert len(DIFFS) == 2


def test_torchvision_flags_give_the_loaders_of_explicit_arguments(switched, data):
    tv = import_script(switched["torchvision"], "tv_train")
    root = os.path.dirname(data.train_root)
    args = tv.get_args_parser().parse_args([
        "--data-path", root, "--labelmaps", data.labelmaps, "-b", "8", "--device", "cpu",
        "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32",
        "--interpolation", "bicubic", "--auto-augment", "ta_wide", "--random-erase", "0.25",
        "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"])
    loader = ReLabelLoader.from_torchvision_args(args, num_threads=1)
    explicit = ReLabelLoader(data.train_root, data.labelmaps, 8, device="cpu", image_size=32,
                             interpolation="bicubic", auto_augment="ta_wide", re_prob=0.25,
                             re_mode="const", mixup_alpha=0.2, cutmix_alpha=1.0,
                             mixup_switch_prob=0.5, num_threads=1, seed=0)
    assert_same_first_batch(loader, explicit)
    val = ValLoader.from_torchvision_args(args, num_threads=1)
    explicit_val = ValLoader(data.val_root, 8, device="cpu", image_size=32, resize_size=36,
                             interpolation="bicubic", num_threads=1)
    assert_same_first_batch(val, explicit_val)
    # --ra-sampler --ra-reps: repeated augmentation, each image's crops in one batch.
    args.ra_sampler, args.ra_reps = True, 2
    assert ReLabelLoader.from_torchvision_args(args, num_threads=1).num_crops == 2


def timm_namespace(tv_or_timm, argv):
    return tv_or_timm.parser.parse_args(argv)


def timm_data_config(args):
    import timm
    from timm.data import resolve_data_config

    return resolve_data_config(vars(args), model=timm.create_model(args.model, num_classes=6))


def test_timm_flags_give_the_loaders_of_explicit_arguments(switched, data):
    timm_train = import_script(switched["timm"], "timm_train")
    root = os.path.dirname(data.train_root)
    args = timm_train.parser.parse_args([
        "--data-dir", root, "--labelmaps", data.labelmaps, "--model", "resnet10t",
        "--img-size", "32", "-b", "8", "--seed", "3", "--aa", "rand-m9-mstd0.5",
        "--reprob", "0.3", "--mixup", "0.5", "--vflip", "0.2", "--grayscale-prob", "0.2",
        "--aug-repeats", "2", "--val-split", "val"])
    config = timm_data_config(args)
    loader = ReLabelLoader.from_timm_args(args, config, device="cpu", num_threads=1)
    mean, std = [255 * m for m in config["mean"]], [255 * s for s in config["std"]]
    explicit = ReLabelLoader(
        data.train_root, data.labelmaps, 8, device="cpu", image_size=32, seed=3, mean=mean,
        std=std, interpolation="random", color_jitter=0.4, auto_augment="rand-m9-mstd0.5",
        re_prob=0.3, re_mode="pixel", mixup_alpha=0.5, vflip=0.2, grayscale_prob=0.2,
        num_crops=2, label_smoothing=0.1, num_threads=1)
    assert_same_first_batch(loader, explicit)
    val = ValLoader.from_timm_args(args, config, device="cpu", num_threads=1)
    explicit_val = ValLoader(data.val_root, 8, device="cpu", image_size=32,
                             crop_pct=config["crop_pct"], interpolation=config["interpolation"],
                             mean=mean, std=std, num_threads=1)
    assert_same_first_batch(val, explicit_val)
    # --no-aug: timm's centre crop of the shorter side, no flips, colour or erasing.
    args.no_aug = True
    plain = ReLabelLoader.from_timm_args(args, config, device="cpu", num_threads=1,
                                         mixup_alpha=0.0, num_crops=1, label_smoothing=0.0)
    batch = first_batch(plain)[0]
    assert plain.augment.color_jitter is None and plain.augment.re_prob == 0
    plan = plain.planner.plan(0)
    sizes = plain.planner.sizes[plan.rows]
    side = sizes.min(axis=1)
    assert (plan.windows[:, 2] == side).all() and (plan.windows[:, 3] == side).all()
    assert not plan.flips.any() and batch.shape == (8, 3, 32, 32)


def test_two_timm_seeds_give_different_batches(switched, data):
    timm_train = import_script(switched["timm"], "timm_train")
    root = os.path.dirname(data.train_root)
    batches = []
    for seed in ("1", "2"):
        args = timm_train.parser.parse_args(["--data-dir", root, "--labelmaps", data.labelmaps,
                                             "--img-size", "32", "-b", "8", "--seed", seed])
        loader = ReLabelLoader.from_timm_args(args, timm_data_config(args), device="cpu",
                                              num_threads=1)
        batches.append(first_batch(loader)[0])
    assert not torch.equal(*batches)


@pytest.mark.parametrize("script, argv, count, named", [
    ("torchvision", ["--auto-augment", "augmix", "--interpolation", "lanczos"], 2,
     ["--auto-augment 'augmix'", "--interpolation 'lanczos'"]),
    ("torchvision", ["--ra-sampler", "--ra-reps", "3"], 1,
     ["--ra-reps 3", "--batch-size 8 must be a multiple of it"]),
    ("timm", ["--aug-splits", "3", "--train-crop-mode", "rkrc", "--aa", "augmix-m5",
              "--train-interpolation", "lanczos", "--mixup", "0.5", "--no-prefetcher"], 5,
     ["--aug-splits 3", "--train-crop-mode 'rkrc'", "--aa 'augmix-m5'",
      "--train-interpolation 'lanczos'", "--no-prefetcher True"]),
])
def test_flags_the_loader_cannot_honour_are_named_all_at_once(switched, data, script, argv,
                                                               count, named):
    module = import_script(switched[script], f"{script}_train")
    root = os.path.dirname(data.train_root)
    common = ["--labelmaps", data.labelmaps, "-b", "8"]
    with pytest.raises(ValueError) as info:
        if script == "torchvision":
            args = module.get_args_parser().parse_args(["--data-path", root, *common, *argv])
            ReLabelLoader.from_torchvision_args(args)
        else:
            args = module.parser.parse_args(["--data-dir", root, *common, *argv])
            ReLabelLoader.from_timm_args(args, timm_data_config(args), device="cpu")
    message = str(info.value)
    assert f"{count} flag(s)" in message
    for flag in named:
        assert flag in message


def test_a_missing_labelmaps_flag_is_named():
    args = argparse.Namespace(data_path="/data", batch_size=8)
    with pytest.raises(ValueError, match="labelmaps: .* was given no --labelmaps"):
        ReLabelLoader.from_torchvision_args(args)


def run_script(folder, argv):
    return run_python("train.py", *argv, cwd=folder, timeout=900)


@pytest.mark.parametrize("script", ["torchvision", "timm"])
def test_the_switched_script_trains_on_the_synthetic_set(switched, data, tmp_path, script):
    """One epoch of each switched script on 36 images in batches of 7: the script's own
    loader would give torchvision 6 batches (it keeps the last, short one), ours gives 5."""
    root = os.path.dirname(data.train_root)
    if script == "torchvision":
        argv = ["--data-path", root, "--model", "mobilenet_v3_small", "--train-crop-size",
                "32", "--val-resize-size", "36", "--val-crop-size", "32", "-b", "7",
                "--epochs", "1", "--device", "cpu", "--workers", "0", "--output-dir",
                str(tmp_path), "--auto-augment", "ta_wide", "--mixup-alpha", "0.2"]
    else:
        argv = ["--data-dir", root, "--model", "resnet10t", "--num-classes", "6", "--img-size",
                "32", "-b", "7", "--epochs", "1", "--device", "cpu", "--workers", "0",
                "--val-split", "val", "--output", str(tmp_path), "--cutmix", "1.0"]
    done = run_script(switched[script], [*argv, "--labelmaps", data.labelmaps])
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    if script == "torchvision":
        assert "Epoch: [0]  [0/5]" in output and "Acc@1" in output, output[-3000:]
    else:  # timm logs at INFO: the loader says how it decodes
        assert "decoding with decode='roi' on cpu" in output and "*** Best metric" in output
