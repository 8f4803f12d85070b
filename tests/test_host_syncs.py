"""A training epoch waits for the GPU only at its logging steps: no per-batch host read of
device data, no host-to-device copy from pageable memory (tests/device_tracker.py follows
where each tensor would live). Real loader, real trainer, on the tiny synthetic set."""
import pytest
import torch

import run
import trainer
from dali_relabel import ReLabelLoader
from dali_relabel.loading import targets as targets_module
from dali_relabel.tools import make_synthetic_imagenet
from device_tracker import DeviceTracker, device_state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    dataset = make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic"), num_classes=4,
                                      train_per_class=8, val_per_class=2, topk=3,
                                      image_size=(40, 64), progress=False)
    return dataset


def make_trainer(tiny, tmp_path, *extra):
    args = run.parse_args([
        "--data", tiny.train_root, "--labelmaps", tiny.labelmaps, "--image-size", "32",
        "--batch-size", "8", "--threads", "1", "--epochs", "1", "--log-every", "1000",
        "--device", "cpu", "--no-progress", "--output", str(tmp_path / "run"), *extra])
    return trainer.Trainer(args, trainer.Distributed("cpu", None))


def tracked_epoch(fit):
    """One training epoch under the tracker; its logging steps (the gathers of losses and
    timings) may read device data."""
    tracker = DeviceTracker(device_state(fit.model, optimizer=fit.optimizer))
    tracker.watch_gradients(fit.model.parameters())
    for name in ("sync",):
        real = getattr(fit, name)
        setattr(fit, name, lambda real=real: _paused(tracker, real))
    real_all_sum = fit.dist.all_sum
    fit.dist.all_sum = lambda values: _paused(tracker, real_all_sum, values)
    with tracker.intercepting_transfers(), tracker:
        record = fit.train_epoch()
    return tracker, record


def _paused(tracker, function, *args):
    with tracker.paused():
        return function(*args)


@pytest.mark.parametrize("extra", [
    pytest.param(["--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.5", "--remode", "pixel",
                  "--color-jitter", "0.4"], id="mixing-erasing-jitter"),
    pytest.param(["--num-crops", "2", "--aa", "rand-m9-mstd0.5", "--cutmix", "1.0"],
                 id="two-crops-policy-localized-cutmix"),
    pytest.param(["--label-mode", "original", "--smoothing", "0.1", "--mixup", "0.5"],
                 id="original-labels-smoothed"),
    pytest.param(["--model", "vit_tiny_patch16_224", "--token-targets", "2", "--opt", "adamw"],
                 id="token-labeling"),
])
def test_a_training_epoch_reads_nothing_back_and_copies_only_pinned(tiny, tmp_path, extra):
    fit = make_trainer(tiny, tmp_path, *extra)
    tracker, record = tracked_epoch(fit)
    assert tracker.problems == []
    assert record["steps"] == len(fit.train) and tracker.transfers >= 3 * len(fit.train)


def test_a_pageable_copy_put_back_is_caught(tiny, tmp_path, monkeypatch):
    """The check itself: the labels' copy as it was before (pageable, non_blocking) fails."""
    def old_labels(self, rows):
        return self._labels[rows.to(self.device, non_blocking=True)]

    monkeypatch.setattr(targets_module.TargetMaker, "labels", old_labels)
    fit = make_trainer(tiny, tmp_path)
    tracker, _ = tracked_epoch(fit)
    assert tracker.problems and all("host-to-device copy outside the pinned helper: to at "
                                    in problem and "test_host_syncs.py" in problem
                                    for problem in tracker.problems)


def test_a_host_read_in_the_step_is_caught(tiny, tmp_path, monkeypatch):
    fit = make_trainer(tiny, tmp_path)
    real_step = fit.train_step

    def step_that_logs_every_loss(batch, steps):
        real_step(batch, steps)
        fit.meter.loss_sum.item()  # what a careless progress bar would do

    fit.train_step = step_that_logs_every_loss
    tracker, _ = tracked_epoch(fit)
    assert len(tracker.problems) == len(fit.train)
    assert all(problem.startswith("host read of device data: item") for problem in
               tracker.problems)


def test_the_tracker_flags_what_waits_for_a_gpu():
    cpu = torch.device("cpu")
    host = torch.arange(6)
    tracker = DeviceTracker()
    with tracker.intercepting_transfers(), tracker:
        import dali_relabel._transfer as transfer
        on_device = transfer.to_device(host, cpu)
        summed = on_device.sum()  # stays on the device: fine
        torch.zeros(3, device=cpu).add_(1)  # made on the device: fine
        host.numpy(), host.tolist()  # host data read on the host: fine
        summed.item()
        bool(summed > 0)
        on_device[on_device > 2]
        torch.tensor([1, 2], device=cpu)
        host.to(cpu, non_blocking=True)
        torch.zeros(2, device=cpu).copy_(host[:2])
    kinds = [problem.split(" at ")[0] for problem in tracker.problems]
    assert kinds == ["host read of device data: item", "host read of device data: __bool__",
                     "boolean-mask indexing of device data: __getitem__",
                     "host-to-device copy outside the pinned helper: tensor",
                     "host-to-device copy outside the pinned helper: to",
                     "host-to-device copy outside the pinned helper: copy_"]


def test_a_loader_batch_alone_reads_nothing_back(tiny):
    loader = ReLabelLoader(tiny.train_root, tiny.labelmaps, 8, device="cpu", image_size=32,
                           num_threads=1, return_meta=True, cutmix_alpha=1.0, re_prob=1.0,
                           re_mode="rand")
    tracker = DeviceTracker()
    with tracker.intercepting_transfers(), tracker:
        batches = list(loader)
    assert tracker.problems == [] and len(batches) == len(loader)
    assert all(tracker.on_device(getattr(batch, name)) for batch in batches
               for name in ("images", "targets", "labels", "boxes", "flip", "sample_index"))
