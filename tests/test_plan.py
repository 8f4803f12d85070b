"""The epoch plan against torchvision's RandomResizedCrop.get_params, and its bookkeeping."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from dali_relabel.loading.plan import EpochPlanner, random_resized_crop_windows

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
DRAWS = 6000


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def torchvision_windows(height: int, width: int, count: int) -> np.ndarray:
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    return np.array([RandomResizedCrop.get_params(image, list(SCALE), list(RATIO))
                     for _ in range(count)], dtype=np.float64)


def centre_fallback(height: int, width: int) -> tuple:
    """torchvision's window when no attempt fits: the centre crop, ratio clamped."""
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        w, h = int(round(height * max(RATIO))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width", [
    pytest.param(375, 500, id="imagenet-landscape"),
    pytest.param(500, 333, id="portrait"),
    pytest.param(64, 64, id="small-square"),
    pytest.param(90, 1000, id="panorama-mostly-falls-back"),
    pytest.param(1000, 60, id="tall-strip-mostly-falls-back"),
])
def test_windows_follow_torchvision_distribution(height, width):
    ours = random_resized_crop_windows(np.tile([[height, width]], (DRAWS, 1)), SCALE, RATIO,
                                       np.random.default_rng(1)).astype(np.float64)
    theirs = torchvision_windows(height, width, DRAWS)
    fallback = np.array(centre_fallback(height, width), dtype=np.float64)

    def features(windows):
        y, x, h, w = windows.T
        return {"area": h * w / (height * width), "aspect": w / h,
                "centre_x": (x + w / 2) / width, "centre_y": (y + h / 2) / height}

    # 2-sample KS at a 0.1% level: c(alpha) sqrt((n + m) / (n m)).
    critical = 1.95 * math.sqrt(2 / DRAWS)
    ours_features, their_features = features(ours), features(theirs)
    for name, values in ours_features.items():
        assert ks_statistic(values, their_features[name]) < critical, name
    rate_ours = np.all(ours == fallback, axis=1).mean()
    rate_theirs = np.all(theirs == fallback, axis=1).mean()
    assert abs(rate_ours - rate_theirs) < 4 * math.sqrt(rate_theirs * (1 - rate_theirs) / DRAWS
                                                        * 2) + 1e-9
    # Every window lies in the image and is whole pixels.
    y, x, h, w = ours.T
    assert (y >= 0).all() and (x >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (y + h <= height).all() and (x + w <= width).all()


def test_a_wrong_rule_is_detected():
    """The distribution test has the power to see a plausible mistake: aspect ratios drawn
    uniformly instead of log-uniformly."""
    height, width = 375, 500
    theirs = torchvision_windows(height, width, DRAWS)
    rng = np.random.default_rng(1)
    aspect = rng.uniform(*RATIO, size=4 * DRAWS)
    area = rng.uniform(*SCALE, size=4 * DRAWS) * height * width
    w, h = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    fits = (w <= width) & (h <= height)
    assert ks_statistic(w[fits][:DRAWS] / h[fits][:DRAWS], theirs[:, 3] / theirs[:, 2]) > (
        1.95 * math.sqrt(2 / DRAWS))


def planner(sizes, **kwargs):
    args = dict(batch_size=4, seed=3, shuffle=True, shard_id=0, num_shards=1, drop_last=True,
                scale=SCALE, ratio=RATIO, hflip=0.5)
    return EpochPlanner(sizes, np.arange(len(sizes)), **{**args, **kwargs})


def test_plan_is_deterministic_and_shards_share_one_order():
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 400, size=(103, 2)).astype(np.int32)
    shards = [planner(sizes, shard_id=r, num_shards=3).plan(2) for r in range(3)]
    rows = np.concatenate([plan.rows for plan in shards])
    assert len(np.unique(rows)) == len(rows) == 3 * (103 // 3 // 4 * 4)
    again = planner(sizes, shard_id=1, num_shards=3).plan(2)
    for field in ("rows", "windows", "flips", "boxes"):
        assert np.array_equal(getattr(again, field), getattr(shards[1], field)), field
    # Another epoch: another order and other windows; the global order is shared by ranks.
    other = planner(sizes, shard_id=1, num_shards=3).plan(3)
    assert not np.array_equal(other.rows, shards[1].rows)
    whole = np.random.default_rng([3, 2]).permutation(103)
    assert np.array_equal(shards[2].rows, whole[2::3][:len(shards[2].rows)])


def test_boxes_are_the_windows_normalized_and_skip_resumes():
    sizes = np.array([[100, 200], [300, 150], [64, 64], [480, 640]] * 5, dtype=np.int32)
    plan = planner(sizes, hflip=1.0).plan(0)
    y, x, h, w = plan.windows.T.astype(np.float64)
    height, width = sizes[plan.rows].T.astype(np.float64)
    np.testing.assert_allclose(plan.boxes, np.stack(
        [x / width, y / height, (x + w) / width, (y + h) / height], axis=1), rtol=1e-6)
    assert plan.flips.all() and not planner(sizes, hflip=0.0).plan(0).flips.any()
    rest = plan.skip(2)
    assert np.array_equal(rest.rows, plan.rows[8:]) and len(rest) == len(plan) - 2
    assert np.array_equal(rest.windows[rest.batch(0)], plan.windows[plan.batch(2)])


def test_drop_last_false_covers_every_sample_once():
    sizes = np.full((10, 2), 100, dtype=np.int32)
    plans = [planner(sizes, shard_id=r, num_shards=3, drop_last=False).plan(0)
             for r in range(3)]
    assert sorted(np.concatenate([p.rows for p in plans]).tolist()) == list(range(10))
    assert [len(p) for p in plans] == [1, 1, 1] and len(plans[0].rows) == 4
