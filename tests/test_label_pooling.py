"""label_pooling (the C++ CPU kernel) against the densify + torchvision roi_align reference:
the shared tests (tests/label_pooling_tester.py), then what only the op has (the custom op,
its argument checks, threads, numpy inputs).

The convention: label_pooling equals densifying each top-k map to [C, H, W] (a class listed twice
in a cell counts twice), roi_align(D, [b, x1*W-0.5, y1*H-0.5, x2*W-0.5, y2*H-0.5], (S, S),
spatial_scale=1, sampling_ratio=-1, aligned=False), then the mode's epilogue over all C classes;
float32, within 1e-5 absolute before the softmax.
"""
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from dali_relabel import MODES, label_pooling, reference_label_pooling
from label_pooling_tester import LabelPoolingTester
from labelmap_data import EDGE_BOXES, make_boxes, make_label_maps


class TestCPUKernel(LabelPoolingTester):
    """label_pooling on CPU tensors: the compiled C++ kernel."""

    def pool(self, values, indices, boxes, **kwargs):
        return label_pooling(values, indices, boxes, **kwargs)


# Whole image, one pixel wide/tall on a 500-pixel image, each border, a corner, empty.
def assert_matches_reference(values, indices, boxes, **kwargs):
    """Both outputs, compared within 1e-5 absolute."""
    got = label_pooling(values, indices, boxes, **kwargs)
    want = reference_label_pooling(values, indices, boxes, **kwargs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, atol=1e-5, rtol=0)
    return got


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("output_size", [1, 2, 7, 14],
                         ids=["S1-paper", "S2", "S7-odd", "S14-vit-tokens"])
def test_matches_reference(output_size, mode, dtype):
    values, indices = make_label_maps(12, 5, 1000, dtype=dtype, seed=output_size)
    boxes = torch.cat([make_boxes(12 - len(EDGE_BOXES), seed=output_size), EDGE_BOXES])
    out = assert_matches_reference(values, indices, boxes, num_classes=1000,
                                   output_size=output_size, mode=mode)
    expected_shape = (12, 1000) if output_size == 1 else (12, output_size ** 2, 1000)
    assert out.shape == expected_shape
    if mode != "logits":
        assert_close(out.sum(-1), torch.ones(expected_shape[:-1]))


@pytest.mark.parametrize("num_classes", [10, 1000, 21843],
                         ids=["C10-tiny", "C1000-imagenet", "C21843-imagenet21k"])
@pytest.mark.parametrize("topk", [1, 5], ids=["K1", "K5-paper"])
@pytest.mark.parametrize("output_size", [1, 2])
def test_num_classes_and_topk(num_classes, topk, output_size):
    values, indices = make_label_maps(6, topk, num_classes, seed=topk)
    boxes = make_boxes(6, seed=2)
    for mode in MODES:
        assert_matches_reference(values, indices, boxes, num_classes=num_classes,
                                 output_size=output_size, mode=mode)


@pytest.mark.parametrize("output_size", [1, 3])
def test_fused_gather_equals_gather_then_pool(output_size):
    values, indices = make_label_maps(40, 5, 1000, seed=3)
    sample_index = torch.tensor([39, 0, 7, 7, 21, 3, 0, 38])  # repeats and both ends
    boxes = make_boxes(len(sample_index), seed=4)
    fused = assert_matches_reference(values, indices, boxes, num_classes=1000,
                                     output_size=output_size, sample_index=sample_index)
    gathered = label_pooling(values[sample_index], indices[sample_index], boxes,
                             num_classes=1000, output_size=output_size)
    assert_close(fused, gathered, atol=0, rtol=0)


def test_flip_mirrors_bins_along_x():
    values, indices = make_label_maps(8, 5, 100, seed=5)
    boxes = make_boxes(8, seed=6)
    flip = torch.tensor([True, False, True, True, False, False, True, False])
    plain = label_pooling(values, indices, boxes, num_classes=100, output_size=4, mode="logits")
    flipped = assert_matches_reference(values, indices, boxes, num_classes=100, output_size=4,
                                       flip=flip, mode="logits")
    mirrored = plain.view(8, 4, 4, 100).flip(2).view(8, 16, 100)
    assert_close(flipped[flip], mirrored[flip], atol=0, rtol=0)
    assert_close(flipped[~flip], plain[~flip], atol=0, rtol=0)
    assert not torch.equal(flipped[flip], plain[flip])
    # S == 1: flipping the image does not change its target.
    assert_close(label_pooling(values, indices, boxes, num_classes=100, flip=flip),
                 label_pooling(values, indices, boxes, num_classes=100), atol=0, rtol=0)


def test_orientation_of_rows_and_columns():
    """Independent of roi_align: x runs along the map's columns, y along its rows."""
    values = torch.ones(1, 1, 15, 15)
    indices = torch.zeros(1, 1, 15, 15, dtype=torch.int16)
    indices[0, 0, :, 8:] = 1   # right part of the picture: class 1
    indices[0, 0, 10:, :] = 2  # bottom rows: class 2
    boxes = torch.tensor([[0.0, 0.0, 0.4, 0.5],    # top-left
                          [0.6, 0.0, 1.0, 0.5],    # top-right
                          [0.0, 0.8, 1.0, 1.0]])   # bottom strip
    out = label_pooling(values, indices, boxes, num_classes=3, mode="argmax",
                        sample_index=torch.zeros(3, dtype=torch.int64))
    assert out.argmax(-1).tolist() == [0, 1, 2]


def test_whole_image_box_against_float64_loop():
    """torchvision's sampling rules written as a plain float64 loop (whole image, S = 2)."""
    values, indices = make_label_maps(1, 3, 6, height=5, width=7, dtype=torch.float32, seed=7)
    dense = torch.zeros(6, 5, 7, dtype=torch.float64)
    dense.scatter_add_(0, indices[0].long(), values[0].double())
    x1, y1, x2, y2 = -0.5, -0.5, 7 - 0.5, 5 - 0.5  # box (0, 0, 1, 1) in cells
    S = 2
    want = torch.zeros(S * S, 6, dtype=torch.float64)
    bin_h, bin_w = (y2 - y1) / S, (x2 - x1) / S
    grid_h, grid_w = int(np.ceil(bin_h)), int(np.ceil(bin_w))
    for ph in range(S):
        for pw in range(S):
            for iy in range(grid_h):
                y = max(y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h, 0.0)
                for ix in range(grid_w):
                    x = max(x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w, 0.0)
                    y0, x0 = min(int(y), 4), min(int(x), 6)
                    y_hi, x_hi = min(y0 + 1, 4), min(x0 + 1, 6)
                    ly, lx = (y - y0 if y0 < 4 else 0.0), (x - x0 if x0 < 6 else 0.0)
                    want[ph * S + pw] += ((1 - ly) * (1 - lx) * dense[:, y0, x0]
                                          + (1 - ly) * lx * dense[:, y0, x_hi]
                                          + ly * (1 - lx) * dense[:, y_hi, x0]
                                          + ly * lx * dense[:, y_hi, x_hi])
            want[ph * S + pw] /= grid_h * grid_w
    got = label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), num_classes=6,
                        output_size=S, mode="logits")
    assert_close(got[0].double(), want, atol=1e-5, rtol=0)


def test_numpy_inputs_and_empty_batch():
    values, indices = make_label_maps(3, 5, 50, seed=8)
    boxes = make_boxes(3, seed=9)
    from_numpy = label_pooling(values.numpy(), indices.numpy(), boxes.numpy(), num_classes=50)
    assert_close(from_numpy, label_pooling(values, indices, boxes, num_classes=50))
    empty = label_pooling(values, indices, boxes[:0], num_classes=50,
                          sample_index=torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0, 50)


def test_custom_op_opcheck_and_torch_compile():
    values, indices = make_label_maps(4, 5, 30, seed=10)
    boxes = make_boxes(4, seed=11)
    sample_index = torch.tensor([3, 1, 1, 0])
    flip = torch.tensor([True, False, True, False])
    torch.library.opcheck(torch.ops.dali_relabel.label_pooling.default,
                          (values, indices, boxes, sample_index, flip, 30, 2, "softmax"))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def pooled_twice(v, i, b, s, f):
        targets = label_pooling(v, i, b, num_classes=30, output_size=2, flip=f,
                                sample_index=s, check_inputs=False)
        return targets * 2

    assert_close(pooled_twice(values, indices, boxes, sample_index, flip),
                 2 * reference_label_pooling(values, indices, boxes, num_classes=30,
                                             output_size=2, flip=flip,
                                             sample_index=sample_index))


def _good_args():
    values, indices = make_label_maps(4, 5, 20, seed=12)
    return dict(values=values, indices=indices, boxes=make_boxes(4, seed=13), num_classes=20)


def _with(**changes):
    def build():
        args = _good_args()
        for key, change in changes.items():
            args[key] = change(args) if callable(change) else change
        return args
    return build


BAD_INPUTS = [
    pytest.param(_with(values=lambda a: a["values"][0]), "values must be [N, K, H, W]",
                 id="values-rank-3"),
    pytest.param(_with(values=lambda a: a["values"].long()), "values must be float",
                 id="values-integer"),
    pytest.param(_with(indices=lambda a: a["indices"][:, :3]), "indices must have the shape",
                 id="indices-shape-mismatch"),
    pytest.param(_with(indices=lambda a: a["indices"].float()), "indices must be an integer",
                 id="indices-float"),
    pytest.param(_with(boxes=lambda a: a["boxes"][:, :3]), "boxes must be [B, 4]",
                 id="boxes-not-Bx4"),
    pytest.param(_with(boxes=lambda a: a["boxes"][:3]), "values has 4 rows but boxes has 3",
                 id="boxes-count-without-sample-index"),
    pytest.param(_with(boxes=lambda a: a["boxes"].index_fill(1, torch.tensor([0]), float("nan"))),
                 "boxes must be finite", id="boxes-nan"),
    pytest.param(_with(boxes=lambda a: a["boxes"][:, [2, 1, 0, 3]]), "x2 >= x1",
                 id="boxes-x2-lt-x1"),
    pytest.param(_with(boxes=lambda a: a["boxes"][:, [0, 3, 2, 1]]), "y2 >= y1",
                 id="boxes-y2-lt-y1"),
    pytest.param(_with(boxes=lambda a: a["boxes"] * 224), "in [0, 1]",
                 id="boxes-in-pixels-not-normalized"),
    pytest.param(_with(boxes=lambda a: a["boxes"] - 0.01), "in [0, 1]",
                 id="boxes-below-zero"),
    pytest.param(_with(num_classes=10), "num_classes=10", id="class-index-above-num-classes"),
    pytest.param(_with(indices=lambda a: a["indices"].index_fill(0, torch.tensor([2]), -1)),
                 "indices must be class ids", id="class-index-negative"),
    pytest.param(_with(mode="sigmoid"), "mode must be one of", id="unknown-mode"),
    pytest.param(_with(output_size=0), "output_size must be an int >= 1", id="output-size-0"),
    pytest.param(_with(num_classes=0), "num_classes must be an int in [1, MAX_NUM_CLASSES",
                 id="num-classes-0"),
    pytest.param(_with(num_classes=2 ** 31), "num_classes must be an int in [1, MAX_NUM_CLASSES",
                 id="num-classes-2-31"),
    pytest.param(_with(sample_index=torch.tensor([0, 1, 4, 2])), "sample_index must lie in",
                 id="sample-index-past-end"),
    pytest.param(_with(sample_index=torch.tensor([0, -1, 2, 2])), "sample_index must lie in",
                 id="sample-index-negative"),
    pytest.param(_with(sample_index=torch.tensor([0, 1])), "sample_index must be [B]",
                 id="sample-index-wrong-length"),
    pytest.param(_with(flip=torch.tensor([True])), "flip must be [B]", id="flip-wrong-length"),
    pytest.param(_with(boxes=lambda a: a["boxes"].to("meta")), "one device",
                 id="tensors-on-different-devices"),
    pytest.param(_with(values=lambda a: a["values"].tolist()), "torch.Tensor or numpy",
                 id="values-a-list"),
]


@pytest.mark.parametrize("build, message", BAD_INPUTS)
@pytest.mark.parametrize("op", [label_pooling, reference_label_pooling],
                         ids=["label_pooling", "reference"])
def test_bad_input_raises_value_error(op, build, message):
    with pytest.raises(ValueError, match=None) as info:
        op(**build())
    assert message in str(info.value)


@pytest.mark.parametrize("dim", [1, 2, 3], ids=["K0", "H0", "W0"])
def test_cpu_kernel_refuses_empty_map_axes(dim):
    """The wrapper refuses them first; the compiled kernel guards its own memory too."""
    from dali_relabel.ops.kernels import _label_pooling_cpu
    values, indices = make_label_maps(2, 5, 10, seed=24)
    values, indices = values.narrow(dim, 0, 0), indices.narrow(dim, 0, 0)
    with pytest.raises(RuntimeError, match="K, H, W >= 1"):
        _label_pooling_cpu.label_pooling_forward(values.contiguous(), indices.contiguous(),
                                                 make_boxes(2, seed=25), None, None, 10, 1, 0)


@pytest.mark.parametrize("mode", MODES)
def test_reruns_and_thread_counts_are_bit_identical(mode):
    values, indices = make_label_maps(16, 5, 1000, seed=20)
    values[:, 1] = values[:, 0]  # equal contributions: a changed summation order would show
    boxes = torch.cat([make_boxes(12, seed=21), EDGE_BOXES[[0, 4, 7, 8]]])
    sample_index = torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(22))
    flip = torch.rand(16, generator=torch.Generator().manual_seed(23)) < 0.5
    threads = torch.get_num_threads()
    runs = []
    try:
        for num_threads in (threads, threads, 1, 3):
            torch.set_num_threads(num_threads)
            runs.append(label_pooling(values, indices, boxes, num_classes=1000, output_size=3,
                                      flip=flip, sample_index=sample_index, mode=mode))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


# Degenerate shapes are refused by both entry points, with and without the data checks.
def pooling_args(k=2, h=3, w=3, **changes):
    args = dict(values=torch.randn(2, k, h, w), indices=torch.zeros(2, k, h, w, dtype=torch.long),
                boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.8, 0.9]]),
                num_classes=5)
    args.update(changes)
    return args


POOLING_CASES = [
    pytest.param(pooling_args(h=0), "K, H, W >= 1", id="H-0"),
    pytest.param(pooling_args(w=0), "K, H, W >= 1", id="W-0"),
    pytest.param(pooling_args(k=0), "K, H, W >= 1", id="K-0"),
    pytest.param(pooling_args(values=torch.randn(0, 2, 3, 3),
                              indices=torch.zeros(0, 2, 3, 3, dtype=torch.long),
                              sample_index=torch.tensor([0, 0])), "at least one row",
                 id="N-0-with-sample-index"),
    pytest.param(pooling_args(output_size=2 ** 32), "at most MAX_OUTPUT_SIZE=64",
                 id="output-size-2-pow-32"),
    pytest.param(pooling_args(output_size=65), "at most MAX_OUTPUT_SIZE=64",
                 id="output-size-65"),
]


@pytest.mark.parametrize("args, message", POOLING_CASES)
@pytest.mark.parametrize("check_inputs", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("op", [label_pooling, reference_label_pooling],
                         ids=["label_pooling", "reference"])
def test_label_pooling_refuses_degenerate_shapes(op, check_inputs, args, message):
    with pytest.raises(ValueError, match=message):
        op(**args, check_inputs=check_inputs)
