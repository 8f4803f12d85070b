"""The loader's augmentations against torchvision's and timm's: colour jitter, PCA lighting,
auto-augment policies (real CPU DALI graphs) and random erasing."""
import collections
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from nvidia.dali import fn, pipeline_def
from PIL import Image

from dali_relabel.augment import (Augmentations, auto_augment, color, parse_auto_augment,
                                  parse_color_jitter, random_erase, random_erasing)
from dali_relabel.augment.color import LIGHTING_EIGVAL, LIGHTING_EIGVEC
from dali_relabel import ReLabelLoader
from jpeg_data import RAW, make_jpeg_dataset, pil_crop, textured_image

OFF = dict(color_jitter=None, force_color_jitter=False, lighting=0.0, auto_augment=None,
           re_prob=0.0, re_mode="const", re_count=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_jpeg_dataset(tmp_path_factory.mktemp("augment"))


def run_graph(graph, images, *params):
    """graph(images, *params) in a CPU DALI pipeline (conditionals on) over uint8 HWC
    images and per-sample parameter arrays; the outputs as numpy arrays."""
    def constant(batch):
        return lambda: batch

    sources = [constant(list(batch)) for batch in (images, *params)]

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None,
                  enable_conditionals=True)
    def pipe():
        data, *inputs = (fn.external_source(source=source) for source in sources)
        return graph(fn.reshape(data, layout="HWC"), *inputs)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[k]) for k in range(len(images))]


def sample_images(count, size=24, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(textured_image(rng, size, size)) for _ in range(count)]


# ---- colour jitter -------------------------------------------------------------------------

def torchvision_jitter(image, blend, hue):
    """torchvision's functional ops in the planned order, on a float tensor in [0, 1]."""
    x = torch.tensor(image).permute(2, 0, 1).float() / 255
    for p in range(blend.shape[0]):
        if hue[p] != 0:
            x = TF.adjust_hue(x, float(hue[p]))
        elif blend[p, 1]:
            x = TF.adjust_contrast(x, float(blend[p, 0]))
        elif blend[p, 2]:
            x = TF.adjust_saturation(x, float(blend[p, 0]))
        else:
            x = TF.adjust_brightness(x, float(blend[p, 0]))
    return x.permute(1, 2, 0).numpy() * 255


def test_color_jitter_equals_torchvision_in_the_planned_order():
    ranges = parse_color_jitter((0.4, 0.4, 0.4, 0.2))
    images = sample_images(12)
    plan = color.plan_color_jitter(ranges, len(images), np.random.default_rng(1))
    blend, hue = plan["jitter_blend"], plan["jitter_hue"]
    # Every sample has the four operations, in one of the orders.
    assert blend.shape == (12, 4, 3) and len({tuple(np.argmax(
        np.c_[hue[k, :, None] != 0, blend[k, :, 1:]], axis=1)) for k in range(12)}) > 3
    got = run_graph(lambda x, b, h: color.color_jitter_graph(x, b, h, ranges), images, blend, hue)
    for k, image in enumerate(images):
        want = torchvision_jitter(image, blend[k], hue[k])
        # float arithmetic of the same formulas (torchvision's grey uses 0.2989 for red)
        assert np.abs(got[k] - want).max() < 0.1, k


def test_color_jitter_plan_draws_torchvision_factors_and_orders():
    ranges = parse_color_jitter(0.4)
    assert ranges == ((0.6, 1.4),) * 3 + (None,)
    plan = color.plan_color_jitter(ranges, 30000, np.random.default_rng(2))
    blend = plan["jitter_blend"]
    assert "jitter_hue" not in plan
    factors = blend[..., 0]
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert abs(factors.mean() - 1.0) < 0.01 and abs(factors.std() - 0.8 / math.sqrt(12)) < 0.01
    # A uniform random order: each operation at each position a third of the time.
    contrast_at = blend[..., 1].mean(axis=0)
    saturation_at = blend[..., 2].mean(axis=0)
    assert np.abs(contrast_at - 1 / 3).max() < 0.015 and np.abs(saturation_at - 1 / 3).max() < 0.015
    assert parse_color_jitter((0, (1.2, 1.2), 0)) == (None, (1.2, 1.2), None, None)
    assert parse_color_jitter(0.0) is None


@pytest.mark.parametrize("value, message", [
    pytest.param(-0.1, "brightness must be >= 0", id="negative"),
    pytest.param((0.4, 0.4), "color_jitter must be a float or", id="two-values"),
    pytest.param((0.4, 0.4, 0.4, 0.6), "hue must be [0, 0.5]", id="hue-too-large"),
    pytest.param((0.4, (1.5, 1.2), 0.4), "contrast must be a float or a (min, max)",
                 id="reversed-range"),
    pytest.param("0.4", "color_jitter must be a float or", id="string"),
])
def test_bad_color_jitter_is_refused(value, message):
    with pytest.raises(ValueError) as info:
        parse_color_jitter(value)
    assert message in str(info.value)


def test_loader_brightness_equals_torchvision_on_the_same_crop(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=40, seed=4, return_meta=True, num_threads=2, **RAW)
    loader = ReLabelLoader(root, store_path, 10, **kwargs)
    plain = next(iter(loader))
    bright = next(iter(ReLabelLoader(root, store_path, 10, color_jitter=((1.2, 1.2), 0, 0),
                                     **kwargs)))
    assert torch.equal(plain.boxes, bright.boxes) and torch.equal(plain.targets, bright.targets)
    for k in range(10):
        path = f"{root}/{loader.store.paths[plain.sample_index[k]]}"
        crop = pil_crop(path, plain.boxes[k].numpy(), 40, bool(plain.flip[k]))
        want = TF.adjust_brightness(torch.from_numpy(crop).permute(2, 0, 1) / 255, 1.2) * 255
        # PIL's crop against DALI's: the resampling filters, as for unjittered crops
        assert (bright.images[k] - want).abs().mean() < 1.2
        # and exactly torchvision's definition on DALI's own crop
        assert (bright.images[k] - (plain.images[k] * 1.2).clamp(0, 255)).abs().max() < 1e-3


# ---- lighting ------------------------------------------------------------------------------

def official_lighting(alphastd: float, count: int) -> np.ndarray:
    """The official ReLabel / fb.resnet.torch Lighting, applied to `count` black images
    (0-1 scale): the offsets it adds."""
    eigval, eigvec = torch.tensor(LIGHTING_EIGVAL), torch.tensor(LIGHTING_EIGVEC)
    torch.manual_seed(0)
    offsets = []
    for _ in range(count):
        alpha = torch.zeros(3).normal_(0, alphastd)
        rgb = eigvec.clone().mul(alpha.view(1, 3).expand(3, 3)).mul(
            eigval.view(1, 3).expand(3, 3)).sum(1).squeeze()
        offsets.append((torch.zeros(3, 2, 2) + rgb.view(3, 1, 1))[:, 0, 0])
    return torch.stack(offsets).numpy()


def test_lighting_offsets_have_the_official_distribution():
    aug = Augmentations.create(**{**OFF, "lighting": 0.1})
    ours = aug.plan(20000, 32, np.random.default_rng(3)).lighting / 255.0
    theirs = official_lighting(0.1, 4000)
    eigvec, eigval = np.asarray(LIGHTING_EIGVEC), np.asarray(LIGHTING_EIGVAL)
    covariance = eigvec @ np.diag((0.1 * eigval) ** 2) @ eigvec.T
    assert np.abs(ours.mean(axis=0)).max() < 3e-4
    assert np.allclose(np.cov(ours.T), covariance, atol=2e-5, rtol=0.05)
    assert np.allclose(np.cov(theirs.T), covariance, atol=2e-5, rtol=0.1)


def test_loader_lighting_adds_one_offset_per_image(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=5, return_meta=True, num_threads=2, **RAW)
    plain = next(iter(ReLabelLoader(root, store_path, 10, **kwargs)))
    lit = next(iter(ReLabelLoader(root, store_path, 10, lighting=0.1, **kwargs)))
    offset = (lit.images - plain.images).flatten(2)  # [B, 3, pixels]
    assert offset.std(dim=2).max() < 1e-3  # a constant per image and channel, not clamped
    assert 0.5 < offset.mean(dim=2).abs().max() < 60
    assert torch.equal(plain.targets, lit.targets)


# ---- auto-augment --------------------------------------------------------------------------

@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.8-mstd101",
                                    "rand-m5-n1-mmax15-inc0", "rand-m9-n2-tweights-mstd0.5"])
def test_rand_augment_parses_as_timm(config):
    from timm.data.auto_augment import rand_augment_transform
    theirs = rand_augment_transform(config, {})
    ours = parse_auto_augment(config)
    (ops,) = ours.sub_policies
    assert ours.kind == "rand" and ours.layers == theirs.num_layers
    assert [op.name for op in ops] == [op.name for op in theirs.ops]
    assert [op.prob for op in ops] == [op.prob for op in theirs.ops]
    assert [op.magnitude for op in ops] == [op.magnitude for op in theirs.ops]
    assert ours.magnitude_std == theirs.ops[0].magnitude_std
    assert ours.magnitude_max == (theirs.ops[0].magnitude_max or 10)
    if theirs.choice_weights is None:
        assert ours.weights is None
    else:
        np.testing.assert_allclose(ours.weights, theirs.choice_weights)


@pytest.mark.parametrize("config", ["original", "originalr", "v0", "v0r-mstd0.5"])
def test_auto_augment_policies_are_timms(config):
    from timm.data.auto_augment import auto_augment_transform
    theirs = auto_augment_transform(config, {}).policy
    ours = parse_auto_augment(config)
    assert ours.kind == "auto" and ours.layers == 2
    assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in ours.sub_policies] == [
        [(op.name, op.prob, op.magnitude) for op in sub] for sub in theirs]
    assert ours.magnitude_std == theirs[0][0].magnitude_std


@pytest.mark.parametrize("config, message", [
    pytest.param("rand-m9-foo", "unknown section 'foo'", id="unknown-section"),
    pytest.param("rand-m9.5", "m needs a number of type int", id="fractional-m"),
    pytest.param("rand-t3a", "transform set '3a' is not supported", id="3a-set"),
    pytest.param("rand-n0", "n must be >= 1", id="no-layers"),
    pytest.param("augmix-m5-w4-d2", "AugMix is not supported", id="augmix"),
    pytest.param("augmix", "supported: timm's 'rand-...'", id="torchvision-augmix"),
    pytest.param("ra-m9", "unknown policy", id="ra-with-sections"),
    pytest.param("imagenet-mstd0.5", "unknown policy", id="imagenet-with-sections"),
    pytest.param("original-x2", "unknown section 'x2'", id="aa-section"),
    pytest.param("ta_wide-m3", "unknown policy", id="ta-with-sections"),
    pytest.param("", "auto_augment must be a policy string", id="empty"),
])
def test_bad_auto_augment_is_refused(config, message):
    with pytest.raises(ValueError) as info:
        parse_auto_augment(config)
    assert message in str(info.value)


@pytest.mark.parametrize("name", sorted(auto_augment._TIMM_OPS))
def test_levels_map_to_timms_arguments(name, monkeypatch):
    """Each operation's parameter at a level (either sign) is timm's LEVEL_TO_ARG."""
    from timm.data import auto_augment as timm_aa
    _, negated, to_param = auto_augment._TIMM_OPS[name]
    if to_param is None:
        assert timm_aa.LEVEL_TO_ARG[name] is None
        return
    hparams = dict(translate_pct=0.45)
    for level in (0.0, 3.3, 9.0, 10.0):
        for negate in (False, True):
            monkeypatch.setattr(random, "random", lambda: 1.0 if negate else 0.0)
            (theirs,) = timm_aa.LEVEL_TO_ARG[name](level, hparams)
            signed = -level if negate and negated else level
            ours = float(to_param(np.array([signed]))[0])
            if name in auto_augment._RANDOM_PARAMS:  # the radius is drawn from timm's arg
                radius = auto_augment._RANDOM_PARAMS[name](
                    np.full(20000, ours), np.random.default_rng(0))
                low, high = sorted((0.1, 2.0 * theirs))
                assert low <= radius.min() and radius.max() <= high
            if name.startswith("Posterize"):
                theirs = float(auto_augment._bits_mask(np.array([theirs]))[0])
            assert ours == pytest.approx(theirs, abs=1e-6), (level, negate)


def pil_op(name, image, value):
    """timm's PIL operation at a parameter value (as LEVEL_TO_ARG returns it)."""
    from timm.data import auto_augment as timm_aa
    kwargs = dict(fillcolor=(128, 128, 128), resample=Image.BILINEAR)
    if name.startswith("Posterize"):
        value = 8 - int(np.log2(256 - value)) if value < 255 else 8  # the mask back to bits
    op = timm_aa.NAME_TO_OP[name]
    return np.asarray(op(image, value, **kwargs) if value is not None else op(image, **kwargs))


def test_policy_operations_act_as_timms():
    """Each operation in the DALI graph against timm's PIL operation on the same image:
    equal to the rounding for the pointwise ones, close up to the sign convention for the
    geometric ones (the random sign makes the convention irrelevant); each changes pixels."""
    from timm.data import auto_augment as timm_aa
    names = sorted(auto_augment._TIMM_OPS)
    policy = auto_augment.AutoAugmentPolicy(
        config="test", kind="rand", names=tuple(names), layers=1,
        sub_policies=(tuple(auto_augment._PolicyOp(n, 1.0, 7.0) for n in names),), weights=None,
        magnitude_std=0.0, magnitude_max=10.0)
    blocks = (np.random.default_rng(7).random((10, 10, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((40, 40), Image.BICUBIC))  # 4-pixel detail
    image = (30 + 0.7 * image).astype(np.uint8)  # short of black and white: autocontrast acts
    params = np.array([auto_augment._TIMM_OPS[n][2](np.array([7.0]))[0]
                       if auto_augment._TIMM_OPS[n][2] else 0.0 for n in names], np.float32)
    # GaussianBlurRand's radius is drawn from its argument; here the argument's largest.
    blur = names.index("GaussianBlurRand")
    params[blur] = 2.0 * params[blur]
    count = len(names)
    images = [image] * (2 * count)
    ops = [np.array([k % count], np.int32) for k in range(2 * count)]
    # The second copy of each operation runs with the opposite sign where timm negates.
    signs = [1.0] * count + [-1.0 if auto_augment._TIMM_OPS[n][1] else 1.0 for n in names]
    signed = [np.array([sign * params[k % count]], np.float32) for k, sign in enumerate(signs)]
    out = run_graph(lambda x, o, p: auto_augment.auto_augment_graph(x, o, p, policy, 40, 128),
                    images, ops, signed)
    pil = Image.fromarray(image)
    for k, name in enumerate(names):
        kind, negated, to_param = auto_augment._TIMM_OPS[name]
        value = None if to_param is None else float(params[k])
        if name == "GaussianBlurRand":  # timm draws the radius inside; PIL's blur at it
            want = np.asarray(timm_aa.gaussian_blur(pil, value)).astype(np.float32)
        else:
            want = pil_op(name, pil, value).astype(np.float32)
        got = out[k].astype(np.float32)
        assert np.abs(got - image).mean() > 1.0, name  # it does something
        diff = np.abs(got - want)[2:-2, 2:-2].mean()  # PIL leaves the border of filters
        if negated and kind in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
            diff = min(diff, np.abs(out[k + count].astype(np.float32) - want)[2:-2, 2:-2].mean())
        # Measured: 0 for the bit operations, ~0.5 (rounding; DALI's YIQ saturation and
        # float mean grey against PIL's integer grey) for the enhancements, ~0.8 for the
        # warps (interpolation), ~4.7 for equalize (DALI follows OpenCV's formula, PIL not).
        tolerance = {"Equalize": 8.0, "Rotate": 1.5, "ShearX": 1.5, "ShearY": 1.5,
                     "TranslateXRel": 1.5, "TranslateYRel": 1.5}.get(name, 1.0)
        assert diff < tolerance, (name, diff)


def test_policy_plans_follow_timm_and_torchvision():
    rng = np.random.default_rng(8)
    rand = parse_auto_augment("rand-m9-n2-mstd0.5-inc1")
    plan = rand.plan(20000, rng, 224)
    ops, params = plan["aug_ops"], plan["aug_params"]
    identity = len(rand.names)
    assert ops.shape == (20000, 2) and abs((ops == identity).mean() - 0.5) < 0.01  # p = 0.5
    rotations = params[ops == rand.names.index("Rotate")]
    assert abs(np.mean(rotations < 0) - 0.5) < 0.05  # random sign
    assert abs(np.abs(rotations).mean() - 27.0) < 0.5  # level 9 +- 0.5 -> 27 degrees +- 1.5
    assert 24 < np.abs(rotations).std() * 100 / 1.5 < 110
    counts = np.bincount(ops[ops < identity], minlength=identity)
    assert counts.min() > 0.8 * counts.mean()  # uniform, with replacement
    auto = parse_auto_augment("original").plan(5000, rng, 224)
    assert auto["aug_ops"].shape == (5000, 2)
    trivial = parse_auto_augment("ta_wide")
    plan = trivial.plan(20000, rng, 224)
    assert plan["aug_ops"].max() == len(trivial.names) - 1
    rotations = plan["aug_params"][plan["aug_ops"] == trivial.names.index("Rotate")]
    assert np.abs(rotations).max() <= 135 and abs(np.abs(rotations).mean() - 67.5) < 3


# torchvision's policies: "ra", "ta_wide", "imagenet" (and "cifar10", "svhn")

TV_CLASSES = {"ra": ("RandAugment", 31, False), "ta_wide": ("TrivialAugmentWide", 31, True),
              "imagenet": ("AutoAugment", 10, False)}


def torchvision_transform(config, magnitude=9):
    from torchvision.transforms import autoaugment as tv_aa
    if config == "ra":
        return tv_aa.RandAugment(magnitude=magnitude)
    if config == "ta_wide":
        return tv_aa.TrivialAugmentWide()
    return tv_aa.AutoAugment(tv_aa.AutoAugmentPolicy(config))


def torchvision_space(config, size):
    """torchvision's own _augmentation_space of the policy: name -> magnitudes per bin."""
    _, bins, _ = TV_CLASSES[config]
    transform = torchvision_transform(config)
    space = (transform._augmentation_space(bins) if config == "ta_wide"
             else transform._augmentation_space(bins, (size, size)))
    return {name: magnitudes for name, (magnitudes, _) in space.items()}


@pytest.mark.parametrize("config", ["ra", "ta_wide", "imagenet", "cifar10", "svhn"])
def test_torchvision_policies_parse_as_torchvisions(config):
    policy = parse_auto_augment(config)
    assert policy.library == "torchvision" and policy.magnitude_std == 0
    if config in ("ra", "ta_wide"):
        assert policy.names == tuple(torchvision_space(config, 224))  # op set and order
        assert policy.layers == (2 if config == "ra" else 1)
        assert policy.magnitude_max == 30
        if config == "ra":  # num_ops=2, every operation applied at bin `magnitude`
            (ops,) = parse_auto_augment("ra", ra_magnitude=13).sub_policies
            assert {(op.prob, op.magnitude) for op in ops} == {(1.0, 13.0)}
        return
    theirs = torchvision_transform(config).policies
    assert policy.kind == "auto" and policy.layers == 2 and policy.magnitude_max == 9
    assert [[(op.name, op.prob, op.magnitude) for op in sub] for sub in policy.sub_policies] == [
        [(name, prob, float(bin_ or 0)) for name, prob, bin_ in sub] for sub in theirs]
    assert set(policy.names) <= set(torchvision_space("imagenet", 224))


@pytest.mark.parametrize("config", ["ra", "ta_wide", "imagenet"])
@pytest.mark.parametrize("size", [64, 224])
def test_torchvision_magnitudes_are_torchvisions(config, size):
    _, bins, wide = TV_CLASSES[config]
    ours = auto_augment._tv_magnitudes(bins, size, wide)
    theirs = torchvision_space(config, size)
    for name, magnitudes in theirs.items():
        if magnitudes.ndim == 0:  # no magnitude
            assert name not in ours, name
        else:
            assert np.array_equal(ours[name], magnitudes.double().numpy()), name


def torchvision_draws(config, count, size, monkeypatch, magnitude=9):
    """(layer, operation, argument) of every operation torchvision's transform applies to
    `count` images, its _apply_op recorded instead of run; the argument as the DALI
    operation takes it (auto_augment._tv_params); a skipped AutoAugment operation is None."""
    from torchvision.transforms import autoaugment as tv_aa
    calls = []
    monkeypatch.setattr(tv_aa, "_apply_op", lambda img, name, m, **_: calls.append(
        (name, m)) or img)
    transform = torchvision_transform(config, magnitude)
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    torch.manual_seed(0)
    get_params = tv_aa.AutoAugment.get_params
    draws = []
    for _ in range(count):
        calls.clear()
        if config == "imagenet":  # which of the sub-policy's two operations run
            policy_id, probs, signs = get_params(len(transform.policies))
            monkeypatch.setattr(tv_aa.AutoAugment, "get_params",
                                staticmethod(lambda n: (policy_id, probs, signs)))
            transform(image)
            sub = transform.policies[policy_id]
            applied = iter(calls)
            calls[:] = [next(applied) if probs[i] <= sub[i][1] else None for i in range(2)]
        else:
            transform(image)
        for layer, call in enumerate(calls):
            if call is None:
                draws.append((layer, None, 0.0))
            else:
                name, m = call
                value = float(auto_augment._tv_params(name, np.array([m]))[0])
                draws.append((layer, name, round(value, 3)))
    return draws


def our_draws(config, count, size, magnitude=9):
    policy = parse_auto_augment(config, ra_magnitude=magnitude)
    plan = policy.plan(count, np.random.default_rng(0), size)
    names = policy.names + (None,)
    return [(layer, names[op], round(float(param), 3) if names[op] else 0.0)
            for ops, params in zip(plan["aug_ops"], plan["aug_params"])
            for layer, (op, param) in enumerate(zip(ops, params))]


def total_variation(a, b):
    """Total variation distance between the empirical distributions of two samples."""
    count_a, count_b = collections.Counter(a), collections.Counter(b)
    return 0.5 * sum(abs(count_a[k] / len(a) - count_b[k] / len(b))
                     for k in set(count_a) | set(count_b))


@pytest.mark.parametrize("config, magnitude, size", [
    ("ra", 9, 224), ("ra", 27, 64), ("imagenet", 9, 224), ("ta_wide", 9, 224)])
def test_torchvision_policy_draws_follow_torchvision(config, magnitude, size, monkeypatch):
    """The planned (operation, argument) per layer is distributed as torchvision's own
    transform draws them (its _apply_op recorded): the same values, the same frequencies."""
    count = 20000 if config == "ta_wide" else 6000
    theirs = torchvision_draws(config, count, size, monkeypatch, magnitude)
    ours = our_draws(config, count, size, magnitude)
    if config == "ta_wide":  # 14 operations x 31 bins x sign: ~23 draws of each value
        assert {d[1:] for d in ours} == {d[1:] for d in theirs}  # every value, both ways
        assert total_variation([d[1] for d in ours], [d[1] for d in theirs]) < 0.03
        return
    # Each value appears in both, at the same frequency (sampling noise: about 0.02).
    assert set(ours) == set(theirs)
    assert total_variation(ours, theirs) < 0.05


def test_torchvision_policies_fill_black_and_timms_grey():
    mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    for config in ("ra", "ta_wide", "imagenet"):
        assert parse_auto_augment(config).fill_value(mean) == 0  # torchvision's fill=None
    assert parse_auto_augment("rand-m9").fill_value(mean) == 114  # timm's mean grey


def test_policy_operations_act_as_torchvisions():
    """Each operation of torchvision's policies in the DALI graph against torchvision's
    _apply_op on the same PIL image (bilinear, fill=None: black) at a strong magnitude (bin
    24 of 31 of RandAugment's space at 40 px): equal to the rounding for the pointwise ones,
    close for the warps with one of the two signs (the sign is random)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import autoaugment as tv_aa
    names = tuple(auto_augment._TV_OPS)
    policy = auto_augment.AutoAugmentPolicy(
        config="test", kind="rand", names=names, layers=1,
        sub_policies=(tuple(auto_augment._PolicyOp(n, 1.0, 24.0) for n in names),), weights=None,
        magnitude_std=0.0, magnitude_max=30.0, library="torchvision")
    space = auto_augment._tv_magnitudes(31, 40, wide=False)
    magnitudes = [float(space[n][24]) if n in space else 0.0 for n in names]
    blocks = (np.random.default_rng(7).random((10, 10, 3)) * 255).astype(np.uint8)
    image = np.asarray(Image.fromarray(blocks).resize((40, 40), Image.BICUBIC))
    image = (30 + 0.7 * image).astype(np.uint8)  # short of black and white: autocontrast acts
    count = len(names)
    signs = [1.0] * count + [-1.0 if auto_augment._TV_OPS[n][1] else 1.0 for n in names]
    ops = [np.array([k % count], np.int32) for k in range(2 * count)]
    params = [auto_augment._tv_params(names[k % count], np.array([sign * magnitudes[k % count]]))
              .astype(np.float32) for k, sign in enumerate(signs)]
    out = run_graph(lambda x, o, p: auto_augment.auto_augment_graph(x, o, p, policy, 40, 0),
                    [image] * (2 * count), ops, params)
    pil = Image.fromarray(image)
    for k, name in enumerate(names):
        want = np.asarray(tv_aa._apply_op(pil, name, magnitudes[k],
                                          interpolation=InterpolationMode.BILINEAR, fill=None))
        got = [out[k].astype(np.float32), out[k + count].astype(np.float32)]
        diff = min(np.abs(g - want)[2:-2, 2:-2].mean() for g in got)
        if name != "Identity":
            assert np.abs(got[0] - image).mean() > 1.0, name  # it does something
        # Measured: 0 for identity, the bit operations and the whole-pixel translations,
        # <= 0.5 for the enhancements and autocontrast (rounding, DALI's saturation), 1.2 for
        # the shears (with the other sign: the conventions differ) and 1.4 for the rotation
        # (interpolation), 4.7 for equalize (OpenCV's formula, PIL's not).
        tolerance = {"Equalize": 8.0, "Rotate": 1.5, "ShearX": 1.5, "ShearY": 1.5}.get(name, 1.0)
        assert diff < tolerance, (name, diff)


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "original", "3a", "ta_wide", "ra",
                                    "imagenet"])
def test_loader_auto_augment_changes_pixels_not_targets(dataset, config):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=6, return_meta=True, num_threads=2)
    plain = next(iter(ReLabelLoader(root, store_path, 10, **kwargs)))
    loader = ReLabelLoader(root, store_path, 10, auto_augment=config, **kwargs)
    augmented = next(iter(loader))
    assert torch.equal(plain.targets, augmented.targets)
    changed = (plain.images - augmented.images).abs().flatten(1).mean(1) > 0.01
    assert changed.sum() >= 3
    again = next(iter(ReLabelLoader(root, store_path, 10, auto_augment=config, **kwargs)))
    assert torch.equal(augmented.images, again.images)  # planned: the same seed, the same


def test_auto_augment_replaces_color_jitter_unless_forced():
    aug = Augmentations.create(**{**OFF, "color_jitter": 0.4, "auto_augment": "ta_wide"})
    assert aug.color_jitter is None
    aug = Augmentations.create(**{**OFF, "color_jitter": 0.4, "auto_augment": "ta_wide",
                                  "force_color_jitter": True})
    assert aug.color_jitter is not None


# ---- random erasing ------------------------------------------------------------------------

def timm_erased_fractions(count, size, prob, max_count):
    from timm.data.random_erasing import RandomErasing
    random.seed(0)
    eraser = RandomErasing(prob, mode="const", max_count=max_count, device="cpu")
    fractions = []
    for _ in range(count):
        image = torch.ones(1, 3, size, size)
        eraser(image)
        fractions.append(float((image[0, 0] == 0).float().mean()))
    return np.array(fractions)


def ks_statistic(a, b):
    grid = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), grid, side="right") / len(a)
                  - np.searchsorted(np.sort(b), grid, side="right") / len(b)).max()


@pytest.mark.parametrize("max_count", [1, 3])
def test_erased_area_is_distributed_as_timms(max_count):
    count, size = 3000, 32
    boxes = random_erasing.plan_erasing(count, size, 0.5, max_count, np.random.default_rng(9))
    images = torch.ones(count, 1, size, size)
    ours = random_erase(images, boxes, "const", 0)[:, 0].eq(0).float().mean((1, 2)).numpy()
    theirs = timm_erased_fractions(count, size, 0.5, max_count)
    assert abs(np.mean(ours > 0) - np.mean(theirs > 0)) < 0.04
    assert ks_statistic(ours[ours > 0], theirs[theirs > 0]) < 0.07
    assert ours.max() < 0.45


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_erase_modes(dtype):
    images = torch.full((4, 3, 16, 16), 5.0, dtype=dtype).to(memory_format=torch.channels_last)
    boxes = np.array([[[2, 3, 4, 5]], [[0, 0, 0, 0]], [[8, 8, 8, 8]], [[0, 0, 16, 1]]],
                     np.int32)
    inside = torch.zeros(4, 1, 16, 16, dtype=torch.bool)
    for k, (top, left, h, w) in enumerate(boxes[:, 0]):
        inside[k, :, top:top + h, left:left + w] = True
    for mode in ("const", "rand", "pixel"):
        out = random_erase(images.clone(), boxes, mode, seed=1)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert (out[~inside.expand_as(out)] == 5.0).all()
        erased = out[0, :, 2:6, 3:8].float()
        if mode == "const":
            assert (erased == 0).all()
        elif mode == "rand":  # one colour per rectangle and channel
            assert (erased == erased[:, :1, :1]).all() and erased.std() > 0
        else:
            assert erased[0].std() > 0.3
        assert torch.equal(out, random_erase(images.clone(), boxes, mode, seed=1))


def test_loader_random_erasing(dataset):
    root, store_path = dataset
    kwargs = dict(device="cpu", image_size=32, seed=6, return_meta=True, num_threads=2)
    plain = next(iter(ReLabelLoader(root, store_path, 10, **kwargs)))
    erased = next(iter(ReLabelLoader(root, store_path, 10, re_prob=1.0, **kwargs)))
    zero = (erased.images == 0).all(dim=1)  # const mode: the normalized image's zero
    fraction = zero.flatten(1).float().mean(1)
    assert (fraction >= 0.015).all() and (fraction <= 0.34).all()
    assert torch.equal(erased.images[~zero[:, None].expand_as(erased.images)],
                       plain.images[~zero[:, None].expand_as(plain.images)])
    assert torch.equal(plain.targets, erased.targets)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(lighting=-0.1), "lighting must be a finite float >= 0", id="lighting"),
    pytest.param(dict(re_prob=1.5), "re_prob must be a float in [0, 1]", id="re-prob"),
    pytest.param(dict(re_mode="noise"), "re_mode must be one of", id="re-mode"),
    pytest.param(dict(re_count=0), "re_count must be an int in [1, 64]", id="re-count"),
    pytest.param(dict(auto_augment="rand-foo"), "unknown section 'foo'", id="policy"),
    pytest.param(dict(auto_augment="ra", ra_magnitude=31), "ra_magnitude must be an int in "
                 "[0, 30]", id="ra-magnitude-31"),
    pytest.param(dict(ra_magnitude=-1), "ra_magnitude must be an int in [0, 30]",
                 id="ra-magnitude-negative"),
    pytest.param(dict(auto_augment="ra", ra_magnitude=9.0), "ra_magnitude must be an int",
                 id="ra-magnitude-float"),
])
def test_bad_augmentation_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        Augmentations.create(**{**OFF, **kwargs})
    assert message in str(info.value)


def crops_and_loader(dataset, **kwargs):
    root, store_path = dataset
    loader = ReLabelLoader(root, store_path, 8, device="cpu", image_size=32, seed=4,
                           return_meta=True, num_threads=1, **RAW, **kwargs)
    return loader, [batch for batch in loader]


def test_color_jitter_prob_jitters_that_share_and_leaves_the_rest(dataset):
    """timm's --color-jitter-prob: the untouched crops are bit for bit the plain loader's
    (the windows come from their own seed), the others differ."""
    _, plain = crops_and_loader(dataset)
    _, some = crops_and_loader(dataset, color_jitter=0.4, color_jitter_prob=0.5)
    _, every = crops_and_loader(dataset, color_jitter=0.4)
    same = [torch.equal(a, b) for x, y in zip(plain, some) for a, b in zip(x.images, y.images)]
    assert 0.2 < np.mean(same) < 0.8
    assert not any(torch.equal(a, b) for x, y in zip(plain, every)
                   for a, b in zip(x.images, y.images))


def test_grayscale_prob_makes_that_share_grey(dataset):
    _, grey = crops_and_loader(dataset, grayscale_prob=1.0)
    for batch in grey:  # RAW normalization: channels equal where grey
        assert (batch.images[:, 0] - batch.images[:, 1]).abs().max() < 1e-3
    _, half = crops_and_loader(dataset, grayscale_prob=0.5)
    spread = torch.cat([(b.images[:, 0] - b.images[:, 2]).abs().flatten(1).max(1).values
                        for b in half])
    assert 0.2 < (spread < 1e-3).float().mean() < 0.8


def test_gaussian_blur_prob_blurs_as_torchvisions_gaussian_blur(dataset):
    """timm's --gaussian-blur-prob: torchvision's GaussianBlur(23) at the planned sigma."""
    root = dataset[0]
    loader, batches = crops_and_loader(dataset, gaussian_blur_prob=0.5)
    sigma = loader.planner.plan(0).augment.blur_sigma
    assert 0.2 < np.mean(sigma > 0) < 0.8 and sigma.max() <= 2.0
    store = loader.store
    for b, batch in enumerate(batches):
        for k in range(len(batch.images)):
            s = float(sigma[b * 8 + k])
            path = f"{root}/{store.paths[batch.sample_index[k]]}"
            crop = pil_crop(path, batch.boxes[k].numpy(), 32, bool(batch.flip[k]))
            want = torch.from_numpy(crop).permute(2, 0, 1)
            if s > 0:
                want = TF.gaussian_blur(want, kernel_size=23, sigma=s)
            diff = (batch.images[k] - want).abs().mean()
            assert diff < 1.2, (s, float(diff))
