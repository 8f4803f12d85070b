"""Mixup and CutMix in the loader: timm's parameters, mixed images, and mixed targets checked
against targets recomputed independently (reference LabelPooling, float64 arithmetic)."""
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from labelmap_data import make_boxes, make_label_maps
from dali_relabel import (LabelMapStore, SparseTargets, label_pooling, reference_label_pooling,
                          soft_target_cross_entropy)
from dali_relabel import ReLabelLoader
from dali_relabel.loading.mixing import (Mixing, crop_to_image, localized_cutmix_targets,
                                 smooth_targets)
from jpeg_data import NUM_CLASSES, make_jpeg_dataset

MIX = dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=None, mixup_prob=1.0,
           mixup_switch_prob=0.5, mixup_mode="batch", image_size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_jpeg_dataset(tmp_path_factory.mktemp("mixing"))


def ks_statistic(a, b):
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                  - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max()


@pytest.mark.parametrize("minmax", [None, (0.2, 0.8)], ids=["alpha", "minmax"])
def test_draws_are_distributed_as_timms_mixup(minmax):
    from timm.data.mixup import Mixup, cutmix_bbox_and_lam
    draws, size = 6000, 32
    mixing = Mixing.create(**{**MIX, "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
                              "cutmix_minmax": minmax, "mixup_prob": 0.7})
    lam, cut, box = mixing._draw(draws, size, np.random.default_rng(0))
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=minmax, prob=0.7,
                       num_classes=NUM_CLASSES)
    np.random.seed(0)
    theirs = []  # timm's batch mode: (lambda, CutMix), lambda corrected to the box
    for _ in range(draws):
        their_lam, their_cut = timm_mixup._params_per_batch()
        if their_cut:
            _, their_lam = cutmix_bbox_and_lam((size, size), their_lam, ratio_minmax=minmax)
        theirs.append((their_lam, their_cut))
    their_lam, their_cut = (np.array(v) for v in zip(*theirs))
    mixed, their_mixed = lam < 1, their_lam < 1
    assert abs(mixed.mean() - their_mixed.mean()) < 0.03  # mixup_prob
    assert abs(cut[mixed].mean() - their_cut[their_mixed].mean()) < 0.04  # switch_prob
    assert ks_statistic(lam[mixed & ~cut], their_lam[their_mixed & ~their_cut]) < 0.05
    assert ks_statistic(lam[cut], their_lam[their_cut]) < 0.05
    # CutMix's corrected lambda is the share of the image outside the box.
    np.testing.assert_allclose(
        lam[cut], 1 - (box[cut, 2] - box[cut, 0]) * (box[cut, 3] - box[cut, 1]) / size ** 2)
    if minmax is not None:
        sides = np.concatenate([box[cut, 2] - box[cut, 0], box[cut, 3] - box[cut, 1]])
        assert sides.min() == int(0.2 * size) and sides.max() == int(0.8 * size) - 1


def test_draws_per_batch_pair_and_element():
    plan = lambda mode, n=10, batch=4: Mixing.create(**{  # noqa: E731
        **MIX, "cutmix_alpha": 1.0, "mixup_alpha": 1.0, "mixup_mode": mode}).plan(
        n, batch, 32, np.random.default_rng(1))
    batch = plan("batch")
    assert all(len(np.unique(batch.lam[k:k + 4])) == 1 for k in (0, 4))
    assert np.array_equal(batch.box[0], batch.box[3])
    pair = plan("pair")
    for start, length in ((0, 4), (4, 4), (8, 2)):  # the last batch: two samples
        lam = pair.lam[start:start + length]
        assert np.array_equal(lam, lam[::-1])  # an element and its partner: one draw
    assert len(np.unique(pair.lam[:2])) == 2
    elem = plan("elem", n=5, batch=5)
    assert len(np.unique(elem.lam[[0, 1, 3, 4]])) == 4
    assert elem.lam[2] == 1.0 and not elem.cut[2]  # its own partner: unmixed


def pool(store, rows, boxes, *, flip=None, size=1, mode="softmax"):
    return reference_label_pooling(store.values, store.indices, torch.tensor(boxes).float(),
                                   num_classes=NUM_CLASSES, output_size=size,
                                   flip=None if flip is None else torch.tensor(flip),
                                   sample_index=torch.tensor(rows), mode=mode).double()


def to_image(box, flip, u1, v1, u2, v2):
    """A rectangle of the output image as shown -> a box of the original image."""
    x1, y1, x2, y2 = box
    if flip:
        u1, u2 = 1 - u2, 1 - u1
    return [x1 + u1 * (x2 - x1), y1 + v1 * (y2 - y1), x1 + u2 * (x2 - x1), y1 + v2 * (y2 - y1)]


def expected_cutmix(store, batch, k, size, single):
    """Sample k's target after CutMix, token by token, recomputed from the boxes, flips,
    rows, partner and rectangle: the docstring of dali_relabel/mixing.py in plain code."""
    p = int(batch.partner[k])
    rect = batch.cut_box[k].double().tolist()
    boxes, flips = batch.boxes.double().tolist(), batch.flip.tolist()
    rows = batch.sample_index.tolist()
    kind = "argmax" if single else "softmax"
    own = pool(store, [rows[k]], [boxes[k]], flip=[flips[k]], size=size, mode=kind)[0]
    theirs = pool(store, [rows[p]], [boxes[p]], flip=[flips[p]], size=size, mode=kind)[0]
    tokens = []
    for t in range(size * size):
        r, c = divmod(t, size)
        cell = (c / size, r / size, (c + 1) / size, (r + 1) / size)
        inter = (max(cell[0], rect[0]), max(cell[1], rect[1]),
                 min(cell[2], rect[2]), min(cell[3], rect[3]))
        share = max(0.0, inter[2] - inter[0]) * max(0.0, inter[3] - inter[1]) * size * size
        if share < 1e-9 or share > 1 - 1e-9:
            tokens.append(own[t] if share < 0.5 else theirs[t])
            continue
        pasted = pool(store, [rows[p]], [to_image(boxes[p], flips[p], *inter)], mode=kind)[0]
        whole = pool(store, [rows[k]], [to_image(boxes[k], flips[k], *cell)], mode="logits")[0]
        covered = pool(store, [rows[k]], [to_image(boxes[k], flips[k], *inter)],
                       mode="logits")[0]
        remainder = (whole - share * covered) / (1 - share)
        base = (torch.nn.functional.one_hot(remainder.argmax(), NUM_CLASSES).double() if single
                else remainder.softmax(0))
        tokens.append((1 - share) * base + share * pasted)
    return torch.stack(tokens) if size > 1 else tokens[0]


@pytest.mark.parametrize("label_mode, size", [
    ("localized_multi", 1), ("localized_multi", 3), ("localized_single", 1),
    ("global_multi", 2), ("original", 1)])
def test_mixed_batch_equals_the_independent_recomputation(dataset, label_mode, size):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=11, return_meta=True, num_threads=2,
                  label_mode=label_mode, output_size=size)
    mixed_loader = ReLabelLoader(root, store_path, 10, mixup_alpha=1.0, cutmix_alpha=1.0,
                                 mixup_mode="elem", **kwargs)
    mixed = list(mixed_loader)
    plain = list(ReLabelLoader(root, store_path, 10, **kwargs))
    store = LabelMapStore.open(store_path, placement="memory")
    kinds = torch.cat([b.cutmix for b in mixed]), torch.cat([b.lam for b in mixed])
    assert kinds[0].any() and (~kinds[0] & (kinds[1] < 1)).any()  # both kinds appear
    for batch, base in zip(mixed, plain):
        assert torch.equal(batch.boxes, base.boxes) and torch.equal(batch.flip, base.flip)
        assert batch.partner.tolist() == list(range(9, -1, -1))
        for k in range(10):
            p, lam = int(batch.partner[k]), float(batch.lam[k])
            if batch.cutmix[k]:
                x1, y1, x2, y2 = (round(float(v) * 32) for v in batch.cut_box[k])
                assert lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / 32 ** 2)
                want = base.images[k].clone()
                want[:, y1:y2, x1:x2] = base.images[p][:, y1:y2, x1:x2]
                assert torch.equal(batch.images[k], want)
            else:
                assert batch.cut_box[k].eq(0).all()
                assert_close(batch.images[k], lam * base.images[k] + (1 - lam) * base.images[p])
            if batch.cutmix[k] and label_mode.startswith("localized"):
                want = expected_cutmix(store, batch, k, size, label_mode == "localized_single")
            else:  # by area: mixup, and CutMix where targets are not localized
                want = lam * base.targets[k].double() + (1 - lam) * base.targets[p].double()
            assert_close(batch.targets[k].double(), want, atol=2e-5, rtol=0)
        assert_close(batch.targets.sum(-1), torch.ones(batch.targets.shape[:-1]))


def test_host_gathered_store_mixes_as_the_fused_one(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=12, return_meta=True, num_threads=2,
                  cutmix_alpha=1.0, output_size=2, mixup_mode="pair")
    fused = list(ReLabelLoader(root, store_path, 10, fused_gather=True, **kwargs))
    gathered = list(ReLabelLoader(root, store_path, 10, fused_gather=False,
                                  labelmaps_placement="memory", **kwargs))
    for a, b in zip(fused, gathered, strict=True):
        assert_close(a.targets, b.targets, atol=0, rtol=0)


def test_localized_cutmix_targets_of_whole_and_half_pastes():
    values, indices = make_label_maps(10, 5, 20, seed=21)
    boxes = make_boxes(4, seed=22)
    flip = torch.tensor([True, False, False, False])  # not a palindrome: partners differ
    rows = torch.tensor([3, 7, 7, 1])
    partner = torch.arange(3, -1, -1)

    def targets(rect, single=False):
        return localized_cutmix_targets(
            values, indices, boxes=boxes, flip=flip, sample_index=rows,
            partner_boxes=boxes[partner], partner_flip=flip[partner],
            partner_index=rows[partner], rects=torch.tensor([rect] * 4), num_classes=20,
            single=single)

    # The whole image pasted: the base's share is zero, the target is the partner's crop.
    assert_close(targets([0.0, 0.0, 1.0, 1.0]),
                 label_pooling(values, indices, boxes[partner], num_classes=20,
                               sample_index=rows[partner]), atol=1e-6, rtol=0)
    # The left half of a mirrored crop is the right half of its box in the original image.
    x1, y1, x2, y2 = boxes[0]
    rect = [0.0, 0.25, 0.5, 0.75]
    assert_close(crop_to_image(boxes, flip, torch.tensor([rect] * 4))[0],
                 torch.stack([(x1 + x2) / 2, y1 + (y2 - y1) / 4, x2, y1 + 3 * (y2 - y1) / 4]))
    # The top quarter of a crop shown upside down is the bottom quarter of its box.
    top = torch.tensor([[0.0, 0.0, 1.0, 0.25]] * 4)
    upside_down = torch.tensor([True] * 4)
    assert_close(crop_to_image(boxes, flip, top, upside_down)[0],
                 torch.stack([x1, y1 + 3 * (y2 - y1) / 4, x2, y2]))
    assert_close(targets(rect).sum(1), torch.ones(4))
    single = targets(rect, single=True)
    assert_close(single.sum(1), torch.ones(4))
    assert set(single.unique().tolist()) <= {0.0, 0.25, 0.75, 1.0}


def test_mixing_keeps_dtype_and_layout_and_can_be_switched_off(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=13, num_threads=2, dtype=torch.bfloat16,
                  channels_last=True, mixup_alpha=0.8, cutmix_alpha=1.0, re_prob=0.5)
    loader = ReLabelLoader(root, store_path, 10, **kwargs)
    images, targets = next(iter(loader))
    assert images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert loader.mixup_enabled
    loader.mixup_enabled = False  # timm's switch for its --mixup-off-epoch
    _, unmixed = next(iter(loader))
    plain = ReLabelLoader(root, store_path, 10, **{**kwargs, "mixup_alpha": 0.0,
                                                    "cutmix_alpha": 0.0})
    plain.set_epoch(1)
    assert torch.equal(unmixed, next(iter(plain))[1])


def test_augmented_and_mixed_epochs_resume_exactly(dataset):
    """Everything random is planned per epoch: a resumed epoch repeats the draws."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=14, return_meta=True, num_threads=2,
                  color_jitter=(0.4, 0.4, 0.4, 0.1), lighting=0.1, re_prob=0.5,
                  re_mode="pixel", mixup_alpha=0.8, cutmix_alpha=1.0, mixup_mode="elem",
                  auto_augment="rand-m9-mstd0.5-inc1", force_color_jitter=True)
    full = list(ReLabelLoader(root, store_path, 6, **kwargs))
    resumed = ReLabelLoader(root, store_path, 6, **kwargs)
    resumed.load_state_dict({**resumed.state_dict(), "batches_done": 2})  # as after 2 steps
    for want, got in zip(full[2:], resumed, strict=True):
        assert torch.equal(want.images, got.images) and torch.equal(want.targets, got.targets)
        assert torch.equal(want.lam, got.lam) and torch.equal(want.cut_box, got.cut_box)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(mixup_alpha=-1.0), "mixup_alpha must be a finite float >= 0", id="alpha"),
    pytest.param(dict(mixup_prob=1.5), "mixup_prob must be a float in [0, 1]", id="prob"),
    pytest.param(dict(mixup_mode="sample"), "mixup_mode must be one of", id="mode"),
    pytest.param(dict(cutmix_minmax=(0.8, 0.2)), "cutmix_minmax must be (min, max)",
                 id="minmax-reversed"),
    pytest.param(dict(cutmix_minmax=(0.5, 0.51)), "leaving at least one box side",
                 id="minmax-empty"),
])
def test_bad_mixing_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        Mixing.create(**{**MIX, **kwargs})
    assert message in str(info.value)


def test_sparse_targets_are_not_mixed(dataset):
    root, store_path = dataset
    with pytest.raises(ValueError, match="sparse_targets=True cannot be mixed"):
        ReLabelLoader(root, store_path, 4, device="cpu", sparse_targets=True, cutmix_alpha=1.0)


# ---- label smoothing (timm's --smoothing, which its Mixup applies) ---------------------------

def test_label_smoothing_is_timms_mixup(dataset, monkeypatch):
    """One-hot targets ("original") mixed and smoothed as timm's Mixup does, on the loader's
    own parameters: its images and targets for mixup per batch, and timm's mixup_target for
    every batch of per-element mixup and CutMix, unmixed elements included."""
    from timm.data.mixup import Mixup, mixup_target
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=15, return_meta=True, num_threads=2,
                  label_mode="original")
    plain = list(ReLabelLoader(root, store_path, 10, **kwargs))
    mixed = list(ReLabelLoader(root, store_path, 10, mixup_alpha=1.0, label_smoothing=0.1,
                               **kwargs))
    for batch, base in zip(mixed, plain, strict=True):
        lam = float(batch.lam[0])
        timm_mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
        monkeypatch.setattr(timm_mixup, "_params_per_batch", lambda: (lam, False))
        images, targets = timm_mixup(base.images.clone(), base.labels)
        assert_close(batch.images, images)
        assert_close(batch.targets, targets, atol=1e-6, rtol=0)
    elem = list(ReLabelLoader(root, store_path, 10, mixup_alpha=1.0, cutmix_alpha=1.0,
                              mixup_prob=0.6, mixup_mode="elem", label_smoothing=0.1, **kwargs))
    lam = torch.cat([batch.lam for batch in elem])
    assert (lam == 1).any() and torch.cat([batch.cutmix for batch in elem]).any()
    for batch in elem:
        want = mixup_target(batch.labels, NUM_CLASSES, lam=batch.lam[:, None], smoothing=0.1)
        assert_close(batch.targets, want, atol=1e-6, rtol=0)


def smoothed(targets, eps=0.1):
    """The formula in float64: (1 - eps) * t + eps / C."""
    return (1 - eps) * targets.double() + eps / targets.shape[-1]


@pytest.mark.parametrize("label_mode, size", [
    ("localized_multi", 1), ("localized_multi", 3), ("localized_single", 1),
    ("global_multi", 2), ("global_single", 1), ("original", 1)])
def test_label_smoothing_of_unmixed_targets_is_the_formula(dataset, label_mode, size):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=16, num_threads=2, label_mode=label_mode,
                  output_size=size)
    plain = [targets for _, targets in ReLabelLoader(root, store_path, 10, **kwargs)]
    smooth = [targets for _, targets in ReLabelLoader(root, store_path, 10,
                                                      label_smoothing=0.1, **kwargs)]
    for want, got in zip(plain, smooth, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(got.double(), smoothed(want), atol=1e-7, rtol=0)
        assert_close(got.sum(-1), torch.ones(got.shape[:-1]))


def test_label_smoothing_stays_when_mixing_is_switched_off(dataset):
    """timm's Mixup smooths with mixup_enabled False too (--mixup-off-epoch)."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=17, num_threads=2)
    loader = ReLabelLoader(root, store_path, 10, cutmix_alpha=1.0, label_smoothing=0.2,
                           **kwargs)
    loader.mixup_enabled = False
    _, unmixed = next(iter(loader))
    _, plain = next(iter(ReLabelLoader(root, store_path, 10, **kwargs)))
    assert_close(unmixed.double(), smoothed(plain, 0.2), atol=1e-7, rtol=0)


@pytest.mark.parametrize("label_mode", ["localized_multi", "localized_single", "original"])
def test_label_smoothing_of_sparse_targets_is_exact(dataset, label_mode):
    """SparseTargets stay sparse: the fill and the listed probabilities are smoothed alike,
    so the dense form is the formula's and the sparse loss the dense one's."""
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=18, num_threads=2, output_size=3,
                  sparse_targets=True, label_mode=label_mode)
    _, plain = next(iter(ReLabelLoader(root, store_path, 10, **kwargs)))
    _, smooth = next(iter(ReLabelLoader(root, store_path, 10, label_smoothing=0.1, **kwargs)))
    assert isinstance(smooth, SparseTargets) and torch.equal(smooth.classes, plain.classes)
    assert_close(smooth.dense().double(), smoothed(plain.dense()), atol=1e-7, rtol=0)
    assert (smooth.probs[smooth.classes < 0] == 0).all()  # unused slots stay empty
    logits = torch.randn(smooth.shape, dtype=torch.float64)
    assert_close(soft_target_cross_entropy(logits, smooth),
                 soft_target_cross_entropy(logits, smooth.dense()))
    assert smooth_targets(plain, 0.0) is plain


@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1", None])
def test_bad_label_smoothing_is_refused(dataset, value):
    root, store_path = dataset
    with pytest.raises(ValueError, match=r"label_smoothing must be a float in \[0, 1\), got"):
        ReLabelLoader(root, store_path, 4, device="cpu", label_smoothing=value)
