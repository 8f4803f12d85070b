"""train/run.py end to end on a tiny synthetic dataset: one process, torchrun, kill and
resume, SIGTERM, a non-finite loss; the mixing flags (the loader mixes: tests/test_mixing.py)."""
import collections
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from torch.testing import assert_close

import timm
from dali_relabel import ValLoader
from dali_relabel.tools.synthetic import make_synthetic_imagenet
from script_runner import REPO, run_python, start_python

import run
import trainer

RUN = REPO / "train" / "run.py"
# A resumed epoch's loss against the uninterrupted one's: the same steps in the same order,
# exactly on the CPU; cuDNN's backward passes may differ in the last bits. Dropping the steps
# before a kill would move the mean by percents.
LOSS_RTOL = 1e-4 if torch.cuda.is_available() else 1e-6
METRICS = ("epoch", "lr", "train_loss", "images_per_s", "data_wait_ms", "step_ms",
           "label_pooling_ms", "label_pooling_overhead_pct", "val_top1", "val_top5", "val_real")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    dataset = make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic"), num_classes=4,
                                      train_per_class=12, val_per_class=4, topk=3,
                                      image_size=(40, 64), progress=False)
    return ["--data", dataset.train_root, "--labelmaps", dataset.labelmaps,
            "--val-data", dataset.val_root, "--real-labels", dataset.real_labels,
            "--model", "resnet10t", "--image-size", "32", "--val-resize", "36",
            "--batch-size", "8", "--threads", "1", "--log-every", "1"]


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_one_epoch_single_process(tiny, tmp_path):
    out = tmp_path / "run"
    record = run.main([*tiny, "--epochs", "1", "--output", str(out), "--cutmix-prob", "0.5"])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 1 and set(METRICS) <= set(metrics[0])
    assert metrics[0] == pytest.approx(record)
    assert torch.isfinite(torch.tensor(metrics[0]["train_loss"]))
    assert 0 <= metrics[0]["val_top1"] <= metrics[0]["val_top5"] <= 100
    assert 0 < metrics[0]["label_pooling_overhead_pct"] < 100
    state = torch.load(out / "last.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 6) and len(state["loaders"]) == 1
    assert (out / "best.pt").exists() and (out / "args.yaml").exists()


def test_torchrun_two_processes(tiny, tmp_path):
    out = tmp_path / "ddp"
    result = run_python(RUN, *tiny, "--epochs", "1", "--output", out, torchrun=2)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = read_jsonl(out / "metrics.jsonl")  # one record: rank 0 alone writes
    state = torch.load(out / "last.pt", weights_only=False)
    assert len(state["loaders"]) == 2 and state["step"] == 3  # 48 images / 2 ranks / 8
    assert [loader["shard_id"] for loader in state["loaders"]] == [0, 1]
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    # Reduced over both ranks: the saved model on the whole validation set in one process.
    model = timm.create_model("resnet10t", num_classes=4)
    model.load_state_dict(state["model"])
    val_root = tiny[tiny.index("--val-data") + 1]
    val = ValLoader(val_root, 16, device="cpu", image_size=32, resize_size=36, num_threads=1)
    with torch.no_grad():
        correct = sum((model.eval()(x).argmax(1) == y).sum().item() for x, y in val)
    assert metrics["val_top1"] == pytest.approx(100 * correct / 16)
    assert result.stdout.count("Trained resnet10t") + result.stderr.count(
        "Trained resnet10t") == 1


def start(args, torchrun=0):
    return start_python(RUN, *args, torchrun=torchrun, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)


def wait_for_steps(trace, count, process, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(trace) and len(read_jsonl(trace)) >= count:
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} steps after {timeout} s")


def by_step(trace):
    """The rows of every step; a step re-run after a kill keeps its last record."""
    return {(r["epoch"], r["step"]): r["rows"] for r in read_jsonl(trace)}


def test_killed_run_resumes_without_repeating_or_skipping(tiny, tmp_path):
    reference = tmp_path / "reference.jsonl"
    run.main([*tiny, "--epochs", "2", "--output", str(tmp_path / "ref"),
              "--trace-samples", str(reference)])
    trace = tmp_path / "trace.jsonl"
    args = [*tiny, "--epochs", "2", "--output", str(tmp_path / "killed"), "--ckpt-every", "1",
            "--trace-samples", str(trace)]
    process = start(args)
    wait_for_steps(trace, 8, process)  # into the second epoch
    process.kill()
    process.wait()
    assert run.main([*args, "--resume", "auto"])["epoch"] == 1
    assert by_step(trace) == by_step(reference)
    seen = [row for (epoch, _), rows in by_step(trace).items() if epoch == 1 for row in rows[0]]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 48
    # Each epoch's record, the one resumed included, is the uninterrupted run's.
    want = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    got = read_jsonl(tmp_path / "killed" / "metrics.jsonl")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [0, 1]
    for resumed, whole in zip(got, want):
        assert resumed["steps"] == whole["steps"] == 6
        assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=LOSS_RTOL)


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tiny, tmp_path):
    trace = tmp_path / "trace.jsonl"
    out = tmp_path / "term"
    process = start([*tiny, "--epochs", "3", "--output", str(out), "--trace-samples",
                     str(trace)])
    wait_for_steps(trace, 2, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == len(read_jsonl(trace)) and 0 < state["step"] < 18
    loader = state["loaders"][0]
    assert loader["epoch"] * 6 + loader["batches_done"] == state["step"]


def worker_pid(torchrun_pid, rank, timeout=60):
    """The pid of torchrun's worker process of global rank `rank` (from its environment)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                if parent != torchrun_pid:
                    continue
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"RANK={rank}".encode() in f.read().split(b"\0"):
                        return int(entry)
            except OSError:  # the process ended meanwhile
                continue
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under torchrun {torchrun_pid}")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny, tmp_path):
    # 12 steps per rank and no progress sync before the epoch's end (--log-every 1000): only
    # the per-step vote can stop the ranks mid-epoch.
    trace, out = tmp_path / "trace.jsonl", tmp_path / "one"
    process = start([*tiny, "--batch-size", "2", "--log-every", "1000", "--epochs", "1",
                     "--output", str(out), "--trace-samples", str(trace)], torchrun=2)
    wait_for_steps(trace, 2, process)
    pid = worker_pid(process.pid, 1)
    done = len(read_jsonl(trace))
    os.kill(pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM at step" in output
    state = torch.load(out / "last.pt", weights_only=False)
    assert done <= state["step"] < 12 and len(read_jsonl(trace)) == state["step"]
    assert [loader["batches_done"] for loader in state["loaders"]] == [state["step"]] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_cuda_without_cuda_names_the_option(tiny, tmp_path):
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
        run.main([*tiny, "--device", "cuda", "--output", str(tmp_path / "cuda")])


def test_a_run_stopped_by_a_non_finite_loss_leaves_no_progress_bar_open(tiny, tmp_path):
    """The epoch's bar is closed when the run stops mid-epoch, so the message is the last
    thing it prints: a bar left open would be drawn again when the interpreter exits."""
    result = run_python(RUN, *tiny, "--epochs", "1", "--output", tmp_path / "nan",
                        "--lr", "1e30", "--opt", "sgd")
    assert result.returncode == 1, result.stderr
    tail = result.stderr[result.stderr.rindex("non-finite loss at step "):]
    assert "epoch 0:" not in tail and "it/s" not in tail, tail
    assert "epoch 0:" in result.stderr  # the bar was drawn, before the message


def test_non_finite_loss_stops_with_the_documented_message(tiny, tmp_path):
    with pytest.raises(SystemExit) as info:
        run.main([*tiny, "--epochs", "2", "--output", str(tmp_path / "nan"),
                  "--lr", "1e30", "--opt", "sgd"])
    message = str(info.value)
    assert message.startswith("non-finite loss at step ")
    assert "Last good checkpoint: none written yet" in message
    # After a good epoch, a diverging resume names the step and the checkpoint to go back to.
    out = tmp_path / "later"
    run.main([*tiny, "--epochs", "1", "--output", str(out)])
    with pytest.raises(SystemExit) as info:
        run.main([*tiny, "--epochs", "2", "--output", str(out), "--resume", "auto",
                  "--lr", "1e30"])
    step = int(str(info.value).split("at step ")[1].split()[0])
    assert 6 <= step < 12
    assert f"Last good checkpoint: {out / 'last.pt'}" in str(info.value)
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 6  # not overwritten


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: resnet18\nepochs: 7\nlabel_mode: original\nsmoothing: 0.2\n")
    args = run.parse_args(["--config", str(config), "--epochs", "3"])
    assert (args.model, args.epochs, args.label_mode, args.smoothing) == (
        "resnet18", 3, "original", 0.2)
    assert args.image_size == run.DEMO_DEFAULTS["image_size"]  # no --data: the demo preset
    config.write_text("modle: resnet18\n")
    with pytest.raises(SystemExit, match="modle: unknown key"):
        run.parse_args(["--config", str(config)])


def test_mixing_flags_are_timms_and_the_older_cutmix_spelling_maps_onto_them():
    args = run.parse_args(["--cutmix-prob", "0.5", "--cutmix-beta", "2"])
    assert (args.cutmix, args.mixup_prob, args.mixup) == (2.0, 0.5, 0.0)
    args = run.parse_args(["--mixup", "0.8", "--cutmix", "1.0", "--cutmix-minmax", "0.2", "0.8",
                           "--mixup-switch-prob", "0.4", "--mixup-mode", "elem"])
    assert (args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_switch_prob,
            args.mixup_mode, args.mixup_prob) == (0.8, 1.0, [0.2, 0.8], 0.4, "elem", 1.0)
    with pytest.raises(SystemExit, match="older spelling of --cutmix B --mixup-prob P"):
        run.parse_args(["--cutmix-prob", "0.5", "--cutmix", "1.0"])


def test_smoothing_reaches_the_loader_for_the_original_labels_only(tiny):
    """--smoothing is the recipe of one-hot labels: the loader smooths them after mixing;
    ReLabel's soft targets are left as they are."""
    for mode, want in (("original", 0.1), ("localized_multi", 0.0)):
        args = run.parse_args([*tiny, "--label-mode", mode, "--smoothing", "0.1"])
        loader = trainer.train_loader(args, torch.device("cpu"))
        batch = next(iter(loader))
        assert loader.label_smoothing == want
        if mode == "original":  # one-hot labels, smoothed: 0.92 and 0.02 over C = 5 ...
            classes = loader.num_classes
            assert_close(batch.targets.max(1).values,
                         torch.full((len(batch.targets),), 0.9 + 0.1 / classes))
            assert_close(batch.targets.min(1).values,
                         torch.full((len(batch.targets),), 0.1 / classes))


# ---- the loader's augmentation flags, --evaluate, the totals of a resumed epoch ----------

def first_batch(tiny, *flags):
    """The loader train/run.py builds from `flags` and its first batch."""
    loader = trainer.train_loader(run.parse_args([*tiny, *flags]), torch.device("cpu"))
    return loader, next(iter(loader))


@pytest.fixture(scope="module")
def plain(tiny):
    """The loader and first batch without augmentation flags (the seed fixes both)."""
    return first_batch(tiny)


def test_num_crops_reaches_the_loader_and_repeats_each_image_in_its_batch(tiny, plain):
    plain_loader, plain_batch = plain
    loader, batch = first_batch(tiny, "--num-crops", "2")
    assert (plain_loader.num_crops, loader.num_crops) == (1, 2)
    # As many samples per epoch, from half the images: each twice.
    assert len(plain_loader) == len(loader) == 6
    epoch = collections.Counter(loader.epoch_order(0).tolist())
    assert len(epoch) == 24 and set(epoch.values()) == {2}
    assert len(set(plain_loader.epoch_order(0).tolist())) == 48
    counts = collections.Counter(batch.sample_index.tolist())
    assert len(counts) == 4 and set(counts.values()) == {2}
    assert len(set(plain_batch.sample_index.tolist())) == 8
    for row in counts:  # each crop of an image has its own window
        first, second = batch.boxes[batch.sample_index == row]
        assert not torch.equal(first, second)


@pytest.mark.parametrize("flags, attribute", [
    pytest.param(["--aa", "rand-m9-mstd0.5-inc1"], "policy", id="aa"),
    pytest.param(["--color-jitter", "0.4"], "color_jitter", id="color-jitter"),
])
def test_augmentation_flags_reach_the_loader_and_change_the_images(tiny, plain, flags,
                                                                   attribute):
    plain_loader, plain_batch = plain
    loader, batch = first_batch(tiny, *flags)
    assert getattr(plain_loader.augment, attribute) is None
    assert getattr(loader.augment, attribute) is not None
    # The same crops of the same images (the crop draws do not move), other pixels.
    assert torch.equal(batch.sample_index, plain_batch.sample_index)
    assert torch.equal(batch.boxes, plain_batch.boxes)
    assert not torch.equal(batch.images, plain_batch.images)
    _, again = first_batch(tiny)  # the control: without the flag, the same batch again
    assert torch.equal(again.images, plain_batch.images)


def test_a_policy_replaces_color_jitter_as_in_timm(tiny):
    loader, _ = first_batch(tiny, "--aa", "rand-m9-mstd0.5", "--color-jitter", "0.4")
    assert loader.augment.policy is not None and loader.augment.color_jitter is None


def test_random_erasing_flags_reach_the_loader_and_erase(tiny, plain):
    _, plain_batch = plain
    loader, const = first_batch(tiny, "--reprob", "1", "--remode", "const")
    augment = loader.augment
    assert (augment.re_prob, augment.re_mode, augment.re_count) == (1.0, "const", 1)
    assert torch.equal(const.boxes, plain_batch.boxes)
    erased = const.images != plain_batch.images
    assert erased.flatten(1).any(1).all()  # every image (--reprob 1) ...
    assert (const.images[erased] == 0).all()  # ... has zeros painted in (--remode const)
    loader, pixel = first_batch(tiny, "--reprob", "1", "--remode", "pixel")
    assert loader.augment.re_mode == "pixel"
    noise = pixel.images != plain_batch.images
    assert noise.flatten(1).any(1).all() and (pixel.images[noise] != 0).any()
    loader, three = first_batch(tiny, "--reprob", "1", "--recount", "3")
    assert loader.augment.re_count == 3 and not torch.equal(three.images, const.images)


@pytest.mark.parametrize("ema", [[], ["--ema", "0.5"]], ids=["plain", "ema"])
def test_evaluate_reports_the_top1_of_the_last_epoch_of_the_checkpoint(tiny, tmp_path, ema):
    out = tmp_path / "run"
    run.main([*tiny, "--epochs", "2", "--output", str(out), *ema])
    last = read_jsonl(out / "metrics.jsonl")[-1]
    saved = (out / "last.pt").read_bytes()
    # The evaluation of a run with --ema is the EMA's: --evaluate evaluates what was saved
    # as the model the run reports, with or without the flag.
    for weights in (["--checkpoint", str(out / "last.pt")], ["--resume", str(out / "last.pt")],
                    ["--resume", "auto", *ema]):
        record = run.main([*tiny, "--evaluate", "--output", str(out), *weights])
        assert record == {key: pytest.approx(last[key]) for key in
                          ("val_top1", "val_top5", "val_real")}, weights
    assert len(read_jsonl(out / "metrics.jsonl")) == 2  # --evaluate writes nothing
    assert (out / "last.pt").read_bytes() == saved


def test_a_resumed_epoch_reports_the_whole_epoch(tiny, tmp_path):
    """Killed mid-epoch and resumed, the epoch's record covers all its steps: the loss of
    the steps before the kill comes from the checkpoint."""
    flags = [*tiny, "--batch-size", "4", "--epochs", "1"]  # 12 steps
    reference = run.main([*flags, "--output", str(tmp_path / "ref")])
    trace, out = tmp_path / "trace.jsonl", tmp_path / "killed"
    args = [*flags, "--output", str(out), "--ckpt-every", "1", "--trace-samples", str(trace)]
    process = start(args)
    wait_for_steps(trace, 5, process)  # step 5 is traced after step 4's checkpoint
    process.kill()
    process.wait()
    done = torch.load(out / "last.pt", weights_only=True)["loaders"][0]["batches_done"]
    assert 4 <= done < 12  # killed mid-epoch, after a checkpoint of it
    assert not (out / "metrics.jsonl").exists()
    record = run.main([*args, "--resume", "auto"])
    loader_len = len(trainer.train_loader(run.parse_args(flags), torch.device("cpu")))
    assert record["steps"] == reference["steps"] == loader_len == 12
    assert record["train_loss"] == pytest.approx(reference["train_loss"], rel=LOSS_RTOL)
    (written,) = read_jsonl(out / "metrics.jsonl")
    assert written == pytest.approx(record)


def test_evaluate_evaluates_the_ema_the_run_reported(tiny, tmp_path):
    """A run with --ema reports its EMA's accuracy: --evaluate evaluates the EMA weights
    of the checkpoint, with or without --ema. Crafted so the two weights disagree: the EMA
    always answers class 2, the raw model class 0; every ReaL set is {2}."""
    out = tmp_path / "run"
    run.main([*tiny, "--epochs", "1", "--output", str(out), "--ema", "0.5"])
    state = torch.load(out / "last.pt", weights_only=True)
    for key, answer in (("ema", 2), ("model", 0)):
        state[key]["fc.weight"].zero_()
        state[key]["fc.bias"].copy_(torch.eye(4)[answer] * 100)
    crafted = tmp_path / "crafted.pt"
    torch.save(state, crafted)
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[2]] * 16))
    flags = [*tiny, "--real-labels", str(real), "--evaluate", "--output", str(out)]
    for weights in (["--checkpoint", str(crafted)], ["--resume", str(crafted)],
                    ["--checkpoint", str(crafted), "--ema", "0.9"]):
        record = run.main([*flags, *weights])
        assert (record["val_real"], record["val_top1"]) == (100.0, 25.0), weights
