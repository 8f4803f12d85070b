"""Several crops per decoded image (num_crops) and the two decode paths (decode="roi" and
"full"), on the CPU twin: every crop against PIL's crop of its planned window, every target
against label_pooling at its box, epochs, shards and resume."""
import os

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dali_relabel import ReLabelLoader, label_pooling
from dali_relabel.loading.decode_choice import choose_decode, probe_roi_decode, run_isolated
from dali_relabel.labelmaps import LabelMapStore
from jpeg_data import NUM_IMAGES, RAW, indexed_copy, linked_copy, pil_crop


def collect(loader, epochs=1):
    return [batch for _ in range(epochs) for batch in loader]


def assert_crops_match_pil(loader, batches, root, size):
    store = loader.store
    worst = 0.0
    for batch in batches:
        for k in range(len(batch.sample_index)):
            path = os.path.join(root, store.paths[batch.sample_index[k]])
            want = pil_crop(path, batch.boxes[k].numpy(), size, bool(batch.flip[k]))
            got = batch.images[k].permute(1, 2, 0).numpy()
            worst = max(worst, float(np.abs(want - got).mean()))
    assert worst < 1.0, worst


@pytest.mark.parametrize("decode", ["roi", "full"])
def test_both_decode_paths_give_pils_crop_of_the_planned_window(dataset, decode):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=40, decode=decode,
                           return_meta=True, num_threads=2, **RAW)
    assert loader.decode == decode
    assert_crops_match_pil(loader, collect(loader, epochs=2), root, 40)


def test_full_decode_gives_the_roi_decodes_batches(dataset):
    """Same plan, same targets; the pixels of the same window agree (the CPU decoder decodes
    the window or the whole image with the same IDCT)."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=3, return_meta=True, num_threads=2)
    roi = collect(ReLabelLoader(root, store_path, 6, decode="roi", **kwargs), epochs=2)
    full = collect(ReLabelLoader(root, store_path, 6, decode="full", **kwargs), epochs=2)
    assert len(roi) == len(full)
    for a, b in zip(roi, full):
        assert torch.equal(a.sample_index, b.sample_index) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.targets, b.targets)
        assert (a.images - b.images).abs().mean() < 0.01  # normalized units


@pytest.mark.parametrize("num_crops", [2, 4])
def test_every_crop_is_pils_crop_of_its_window_and_has_its_own_target(dataset, num_crops):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=40,
                           num_crops=num_crops, return_meta=True, num_threads=2, seed=1, **RAW)
    assert loader.decode == "full" and loader.num_crops == num_crops
    batches = collect(loader, epochs=2)
    assert_crops_match_pil(loader, batches, root, 40)
    store = loader.store
    for batch in batches:
        rows = batch.sample_index.view(-1, num_crops)
        # The crops of an image sit side by side in the batch, each with its own window.
        assert (rows == rows[:, :1]).all()
        boxes = batch.boxes.view(-1, num_crops, 4)
        assert all(len(torch.unique(group, dim=0)) > 1 for group in boxes)
        want = label_pooling(store.values, store.indices, batch.boxes,
                             num_classes=store.num_classes, sample_index=batch.sample_index)
        assert_close(batch.targets, want, atol=1e-6, rtol=0)


def test_num_crops_epochs_walk_one_shuffle_in_slices(dataset):
    """An epoch yields as many samples as without crops; N epochs see every image once
    (the global shuffle of the cycle, slice by slice), and ranks' slices are disjoint."""
    root, store_path = dataset
    n = 3
    plain = ReLabelLoader(root, store_path, 6, device="cpu", image_size=16, num_threads=1)
    ranks = [ReLabelLoader(root, store_path, 6, device="cpu", image_size=16, num_crops=n,
                           shard_id=r, num_shards=2, num_threads=1) for r in range(2)]
    single = ReLabelLoader(root, store_path, 6, device="cpu", image_size=16, num_crops=n,
                           num_threads=1)
    assert len(single) == len(plain) == NUM_IMAGES // 6
    for cycle in range(2):
        seen = []
        for epoch in range(cycle * n, (cycle + 1) * n):
            order = single.epoch_order(epoch)
            assert len(order) == len(plain.epoch_order(epoch))
            images = order[::n]
            assert (order.reshape(-1, n) == images[:, None]).all()
            seen += images.tolist()
            a, b = (set(r.epoch_order(epoch).tolist()) for r in ranks)
            assert not a & b
        assert sorted(seen) == list(range(NUM_IMAGES))  # every image once per cycle
    assert not np.array_equal(single.epoch_order(0), single.epoch_order(n))  # reshuffled


def test_one_crop_is_todays_loader_bit_for_bit(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=24, seed=5, return_meta=True, num_threads=2,
                  color_jitter=0.4, mixup_alpha=0.5)
    default = collect(ReLabelLoader(root, store_path, 6, **kwargs), epochs=2)
    one = collect(ReLabelLoader(root, store_path, 6, num_crops=1, decode="roi", **kwargs),
                  epochs=2)
    for a, b in zip(default, one):
        for name in ("images", "targets", "boxes", "flip", "sample_index", "lam"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_resume_mid_epoch_with_four_crops_yields_exactly_the_rest(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=24, seed=2, return_meta=True, num_threads=2,
                  num_crops=4, color_jitter=0.3, re_prob=0.5)
    full = collect(ReLabelLoader(root, store_path, 8, **kwargs), epochs=2)
    first = ReLabelLoader(root, store_path, 8, **kwargs)
    collect(first)
    it = iter(first)
    seen = [next(it)]
    state = first.state_dict()
    assert state["num_crops"] == 4 and (state["epoch"], state["batches_done"]) == (1, 1)
    resumed = ReLabelLoader(root, store_path, 8, **kwargs)
    resumed.load_state_dict(state)
    rest = collect(resumed)
    epoch1 = full[len(full) // 2:]
    assert len(seen + rest) == len(epoch1)
    for want, got in zip(epoch1, seen + rest):
        for name in ("images", "targets", "boxes", "flip", "sample_index"):
            assert torch.equal(getattr(want, name), getattr(got, name)), name
    with pytest.raises(ValueError, match="num_crops: saved 4, now 2"):
        ReLabelLoader(root, store_path, 8, **{**kwargs, "num_crops": 2}).load_state_dict(state)


def test_a_run_decodes_n_batches_and_a_bad_image_in_a_later_run_is_named(dataset, tmp_path):
    """With N crops one pipeline run decodes the images of N batches (every operator over B
    images, not B/N); a file that fails in a later run is named after the batches of the runs
    before it, and a short last run gives its batches only."""
    root, _ = dataset
    indexed = indexed_copy(dataset, tmp_path)
    paths = LabelMapStore.open(indexed).paths
    kwargs = dict(device="cpu", image_size=16, num_crops=2, num_threads=1, seed=3,
                  return_meta=True, **RAW)
    good = collect(ReLabelLoader(root, indexed, 4, **kwargs))
    assert len(good) == 7  # 28 samples: runs of batches 0-1, 2-3, 4-5 and 6 alone
    assert_crops_match_pil(ReLabelLoader(root, indexed, 4, **kwargs), good, root, 16)
    bad = int(good[5].sample_index[2])  # decoded in the third run only
    assert all(bad not in batch.sample_index for i, batch in enumerate(good) if i != 5)
    broken = linked_copy(root, paths, tmp_path / "broken")
    os.remove(broken / paths[bad])
    (broken / paths[bad]).write_text("not an image\n")
    got = []
    with pytest.raises(RuntimeError, match=rf"1 image\(s\) failed to decode: {paths[bad]}"):
        for batch in ReLabelLoader(broken, indexed, 4, **kwargs):
            got.append(batch)
    assert len(got) <= 4
    for want, batch in zip(good, got):
        assert torch.equal(want.images, batch.images)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_crops=3), "batch_size=8 must be a multiple of num_crops=3"),
    (dict(num_crops=2, drop_last=False), "num_crops > 1 needs drop_last=True"),
    (dict(num_crops=2, decode="roi"), "decode='roi' decodes one window per image"),
    (dict(decode="gpu"), "decode must be one of ('auto', 'roi', 'full')"),
    (dict(num_crops=0), "num_crops must be an int in [1, 64]"),
])
def test_bad_crop_and_decode_arguments(dataset, kwargs, message):
    root, store_path = dataset
    with pytest.raises(ValueError) as info:
        ReLabelLoader(root, store_path, 8, device="cpu", **kwargs)
    assert message in str(info.value)


def test_auto_takes_roi_on_the_cpu_and_full_for_several_crops():
    assert choose_decode("auto", num_crops=1, decoder_device="cpu", device_id=None, files=[],
                         adjust_orientation=False)[0] == "roi"
    assert choose_decode("auto", num_crops=4, decoder_device="mixed", device_id=0, files=[],
                         adjust_orientation=False)[0] == "full"


def test_the_probe_decodes_windows_both_ways_in_a_child_process(dataset):
    root, store_path = dataset
    files = sorted(os.path.join(root, d, f) for d in os.listdir(root)
                   for f in os.listdir(os.path.join(root, d)))[:3]
    ok, why = probe_roi_decode(files, decoder_device="cpu", device_id=None,
                               adjust_orientation=False)
    assert ok, why
    assert "12 ROI-decoded windows of 3 images matched" in why


def test_a_crash_in_the_probe_cannot_take_the_caller_down(tmp_path):
    """A real segmentation fault in the child is reported, not suffered."""
    import sys
    ok, why = run_isolated([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], 60)
    assert not ok and why == "the probe was killed by SIGSEGV"
    ok, why = run_isolated([sys.executable, "-c", "raise SystemExit('no decoder')"], 60)
    assert not ok and "exited with status 1: no decoder" in why
