"""ReLabelLoader and ValLoader on real JPEGs through real CPU DALI pipelines."""
import gc
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

import dali_relabel
from labelmap_data import make_label_maps
from dali_relabel import LabelMapStore, reference_label_pooling
from dali_relabel import LABEL_MODES, ReLabelLoader, ValLoader
from jpeg_data import (NUM_CLASSES, NUM_IMAGES, RAW, indexed_copy, linked_copy, pil_crop,
                       textured_image)
from script_runner import run_code


def collect(loader, epochs=1):
    """Every batch of `epochs` epochs as ReLabelBatch objects."""
    return [batch for _ in range(epochs) for batch in loader]


def cat(batches, field):
    return torch.cat([getattr(batch, field) for batch in batches])


def loader_pixels(batch, k: int) -> np.ndarray:
    return batch.images[k].permute(1, 2, 0).numpy()


def test_crops_are_honest(dataset):
    """Every image is PIL's crop of the same file at the batch's box (mean abs difference in
    0-255 pixels, from the resampling filters), and a transposed or shifted box is far off."""
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=48, return_meta=True,
                           num_threads=2, **RAW)
    store = loader.store
    honest, transposed, shifted = [], [], []
    for batch in collect(loader, epochs=2):
        for k in range(len(batch.sample_index)):
            path = os.path.join(root, store.paths[batch.sample_index[k]])
            box, flip = batch.boxes[k].numpy(), bool(batch.flip[k])
            width, height = Image.open(path).size
            # The box is the decoded window: integral in pixels.
            np.testing.assert_allclose(box * [width, height, width, height],
                                       np.round(box * [width, height, width, height]),
                                       atol=2e-3)
            got = loader_pixels(batch, k)
            honest.append(np.abs(pil_crop(path, box, 48, flip) - got).mean())
            swapped = np.clip(box[[1, 0, 3, 2]], 0, 1)
            transposed.append(np.abs(pil_crop(path, swapped, 48, flip) - got).mean())
            # The same window moved by 3 pixels (to whichever side has room).
            dx = 3 / width if box[2] + 3 / width <= 1 else -3 / width
            moved = box + np.array([dx, 0, dx, 0])
            shifted.append(np.abs(pil_crop(path, moved, 48, flip) - got).mean())
    honest, transposed, shifted = np.array(honest), np.array(transposed), np.array(shifted)
    assert len(honest) == 2 * 24
    assert honest.max() < 1.0, honest
    # A transposed box (the official code's bug) or a shifted one fails the same threshold.
    assert np.mean(transposed > 1.0) > 0.9 and np.median(transposed) > 10 * np.median(honest)
    assert np.mean(shifted > 1.0) > 0.9, shifted


@pytest.mark.parametrize("label_mode", LABEL_MODES)
@pytest.mark.parametrize("output_size", [1, 3], ids=["S1", "S3-tokens-flip-aware"])
def test_targets_follow_boxes(dataset, label_mode, output_size):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 10, device="cpu", image_size=32,
                           label_mode=label_mode, output_size=output_size, return_meta=True,
                           num_threads=2)
    store = LabelMapStore.open(store_path, placement="memory")
    for batch in collect(loader):
        if label_mode == "original":
            want = torch.nn.functional.one_hot(store.labels[batch.sample_index], NUM_CLASSES)
            want = want.float()
            if output_size > 1:
                want = want[:, None].expand(-1, output_size ** 2, -1)
        elif label_mode.startswith("global"):  # one whole-image target for every token
            whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(batch.boxes), 4)
            want = reference_label_pooling(
                store.values, store.indices, whole, num_classes=NUM_CLASSES,
                sample_index=batch.sample_index,
                mode="softmax" if label_mode.endswith("multi") else "argmax")
            if output_size > 1:
                want = want[:, None].expand(-1, output_size ** 2, -1)
        else:
            want = reference_label_pooling(
                store.values, store.indices, batch.boxes, num_classes=NUM_CLASSES,
                output_size=output_size, flip=batch.flip, sample_index=batch.sample_index,
                mode="softmax" if label_mode.endswith("multi") else "argmax")
        assert_close(batch.targets, want, atol=1e-5, rtol=0)
        assert batch.labels.tolist() == store.labels[batch.sample_index].tolist()


def test_shards_cover_an_epoch_exactly_once(dataset):
    root, store_path = dataset
    rows = []
    for shard_id in range(2):
        with pytest.warns(UserWarning, match="drop_last=False: ranks may yield different"):
            loader = ReLabelLoader(root, store_path, 4, device="cpu", image_size=16,
                                   shard_id=shard_id, num_shards=2, drop_last=False,
                                   return_meta=True, num_threads=1)
        batches = collect(loader)
        assert len(batches) == len(loader) == 4  # 15 samples: 3 full batches and 3 left
        assert [len(b.sample_index) for b in batches] == [4, 4, 4, 3]
        rows.append(cat(batches, "sample_index"))
    assert sorted(torch.cat(rows).tolist()) == list(range(NUM_IMAGES))


def test_drop_last_gives_every_rank_the_same_full_batches(dataset):
    root, store_path = dataset
    seen = []
    for shard_id in range(2):
        loader = ReLabelLoader(root, store_path, 4, device="cpu", image_size=16,
                               shard_id=shard_id, num_shards=2, return_meta=True, num_threads=1)
        batches = collect(loader)
        assert len(batches) == len(loader) == 3
        assert all(len(b.sample_index) == 4 for b in batches)
        seen.append(set(cat(batches, "sample_index").tolist()))
    assert not seen[0] & seen[1]


def test_global_shuffle_changes_every_epoch_and_is_shared_by_ranks(dataset):
    root, store_path = dataset
    loaders = [ReLabelLoader(root, store_path, 5, device="cpu", image_size=16, shard_id=r,
                             num_shards=2, seed=3) for r in range(2)]
    orders = [[np.concatenate([l.epoch_order(e) for l in loaders])] for e in range(3)]
    for order in orders:
        assert sorted(order[0].tolist()) == list(range(NUM_IMAGES))
    assert not np.array_equal(orders[0][0], orders[1][0])
    # The order is the one the pipeline actually reads.
    single = ReLabelLoader(root, store_path, 5, device="cpu", image_size=16, seed=3,
                           return_meta=True, num_threads=1)
    for epoch in range(2):
        assert cat(collect(single), "sample_index").tolist() == single.epoch_order(epoch).tolist()


def test_same_seed_same_batches_and_resume_mid_epoch(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=24, seed=7, return_meta=True, num_threads=2)
    full = collect(ReLabelLoader(root, store_path, 6, **kwargs), epochs=2)
    again = collect(ReLabelLoader(root, store_path, 6, **kwargs), epochs=2)
    for a, b in zip(full, again):
        assert torch.equal(a.sample_index, b.sample_index)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    other = collect(ReLabelLoader(root, store_path, 6, **{**kwargs, "seed": 8}))
    assert not torch.equal(cat(other, "sample_index"), cat(full[:5], "sample_index"))

    # Preempted after 2 of the 5 batches of epoch 1: a new process resumes from state_dict.
    first = ReLabelLoader(root, store_path, 6, **kwargs)
    collect(first)
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 2)
    resumed = ReLabelLoader(root, store_path, 6, **kwargs)
    resumed.load_state_dict(state)
    rest = collect(resumed)
    assert len(rest) == 3
    for want, got in zip(full[5:], seen + rest):
        assert torch.equal(want.sample_index, got.sample_index)
        assert torch.equal(want.boxes, got.boxes) and torch.equal(want.flip, got.flip)
        assert torch.equal(want.images, got.images) and torch.equal(want.targets, got.targets)
    assert resumed.epoch == 2

    # The DistributedSampler habit, set_epoch after load_state_dict, keeps the position.
    again = ReLabelLoader(root, store_path, 6, **kwargs)
    again.load_state_dict(state)
    again.set_epoch(1)
    assert cat(collect(again), "sample_index").tolist() == cat(rest, "sample_index").tolist()
    with pytest.raises(ValueError, match="batch_size: saved 6, now 5"):
        ReLabelLoader(root, store_path, 5, **kwargs).load_state_dict(state)


def assert_same_batches(want, got):
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert torch.equal(a.sample_index, b.sample_index)
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flip, b.flip)
        assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("kwargs", [
    dict(drop_last=True),
    # A short last batch, then the next epoch's full one; parameters planned for the graph.
    dict(drop_last=False, color_jitter=0.4, auto_augment="ta_wide", mixup_alpha=0.8),
], ids=["full-batches", "short-last-batch-graph-augmentations-mixup"])
def test_epochs_run_on_in_one_graph_as_fresh_loaders_give_them(dataset, kwargs):
    """The next epoch's pipeline starts while the loop takes an epoch's last batches, and
    every epoch is what a new loader set to that epoch yields; set_epoch elsewhere, or an
    epoch left early, starts anew."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=24, seed=3, return_meta=True, num_threads=2,
                  **kwargs)
    loader = ReLabelLoader(root, store_path, 8, **kwargs)
    assert len(loader) == (3 if kwargs["drop_last"] else 4)
    epochs = []
    for _ in range(4):
        epochs.append(collect(loader))
        assert loader._decoder.ahead(loader.epoch) is not None  # the next one is under way
    for epoch, batches in enumerate(epochs):
        fresh = ReLabelLoader(root, store_path, 8, **kwargs)
        fresh.set_epoch(epoch)
        assert_same_batches(collect(fresh), batches)
    loader.set_epoch(7)
    assert loader._decoder.ahead(7) is None
    jumped = collect(loader)
    fresh = ReLabelLoader(root, store_path, 8, **kwargs)
    fresh.set_epoch(7)
    assert_same_batches(collect(fresh), jumped)
    next(iter(loader))  # epoch 8 left early: epoch 9 starts anew, as planned
    assert loader._decoder.ahead(9) is None
    fresh.set_epoch(9)
    assert_same_batches(collect(fresh), collect(loader))


def test_an_epoch_left_in_its_last_batches_with_its_iterator_alive(dataset):
    """The next epoch's pipeline, started without the size check, is not used when the
    checking epoch was left before its end; the old iterator's end keeps the new one's."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=16, seed=4, return_meta=True, num_threads=1)
    loader = ReLabelLoader(root, store_path, 8, **kwargs)
    early = iter(loader)
    next(early), next(early)  # 2 of 3 batches: the next epoch has started
    assert loader._decoder.checking_sizes
    batches = collect(loader)
    assert not loader._decoder.checking_sizes  # epoch 1 ran the check to its end
    fresh = ReLabelLoader(root, store_path, 8, **kwargs)
    fresh.set_epoch(1)
    assert_same_batches(collect(fresh), batches)
    del early
    gc.collect()
    assert loader._decoder.ahead(2) is not None


def test_the_next_epoch_is_built_ahead_and_decodes_after_the_last_batch(dataset, monkeypatch):
    """Planned and built while the loop takes this epoch's last batches, the next epoch's
    pipeline decodes nothing until the last batch is handed out: the two epochs' decoding
    never compete for the CPU threads."""
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=16, seed=5,
                           num_threads=1)
    decoder, events = loader._decoder, []
    build, iterate = decoder._build, decoder._iterate
    monkeypatch.setattr(decoder, "_build", lambda *a: (events.append("build"), build(*a))[1])
    monkeypatch.setattr(decoder, "_iterate",
                        lambda *a: (events.append("decode"), iterate(*a))[1])
    batches = iter(loader)
    for _ in range(len(loader) - 1):
        next(batches)
    deadline = time.monotonic() + 60
    while events.count("build") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # room for a start that would not wait
    assert events == ["build", "decode", "build"]  # epoch 0 running; epoch 1 built only
    next(batches)  # the last batch
    assert loader._decoder.ahead(1) is not None and events.count("decode") == 2


def test_an_iterator_left_before_the_next_epoch_decodes_does_not_hold_up_exit(dataset):
    """The background start waits for this epoch's last batch; an iterator abandoned before
    it, alive at exit, does not keep the interpreter from exiting."""
    root, store_path = dataset
    result = run_code(
        "import sys\nfrom dali_relabel import ReLabelLoader\n"
        "loader = ReLabelLoader(sys.argv[1], sys.argv[2], 8, device='cpu', image_size=16, "
        "num_threads=1)\nbatches = iter(loader)\n"
        "for _ in range(len(loader) - 1):\n    next(batches)\nprint('left')\n",
        root, store_path, timeout=120)
    assert result.returncode == 0 and "left" in result.stdout, result.stderr[-2000:]


def test_a_bad_image_of_the_next_epoch_is_named_by_that_epoch(dataset, tmp_path):
    """The next epoch's pipeline starts before this epoch ends; a file it fails on stops
    neither this epoch nor goes unnamed."""
    root, _ = dataset
    indexed = indexed_copy(dataset, tmp_path)
    paths = LabelMapStore.open(indexed).paths
    for seed in range(20):  # a file in epoch 1's first batch that epoch 0 leaves out
        probe = ReLabelLoader(root, indexed, 8, device="cpu", seed=seed)
        left_out = set(probe.epoch_order(1)[:8]) - set(probe.epoch_order(0)[:24])
        if left_out:
            break
    bad = int(min(left_out))
    broken = linked_copy(root, paths, tmp_path / "broken")
    os.remove(broken / paths[bad])
    (broken / paths[bad]).write_text("not an image\n")
    loader = ReLabelLoader(broken, indexed, 8, device="cpu", image_size=16, seed=seed,
                           num_threads=1)
    assert len(collect(loader)) == 3
    with pytest.raises(RuntimeError, match=rf"{paths[bad]}: decoding failed"):
        collect(loader)


def test_epoch_left_early_counts_as_done(dataset):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 6, device="cpu", image_size=16, return_meta=True,
                           num_threads=1)
    first = next(iter(loader))  # a peek at the shapes, as one does with a DataLoader
    assert first.images.shape == (6, 3, 16, 16)
    rows = cat(collect(loader), "sample_index").tolist()
    assert loader.epoch == 2 and rows == loader.epoch_order(1).tolist()


def test_shards_default_to_the_global_rank(dataset, monkeypatch):
    """Node 2 of 2, local rank 1: the shard is the global rank 3, never LOCAL_RANK."""
    root, store_path = dataset
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    loader = ReLabelLoader(root, store_path, 2, device="cpu", image_size=16)
    assert (loader.shard_id, loader.num_shards) == (3, 4)
    assert loader.epoch_order(0).tolist() == ReLabelLoader(
        root, store_path, 2, device="cpu", shard_id=3, num_shards=4).epoch_order(0).tolist()


def test_shards_come_from_torchrun_variables_before_the_process_group(dataset, monkeypatch):
    import dali_relabel.loading.common as loading
    root, store_path = dataset
    monkeypatch.setattr(loading, "_warned_env_shard", False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="RANK=1 and WORLD_SIZE=2 .* init_process_group"):
        loader = ReLabelLoader(root, store_path, 2, device="cpu", image_size=16)
    assert (loader.shard_id, loader.num_shards) == (1, 2)
    val = ValLoader(root, 4, device="cpu")  # warned once per process
    assert (val.shard_id, val.num_shards) == (1, 2)
    # A process group that disagrees with the variables is a broken set-up.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="RANK/WORLD_SIZE say rank 1 of 2 but the process "
                                         "group says rank 0 of 2"):
        ReLabelLoader(root, store_path, 2, device="cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' and WORLD_SIZE='2' must be integers"):
        ReLabelLoader(root, store_path, 2, device="cpu")


def test_host_gather_path_equals_fused_gather(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=16, seed=2, return_meta=True, num_threads=1,
                  output_size=2)
    fused = collect(ReLabelLoader(root, store_path, 5, fused_gather=True, **kwargs))
    gathered = collect(ReLabelLoader(root, store_path, 5, fused_gather=False,
                                     labelmaps_placement="memory", **kwargs))
    assert_close(cat(gathered, "targets"), cat(fused, "targets"), atol=0, rtol=0)


@pytest.mark.parametrize("dataset_name, value, message", [
    pytest.param("indices", NUM_CLASSES, r"/indices holds class ids outside \[0, 10\) "
                 r"\(first rows \[7, 12\]\)", id="class-out-of-range"),
    pytest.param("values", float("nan"), r"/values holds NaN or inf \(first rows \[7, 12\]\)",
                 id="nan-value"),
    pytest.param("values", float("inf"), r"/values holds NaN or inf", id="inf-value"),
])
def test_store_with_bad_data_is_refused_naming_rows(dataset, tmp_path, dataset_name, value,
                                                    message):
    import h5py
    import shutil
    root, store_path = dataset
    broken = tmp_path / "broken.h5"
    shutil.copy(store_path, broken)
    with h5py.File(broken, "r+") as f:
        for row in (7, 12):
            f[dataset_name][row, 0, 3, 3] = value
    with pytest.raises(ValueError, match=message + r".*dali-relabel info .* --full"):
        ReLabelLoader(root, broken, 2, device="cpu")
    # An excluded bad row is not trained on, so it does not stop the run.
    ReLabelLoader(root, broken, 2, device="cpu", exclude=[
        LabelMapStore.open(broken).paths[row] for row in (7, 12)])


def test_exclude_and_missing_files(dataset, tmp_path):
    root, store_path = dataset
    store = LabelMapStore.open(store_path, placement="memory")
    dropped = store.paths[:4]
    list_file = tmp_path / "bad.txt"
    list_file.write_text("# verify output\n" + "\n".join(f"{p}\tempty file" for p in dropped))
    for exclude in (str(list_file), dropped):
        loader = ReLabelLoader(root, store_path, 2, device="cpu", image_size=16,
                               exclude=exclude, drop_last=False, return_meta=True,
                               num_threads=1)
        rows = cat(collect(loader), "sample_index").tolist()
        assert sorted(rows) == list(range(4, NUM_IMAGES))

    with pytest.raises(FileNotFoundError, match="30 of 30 images .* missing .* is image_root"):
        ReLabelLoader(tmp_path, store_path, 2, device="cpu")
    partial = linked_copy(root, store.paths[1:], tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match=f"1 of 30 images .*first: {store.paths[0]}"):
        ReLabelLoader(partial, store_path, 2, device="cpu")
    ReLabelLoader(partial, store_path, 2, device="cpu", exclude=[store.paths[0]])


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(batch_size=0), "batch_size must be an int >= 1", id="batch-size-0"),
    pytest.param(dict(label_mode="soft"), "label_mode must be one of", id="unknown-label-mode"),
    pytest.param(dict(num_classes=1000), "num_classes=1000 (the model's) but", id="classes"),
    pytest.param(dict(image_size=0), "image_size must be an int in [1, 4096]", id="image-size-0"),
    pytest.param(dict(prefetch=0), "prefetch must be an int in [1, 256]", id="prefetch-0"),
    pytest.param(dict(scale=(1.0, 0.08)), "scale must be (min, max)", id="scale-reversed"),
    pytest.param(dict(ratio=(4 / 3, 3 / 4)), "ratio must be (min, max)", id="ratio-reversed"),
    pytest.param(dict(hflip=1.5), "hflip must be a float in [0, 1]", id="hflip-above-1"),
    pytest.param(dict(shard_id=2, num_shards=2), "shard_id must lie in", id="shard-id"),
    pytest.param(dict(batch_size=31), "leaves no full batch", id="batch-larger-than-data"),
    pytest.param(dict(dtype=torch.int8), "dtype must be one of", id="image-dtype"),
    pytest.param(dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                 "looks like the 0-1 scale (timm's, torchvision's): multiply mean and std by "
                 "255", id="mean-std-on-0-1-scale"),
    pytest.param(dict(std=(58.0, 57.0)), "mean and std must have 3 values", id="std-of-2"),
    pytest.param(dict(label_smoothing=1.0), "label_smoothing must be a float in [0, 1)",
                 id="label-smoothing-1"),
    pytest.param(dict(auto_augment="ra", ra_magnitude=31), "ra_magnitude must be an int in "
                 "[0, 30]", id="ra-magnitude-31"),
    pytest.param(dict(auto_augment="augmix"), "auto_augment='augmix': AugMix is not supported",
                 id="augmix"),
    # Bounds that kept DALI from aborting the process or failing after start.
    pytest.param(dict(num_threads=100000), "num_threads must be an int in [1, 256]",
                 id="num-threads-100000"),
    pytest.param(dict(num_threads=0), "num_threads must be an int in [1, 256]",
                 id="num-threads-0"),
    pytest.param(dict(prefetch=100000), "prefetch must be an int in [1, 256]",
                 id="prefetch-100000"),
    pytest.param(dict(image_size=100000), "image_size must be an int in [1, 4096]",
                 id="image-size-100000"),
    # No NaN or inf reaches the pixels or the draws.
    pytest.param(dict(mean=(float("nan"),) * 3), "mean must be 3 finite floats", id="mean-nan"),
    pytest.param(dict(std=(float("inf"),) * 3), "std must be 3 finite floats", id="std-inf"),
    pytest.param(dict(mixup_alpha=float("inf")), "mixup_alpha must be a finite float >= 0",
                 id="mixup-alpha-inf"),
    pytest.param(dict(ratio=(0.75, float("inf"))), "ratio must be (min, max) with 0 < min <= "
                 "max, finite", id="ratio-inf"),
    pytest.param(dict(color_jitter=float("nan")), "color_jitter: brightness must be a finite "
                 "float", id="color-jitter-nan"),
    # Each wrong type named.
    pytest.param(dict(hflip="0.5"), "hflip must be a float in [0, 1], got '0.5'", id="hflip-str"),
    pytest.param(dict(seed=-1), "seed must be an int in [0, ", id="seed-negative"),
    pytest.param(dict(seed=None), "seed must be an int in [0, ", id="seed-none"),
    pytest.param(dict(device="tpu"), "device must be 'cuda' or 'cpu'", id="device-tpu"),
    pytest.param(dict(vflip=2.0), "vflip must be a float in [0, 1]", id="vflip-2"),
    pytest.param(dict(interpolation="lanczos"), "interpolation must be one of ('bilinear', "
                 "'bicubic', 'random')", id="interpolation-lanczos"),
])
def test_bad_arguments(dataset, kwargs, message):
    root, store_path = dataset
    args = {"batch_size": 4, "device": "cpu", **kwargs}
    with pytest.raises(ValueError) as info:
        ReLabelLoader(root, store_path, **args)
    assert message in str(info.value)


def test_image_formats_and_layouts(dataset):
    root, store_path = dataset
    images, targets = next(iter(ReLabelLoader(root, store_path, 4, device="cpu",
                                              image_size=32, num_threads=1)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert targets.shape == (4, NUM_CLASSES) and targets.dtype == torch.float32
    assert_close(targets.sum(1), torch.ones(4))
    # ImageNet normalization: roughly zero-mean, unit-scale values.
    assert -3 < images.mean() < 3 and images.abs().max() < 3.0
    for dtype in (torch.float16, torch.bfloat16):
        half, _ = next(iter(ReLabelLoader(root, store_path, 4, device="cpu", image_size=32,
                                          dtype=dtype, channels_last=True, num_threads=1)))
        assert half.dtype == dtype and half.shape == (4, 3, 32, 32)
        assert half.is_contiguous(memory_format=torch.channels_last)
        assert_close(half.float(), images, atol=0.05, rtol=0.02)


def untidy_files(folder) -> dict:
    """The kinds of file real ImageNet holds, each made from one textured picture."""
    picture = textured_image(np.random.default_rng(5), 200, 120)
    os.makedirs(folder / "n01", exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    files = {
        "cmyk": lambda p: picture.convert("CMYK").save(p, quality=95),
        "grayscale": lambda p: picture.convert("L").save(p, quality=95),
        "progressive": lambda p: picture.save(p, quality=95, progressive=True),
        "png-named-jpeg": lambda p: picture.save(p, format="PNG"),
        "exif-rotated": lambda p: picture.save(p, quality=95, exif=exif.tobytes()),
    }
    paths = {}
    for kind, save in files.items():
        save(folder / "n01" / f"{kind}.JPEG")
        paths[kind] = f"n01/{kind}.JPEG"
    return paths


@pytest.mark.parametrize("adjust_orientation", [False, True],
                         ids=["exif-ignored-like-PIL", "exif-applied"])
def test_untidy_imagenet_files_decode_to_rgb(tmp_path, adjust_orientation):
    root = tmp_path / "untidy"
    paths = untidy_files(root)
    values, indices = make_label_maps(len(paths), 5, NUM_CLASSES, seed=2)
    store_path = tmp_path / "untidy.h5"
    dali_relabel.write_labelmaps(store_path, values, indices, np.zeros(len(paths), np.int64),
                                 list(paths.values()),
                                 [f"c{c}" for c in range(NUM_CLASSES)])
    loader = ReLabelLoader(root, store_path, len(paths), device="cpu", image_size=40,
                           adjust_orientation=adjust_orientation, return_meta=True,
                           num_threads=1, **RAW)
    batch = next(iter(loader))
    kinds = list(paths)
    for k, row in enumerate(batch.sample_index.tolist()):
        path = os.path.join(root, paths[kinds[row]])
        want = pil_crop(path, batch.boxes[k].numpy(), 40, bool(batch.flip[k]),
                        orient=adjust_orientation)
        assert np.abs(want - loader_pixels(batch, k)).mean() < 2.5, kinds[row]
    if adjust_orientation:  # the rotated file is portrait once its orientation is applied
        k = batch.sample_index.tolist().index(kinds.index("exif-rotated"))
        width, height = Image.open(os.path.join(root, paths["exif-rotated"])).size
        box = batch.boxes[k].numpy()
        assert (width, height) == (200, 120)
        np.testing.assert_allclose(box * [120, 200, 120, 200],
                                   np.round(box * [120, 200, 120, 200]), atol=2e-3)




def test_paths_of_any_length_depth_and_script_read_their_own_file(tmp_path, monkeypatch):
    """Names of different lengths, depths and scripts, under a relative image root, each
    decode their own file."""
    relative = ["a.jpg", "n01/b.JPEG", "n01/deeper/still/c with spaces.jpeg",
                "ñandú/éclair-日本.JPEG", "n01/" + "long" * 40 + ".JPEG"]
    rng = np.random.default_rng(11)
    for path in relative:
        os.makedirs((tmp_path / "images" / path).parent, exist_ok=True)
        textured_image(rng, int(rng.integers(60, 160)), int(rng.integers(60, 160))).save(
            tmp_path / "images" / path, quality=95)
    values, indices = make_label_maps(len(relative), 5, NUM_CLASSES, seed=3)
    dali_relabel.write_labelmaps(tmp_path / "maps.h5", values, indices,
                                 np.zeros(len(relative), np.int64), relative,
                                 [f"c{c}" for c in range(NUM_CLASSES)])
    monkeypatch.chdir(tmp_path)
    loader = ReLabelLoader("images", "maps.h5", len(relative), device="cpu", image_size=32,
                           return_meta=True, num_threads=1, **RAW)
    batch = next(iter(loader))
    assert sorted(batch.sample_index.tolist()) == list(range(len(relative)))
    for k, row in enumerate(batch.sample_index.tolist()):
        path = tmp_path / "images" / relative[row]
        others = [tmp_path / "images" / p for p in relative if p != relative[row]]
        got = loader_pixels(batch, k)
        box, flip = batch.boxes[k].numpy(), bool(batch.flip[k])
        own = np.abs(pil_crop(str(path), box, 32, flip) - got).mean()
        assert own < 1.0, relative[row]
        assert all(np.abs(pil_crop(str(other), box, 32, flip) - got).mean() > 5 * own + 1
                   for other in others), relative[row]
def test_val_loader_matches_pil_and_covers_shards(dataset):
    root, _ = dataset
    labels = []
    for shard_id in range(2):
        val = ValLoader(root, 4, device="cpu", image_size=32, resize_size=40,
                        shard_id=shard_id, num_shards=2, num_threads=1, **RAW)
        batches = list(val)
        assert len(batches) == len(val) == 4
        images = torch.cat([b[0] for b in batches])
        shard_labels = torch.cat([b[1] for b in batches])
        assert len(images) == 15
        for k, i in enumerate(val.indices):
            image = Image.open(os.path.join(root, val.paths[i])).convert("RGB")
            width, height = image.size
            # torchvision's Resize(40): the long side truncated; the centre crop's offset
            # rounds half up (torchvision rounds half to even: at most a pixel apart).
            scale = 40 / min(width, height)
            size = (max(40, int(width * scale)), max(40, int(height * scale)))
            resized = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - 32 + 1) // 2, (size[1] - 32 + 1) // 2
            want = np.asarray(resized.crop((left, top, left + 32, top + 32)), np.float32)
            got = images[k].permute(1, 2, 0).numpy()
            assert np.abs(want - got).mean() < 2.5, val.paths[i]
            assert shard_labels[k] == int(val.paths[i][8])
        labels.append(shard_labels)
        assert len(list(val)) == 4  # iterable again for the next evaluation
    assert sorted(torch.cat(labels).tolist()) == sorted(i % 3 for i in range(NUM_IMAGES))


def test_sizes_from_the_store_or_the_headers_give_the_same_epoch(dataset, tmp_path, caplog):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=24, seed=5, return_meta=True, num_threads=2)
    with caplog.at_level("WARNING", logger="dali_relabel"):
        from_headers = collect(ReLabelLoader(root, store_path, 6, **kwargs))
    assert f"Run `dali-relabel index {store_path} --images {root}`" in caplog.text
    indexed = indexed_copy(dataset, tmp_path)
    store = LabelMapStore.open(indexed)
    assert store.sizes_adjust_orientation is False
    for row, path in enumerate(store.paths):
        width, height = Image.open(os.path.join(root, path)).size
        assert store.sizes[row].tolist() == [height, width]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dali_relabel"):
        from_store = collect(ReLabelLoader(root, indexed, 6, **kwargs))
    assert "dali-relabel index" not in caplog.text
    for a, b in zip(from_headers, from_store, strict=True):
        for field in ("sample_index", "boxes", "flip", "images", "targets"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("factor", [0.5, 2.0], ids=["images-shrunk", "images-enlarged"])
def test_a_resized_copy_of_the_images_is_named(dataset, tmp_path, factor):
    """/sizes recorded on the originals, images resized since: no window is decoded wrong."""
    root, _ = dataset
    indexed = indexed_copy(dataset, tmp_path)
    resized = tmp_path / "resized"
    for path in LabelMapStore.open(indexed).paths:
        image = Image.open(os.path.join(root, path))
        os.makedirs(resized / os.path.dirname(path), exist_ok=True)
        image.resize((int(image.width * factor), int(image.height * factor))).save(
            resized / path, quality=95)
    loader = ReLabelLoader(resized, indexed, 6, device="cpu", image_size=16, num_threads=1)
    with pytest.raises((ValueError, RuntimeError),
                       match=r"n0000000\d/img_\d+\.JPEG .*(decodes as|is) \[.*planned .*"
                             rf"dali-relabel index {indexed} --images {resized}"):
        collect(loader)


def test_sizes_are_checked_until_an_epoch_ends(dataset, tmp_path):
    """The first epoch checks every decoded size; the next runs a graph without the check,
    and decodes exactly what a loader that never checked decodes."""
    root, _ = dataset
    indexed = indexed_copy(dataset, tmp_path)
    checked = ReLabelLoader(root, indexed, 6, device="cpu", image_size=16, num_threads=1)
    assert checked._decoder.checking_sizes
    checked.set_epoch(0)
    collect(checked)
    assert not checked._decoder.checking_sizes
    checked.set_epoch(1)
    second = collect(checked)
    unchecked = ReLabelLoader(root, indexed, 6, device="cpu", image_size=16, num_threads=1,
                              check_sizes=False)
    assert not unchecked._decoder.checking_sizes
    unchecked.set_epoch(1)
    for a, b in zip(second, collect(unchecked), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # A resumed epoch decodes only part of its plan: the check stays on for the next one.
    resumed = ReLabelLoader(root, indexed, 6, device="cpu", image_size=16, num_threads=1)
    resumed.load_state_dict({**checked.state_dict(), "epoch": 0, "batches_done": 1})
    collect(resumed)
    assert resumed._decoder.checking_sizes


def test_a_bad_image_is_named_when_it_fails_to_decode(dataset, tmp_path):
    root, _ = dataset
    indexed = indexed_copy(dataset, tmp_path)
    paths = LabelMapStore.open(indexed).paths
    broken = linked_copy(root, paths, tmp_path / "broken")
    os.remove(broken / paths[3])
    (broken / paths[3]).write_bytes(b"")
    os.remove(broken / paths[17])
    (broken / paths[17]).write_text("not an image\n")
    loader = ReLabelLoader(broken, indexed, 30, device="cpu", image_size=16, num_threads=1)
    with pytest.raises(RuntimeError) as info:
        collect(loader)
    message = str(info.value)
    assert "2 image(s) failed to decode" in message
    assert f"{paths[3]}: empty file" in message and f"{paths[17]}: decoding failed" in message
    assert f"dali-relabel verify {broken} --labelmaps {indexed}" in message
    # Without /sizes the headers are read at start, and the bad files are named there.
    with pytest.raises(ValueError, match=rf"2 of 30 images .* no readable image header.*"
                                         rf"{paths[3]}.*{paths[17]}.*dali-relabel verify"):
        ReLabelLoader(broken, dataset[1], 30, device="cpu")


def test_listed_paths_must_be_readable_regular_files(dataset, tmp_path):
    root, store_path = dataset
    paths = LabelMapStore.open(store_path).paths
    odd = linked_copy(root, paths, tmp_path / "odd")
    os.remove(odd / paths[0])
    os.mkdir(odd / paths[0])
    os.remove(odd / paths[1])
    os.symlink(tmp_path / "nowhere.JPEG", odd / paths[1])
    with pytest.raises(FileNotFoundError,
                       match=rf"2 of 30 images .*: {paths[0]} \(a directory\), "
                             rf"{paths[1]} \(a dangling link\)"):
        ReLabelLoader(odd, store_path, 2, device="cpu")


@pytest.mark.parametrize("state, message", [
    pytest.param([1, 2], "expected a mapping, got list", id="not-a-mapping"),
    pytest.param(dict(batches_done=1), "'epoch' must be an int >= 0, found None",
                 id="no-epoch"),
    pytest.param(dict(epoch=-1, batches_done=1), "'epoch' must be an int >= 0", id="epoch<0"),
    pytest.param(dict(epoch=1, batches_done="2"), "'batches_done' must be an int >= 0 and "
                 "<= 5, found '2'", id="batches-done-str"),
    pytest.param(dict(epoch=1, batches_done=6), "'batches_done' must be an int >= 0 and <= 5",
                 id="past-the-epoch"),
    pytest.param(dict(epoch=1, batches_done=1, num_samples=29), "num_samples: saved 29, now 30",
                 id="other-data"),
])
def test_an_unusable_state_dict_is_refused(dataset, state, message):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 6, device="cpu", image_size=16, num_threads=1)
    if isinstance(state, dict) and "num_samples" in state:
        state = {**loader.state_dict(), **state}
    with pytest.raises(ValueError, match=r"state_dict .*" + message.replace("(", r"\(")):
        loader.load_state_dict(state)
    # A state saved by an earlier version (with a DALI checkpoint) still gives the position.
    old = {**loader.state_dict(), "epoch": 1, "batches_done": 4, "dali_checkpoint": "x"}
    loader.load_state_dict(old)
    assert len(collect(loader)) == 1


def test_dataloader_surface_of_the_training_loader(dataset):
    """What torchvision's and timm's reference scripts use of a DataLoader."""
    root, store_path = dataset
    store = LabelMapStore.open(store_path)
    loader = ReLabelLoader(root, store_path, 4, device="cpu", image_size=16, num_threads=1,
                           shard_id=1, num_shards=2, exclude=list(store.paths[:2]))
    assert len(loader.dataset) == NUM_IMAGES - 2  # the split, every shard's, after exclusions
    assert loader.dataset.classes == loader.classes == store.classes
    assert loader.num_classes == len(loader.classes) == NUM_CLASSES
    assert len(loader.sampler) == 12 and len(loader) == 3  # this rank's samples and batches
    # None, as the loader batches itself: timm's train.py then calls loader.sampler.set_epoch
    assert loader.batch_sampler is None
    loader.sampler.set_epoch(3)
    assert loader.epoch == 3 and loader.state_dict()["epoch"] == 3
    with pytest.raises(ValueError, match="epoch must be an int >= 0"):
        loader.sampler.set_epoch(-1)


def test_return_labels_yields_the_original_labels_beside_the_targets(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=16, seed=9, num_threads=1)
    images, targets, labels = next(iter(ReLabelLoader(root, store_path, 6, return_labels=True,
                                                      **kwargs)))
    meta = next(iter(ReLabelLoader(root, store_path, 6, return_meta=True, **kwargs)))
    assert torch.equal(images, meta.images) and torch.equal(targets, meta.targets)
    assert labels.dtype == torch.int64 and torch.equal(labels, meta.labels)
    with pytest.raises(ValueError, match="return_meta and return_labels are exclusive"):
        ReLabelLoader(root, store_path, 6, return_labels=True, return_meta=True, **kwargs)


def test_val_loader_surface_and_timm_crop_pct(dataset):
    root, _ = dataset
    kwargs = dict(device="cpu", image_size=32, num_threads=1, **RAW)
    val = ValLoader(root, 8, crop_pct=0.8, exclude=["n00000000/img_000.JPEG"], **kwargs)
    assert len(val.dataset) == NUM_IMAGES - 1 and val.dataset.classes == val.classes
    assert val.num_classes == 3 and len(val.sampler) == NUM_IMAGES - 1
    assert val.batch_sampler is None
    val.sampler.set_epoch(5)  # nothing to reshuffle: accepted and ignored
    # timm's crop_pct: the shorter side becomes floor(32 / 0.8) = 40, as resize_size=40 does.
    by_pct = torch.cat([images for images, _ in val])
    by_size = torch.cat([images for images, _ in ValLoader(
        root, 8, resize_size=40, exclude=["n00000000/img_000.JPEG"], **kwargs)])
    assert torch.equal(by_pct, by_size)
    for bad, message in ((dict(resize_size=40, crop_pct=0.8), "give resize_size (torchvision) "
                          "or crop_pct (timm), not both"),
                         (dict(crop_pct=1.5), "crop_pct must be a float in (0, 1]"),
                         (dict(interpolation="lanczos"), "interpolation must be one of")):
        with pytest.raises(ValueError) as info:
            ValLoader(root, 8, **bad, **kwargs)
        assert message in str(info.value)


def test_val_loader_bicubic_matches_pil_bicubic(dataset):
    """DALI's antialiased cubic resize against PIL's BICUBIC (what torchvision's Resize does
    to PIL images). Measured on these images: mean abs difference <= 0.14 (0-255) per image
    at this size (<= 0.21 resizing to 110); PIL's BILINEAR is >= 0.86 away (median 3.3), so
    0.5 tells the filters apart with room for rounding."""
    root, _ = dataset
    val = ValLoader(root, 8, device="cpu", image_size=32, resize_size=40,
                    interpolation="bicubic", num_threads=1, **RAW)
    images = torch.cat([b[0] for b in val])
    bicubic, bilinear = [], []
    for k, i in enumerate(val.indices):
        image = Image.open(os.path.join(root, val.paths[i])).convert("RGB")
        width, height = image.size
        scale = 40 / min(width, height)
        size = (max(40, int(width * scale)), max(40, int(height * scale)))
        left, top = (size[0] - 32 + 1) // 2, (size[1] - 32 + 1) // 2
        got = images[k].permute(1, 2, 0).numpy()
        for pil_filter, diffs in ((Image.BICUBIC, bicubic), (Image.BILINEAR, bilinear)):
            want = image.resize(size, pil_filter).crop((left, top, left + 32, top + 32))
            diffs.append(np.abs(np.asarray(want, np.float32) - got).mean())
    assert max(bicubic) < 0.5, bicubic
    assert np.median(bilinear) > 1.0, bilinear


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_training_interpolation_is_pils_filter_per_crop(dataset, interpolation):
    """timm's --train-interpolation: bicubic crops are PIL's bicubic resize of the window;
    "random" picks bilinear or bicubic per crop, as timm's default does."""
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=40, seed=2,
                           interpolation=interpolation, return_meta=True, num_threads=2, **RAW)
    store = loader.store
    chosen = []
    for batch in collect(loader):
        for k in range(len(batch.sample_index)):
            path = os.path.join(root, store.paths[batch.sample_index[k]])
            got = loader_pixels(batch, k)
            box, flip = batch.boxes[k].numpy(), bool(batch.flip[k])
            diffs = {name: np.abs(pil_crop(path, box, 40, flip, resample=resample) - got).mean()
                     for name, resample in (("bilinear", Image.BILINEAR),
                                            ("bicubic", Image.BICUBIC))}
            best = min(diffs, key=diffs.get)
            assert diffs[best] < 1.0 and diffs[best] < 0.7 * max(diffs.values()), diffs
            chosen.append(best)
    if interpolation == "bicubic":
        assert set(chosen) == {"bicubic"}
    else:
        assert 0.2 < chosen.count("bicubic") / len(chosen) < 0.8


def test_vertical_flips_turn_the_crop_and_its_token_targets(dataset):
    """timm's --vflip: the crop upside down (PIL's), and token targets with their rows of
    bins mirrored; a crop's own target does not change."""
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=40, seed=3, vflip=0.5,
                           output_size=3, return_meta=True, num_threads=2, **RAW)
    store = loader.store
    flipped = 0
    for batch in collect(loader):
        want_targets = reference_label_pooling(
            store.values, store.indices, batch.boxes, num_classes=store.num_classes,
            output_size=3, flip=batch.flip, sample_index=batch.sample_index).view(-1, 3, 3, 10)
        want_targets = torch.where(batch.vflip[:, None, None, None], want_targets.flip(1),
                                   want_targets)
        assert_close(batch.targets, want_targets.view(-1, 9, 10), atol=1e-5, rtol=0)
        for k in range(len(batch.sample_index)):
            path = os.path.join(root, store.paths[batch.sample_index[k]])
            want = pil_crop(path, batch.boxes[k].numpy(), 40, bool(batch.flip[k]))
            if batch.vflip[k]:
                want = want[::-1]
                flipped += 1
            assert np.abs(want - loader_pixels(batch, k)).mean() < 1.0
    assert 0 < flipped < len(loader) * 8


@pytest.mark.parametrize("labelmaps, error, message", [
    (None, ValueError, "labelmaps must be a label-map file path"),
    (123, ValueError, "labelmaps must be a label-map file path"),
    ("no/such/maps.h5", FileNotFoundError, "labelmaps: no/such/maps.h5 is not a file"),
])
def test_a_missing_or_wrong_labelmaps_is_named(dataset, labelmaps, error, message):
    with pytest.raises(error) as info:
        ReLabelLoader(dataset[0], labelmaps, 4, device="cpu")
    assert message in str(info.value)


@pytest.mark.parametrize("image_root, error, message", [
    (None, ValueError, "image_root must be a folder path"),
    ("no/such/folder", FileNotFoundError, "image_root: no/such/folder is not a folder"),
])
def test_a_missing_or_wrong_image_root_is_named(dataset, image_root, error, message):
    with pytest.raises(error) as info:
        ReLabelLoader(image_root, dataset[1], 4, device="cpu")
    assert message in str(info.value)


def test_an_original_label_beyond_the_classes_is_refused_at_start(dataset, tmp_path):
    root, store_path = dataset
    import h5py
    import shutil
    path = tmp_path / "maps.h5"
    shutil.copyfile(store_path, path)
    with h5py.File(path, "r+") as f:  # as a file from elsewhere may hold it
        f["labels"][3] = 10  # one past the last class
    with pytest.raises(ValueError, match=r"/labels holds class ids outside \[0, 10\) for 1 "
                                         r"images, first rows \[3\]"):
        ReLabelLoader(root, path, 4, device="cpu", label_mode="original")


def test_val_loader_names_duplicate_classes_and_empty_files(dataset, tmp_path):
    root = dataset[0]
    with pytest.raises(ValueError, match=r"classes must be unique names, found \['n00000001'\]"):
        ValLoader(root, 4, device="cpu", classes=["n00000000", "n00000001", "n00000001"])
    import shutil
    copy = tmp_path / "val"
    shutil.copytree(root, copy)
    (copy / "n00000001" / "img_004.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match="1 image\\(s\\) under .* are empty files: "
                                         "\\['n00000001/img_004.JPEG'\\]"):
        ValLoader(str(copy), 4, device="cpu")


def test_val_loader_names_a_file_that_fails_to_decode(dataset, tmp_path):
    import shutil
    copy = tmp_path / "val"
    shutil.copytree(dataset[0], copy)
    truncated = copy / "n00000002" / "img_005.JPEG"
    truncated.write_bytes(truncated.read_bytes()[:300])
    loader = ValLoader(str(copy), 4, device="cpu", image_size=32, resize_size=36, num_threads=1)
    with pytest.raises(RuntimeError, match="1 validation image\\(s\\) failed to decode: "
                                           "n00000002/img_005.JPEG"):
        list(loader)


@pytest.mark.parametrize("change", ["overwritten-in-place", "truncated"])
def test_a_store_changed_under_the_loader_is_named_not_a_crash(dataset, tmp_path, change):
    """A memory-mapped store rewritten in place would change the targets silently, a
    truncated one kill the process with SIGBUS: the next batch stops, naming the file."""
    import shutil
    root, store_path = dataset
    path = tmp_path / "maps.h5"
    shutil.copyfile(store_path, path)
    loader = ReLabelLoader(root, str(path), 4, device="cpu", image_size=16, num_threads=1,
                           labelmaps_placement="mmap")
    batches = iter(loader)
    next(batches)
    if change == "truncated":
        os.truncate(path, 1000)
    else:  # another valid store, copied over this one in place (as `cp` does)
        values, indices = make_label_maps(NUM_IMAGES, 5, NUM_CLASSES, seed=99)
        other = tmp_path / "other.h5"
        dali_relabel.write_labelmaps(other, values, indices, loader.store.labels,
                                     loader.store.paths, loader.store.classes)
        with open(other, "rb") as src, open(path, "r+b") as dst:
            dst.write(src.read())
            dst.truncate()
    with pytest.raises(dali_relabel.LabelMapError, match=f"{path}: the label-map file was "
                                                         "modified in place"):
        next(batches)


def test_a_bare_cuda_is_local_ranks_gpu_modulo_the_visible_ones(monkeypatch):
    """The rule every GPU user of the package follows (loaders, annotate, verify): under a
    launcher that shows each process one GPU, LOCAL_RANK 3 is that GPU, not a missing one."""
    from dali_relabel import _system
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _system.local_cuda_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _system.local_cuda_index() == 1
