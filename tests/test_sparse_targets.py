"""Sparse token targets: sparse_label_pooling against the densify + roi_align reference, the
footprint bound it relies on, soft_target_cross_entropy (loss and gradient) against a float64
dense computation, and TargetMaker's sparse form in every label mode."""
import math

import pytest
import torch
from torch.testing import assert_close

from label_pooling_tester import LabelPoolingTester
from labelmap_data import make_boxes, make_label_maps
from dali_relabel import LabelMapStore, label_pooling, reference_label_pooling, write_labelmaps
from dali_relabel.ops import sparse_targets
from dali_relabel.ops.label_pooling import BOX_TOLERANCE
from dali_relabel.ops.sparse_targets import (SparseTargets, _axis_weights, footprint,
                                         soft_target_cross_entropy, sparse_label_pooling)
from dali_relabel.loading.targets import LABEL_MODES, TargetMaker

# Whole image, one pixel wide/tall on a 500-pixel image, each border, a corner, empty, and
# boxes a hair outside [0, 1] (within BOX_TOLERANCE).
EDGE_BOXES = torch.tensor([
    [0.0, 0.0, 1.0, 1.0],
    [0.3, 0.2, 0.302, 0.9],
    [0.1, 0.5, 0.8, 0.502],
    [0.0, 0.1, 0.3, 0.7],
    [0.6, 0.2, 1.0, 0.9],
    [0.9, 0.9, 1.0, 1.0],
    [0.5, 0.5, 0.5, 0.5],
    [-1e-4, -1e-4, 1 + 1e-4, 1 + 1e-4],
])


class TestSparseLabelPooling(LabelPoolingTester):
    """sparse_label_pooling, densified (its modes: softmax and argmax)."""

    modes = ("softmax", "argmax")
    output_sizes = (1, 2, 3, 7, 14)

    def pool(self, values, indices, boxes, **kwargs):
        return sparse_label_pooling(values, indices, boxes, **kwargs).dense()


def check_against_reference(values, indices, boxes, **kwargs):
    """Dense form vs the reference (the definition's 1e-5, as label_pooling's tests) and vs
    label_pooling, which sums in a similar order (1e-6); returns the sparse targets."""
    sparse = sparse_label_pooling(values, indices, boxes, **kwargs)
    want = reference_label_pooling(values, indices, boxes, **kwargs)
    dense = sparse.dense()
    assert dense.shape == want.shape == sparse.shape
    assert_close(dense, want, atol=1e-5, rtol=0)
    assert_close(dense, label_pooling(values, indices, boxes, **kwargs), atol=1e-6, rtol=0)
    assert_close(dense.sum(-1), torch.ones(want.shape[:-1]))
    return sparse


@pytest.mark.parametrize("mode", ["softmax", "argmax"])
def test_chunks_of_boxes_give_the_same_targets(monkeypatch, mode):
    values, indices = make_label_maps(9, 5, 100, seed=16)
    kwargs = dict(num_classes=100, output_size=3, mode=mode, flip=torch.arange(7) % 2 == 0,
                  sample_index=torch.tensor([8, 0, 4, 4, 2, 7, 1]))
    boxes = make_boxes(7, seed=17)
    whole = sparse_label_pooling(values, indices, boxes, **kwargs)
    monkeypatch.setattr(sparse_targets, "_CHUNK_ENTRIES", 2 * 9 * 5 * footprint(15, 3) ** 2)
    chunked = sparse_label_pooling(values, indices, boxes, **kwargs)
    for field in ("fill", "classes", "probs"):
        assert torch.equal(getattr(chunked, field), getattr(whole, field)), field


@pytest.mark.parametrize("output_size", [1, 3, 5, 15])
def test_whole_cell_boxes(output_size):
    """Box edges on cell borders, where roi / S is a whole number and ceil(roi / S) is
    decided by rounding alone."""
    values, indices = make_label_maps(6, 3, 50, dtype=torch.float32, seed=2)
    cells = torch.tensor([[0, 0, 15, 15], [3, 0, 12, 15], [0, 5, 15, 10], [1, 2, 4, 14],
                          [14, 14, 15, 15], [6, 3, 9, 6]], dtype=torch.float32)
    for mode in ("softmax", "argmax"):
        check_against_reference(values, indices, cells / 15, num_classes=50,
                                output_size=output_size, mode=mode,
                                flip=torch.tensor([False, True] * 3))


def test_duplicate_classes_count_twice_and_every_class_listed():
    values, indices = make_label_maps(4, 4, 6, dtype=torch.float32, seed=3)
    indices[:, 1] = indices[:, 0]  # the top class listed twice in every cell
    boxes = make_boxes(4, seed=4)
    for size in (1, 4):
        # C = 6 <= the slots: rows may list every class, so no class is left for the fill.
        sparse = check_against_reference(values, indices, boxes, num_classes=6,
                                         output_size=size)
        every = (sparse.classes >= 0).sum(-1) == 6
        assert (sparse.fill[every] == 0).all()
    # Very negative logits of every class: no overflow or 0 / 0 without an unlisted class.
    values = torch.full((1, 2, 3, 3), -300.0)
    indices = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    indices[:, 1] = 1
    sparse = sparse_label_pooling(values, indices, torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                                  num_classes=2)
    assert_close(sparse.dense(), torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("num_classes", [21843, 40000], ids=["C21843", "C40000-int32"])
def test_many_classes(num_classes):
    values, indices = make_label_maps(3, 5, num_classes, seed=5)
    sparse = check_against_reference(values, indices, make_boxes(3, seed=6),
                                     num_classes=num_classes, output_size=4,
                                     flip=torch.tensor([True, False, True]))
    assert sparse.classes.dtype == (torch.int16 if num_classes < 32768 else torch.int32)


@pytest.mark.parametrize("size, output_size", [(15, 1), (15, 2), (15, 7), (15, 14), (14, 14),
                                               (14, 7), (7, 14), (1, 3), (15, 64)])
def test_footprint_bounds_the_weighted_cells_of_a_bin(size, output_size):
    """Every bin weighs at most footprint(size, S) consecutive cells, for random boxes, whole
    cells and boxes BOX_TOLERANCE beyond the image."""
    gen = torch.Generator().manual_seed(size * 100 + output_size)
    ends = torch.rand(4000, 2, generator=gen).sort(dim=1).values
    cells = torch.randint(0, size + 1, (2000, 2), generator=gen).sort(dim=1).values / size
    edges = torch.tensor([[-BOX_TOLERANCE, 1 + BOX_TOLERANCE], [0.0, 1.0], [1.0, 1.0],
                          [0.0, 0.0], [1 - 1e-7, 1.0], [-BOX_TOLERANCE, -BOX_TOLERANCE]])
    ends = torch.cat([ends, cells, edges]) * size - 0.5
    weights = _axis_weights(ends[:, 0], ends[:, 1], size, output_size)
    nonzero = weights > 0
    position = torch.arange(size).expand_as(weights)
    first = torch.where(nonzero, position, size).amin(-1)
    last = torch.where(nonzero, position, -1).amax(-1)
    span = torch.where(nonzero.any(-1), last - first + 1, 0)
    assert span.max().item() <= footprint(size, output_size)
    assert footprint(size, output_size) == min(
        size, math.ceil(size * (1 + 2 * BOX_TOLERANCE) / output_size) + 1)
    # Some bin needs all of it (the bound is tight) unless the axis is shorter.
    assert span.max().item() == footprint(size, output_size) or size <= 2


def test_shapes_devices_numpy_and_empty_batch():
    values, indices = make_label_maps(3, 5, 50, seed=8)
    boxes = make_boxes(3, seed=9)
    from_numpy = sparse_label_pooling(values.numpy(), indices.numpy(), boxes.numpy(),
                                      num_classes=50, output_size=2)
    torch_ = sparse_label_pooling(values, indices, boxes, num_classes=50, output_size=2)
    assert_close(from_numpy.dense(), torch_.dense(), atol=0, rtol=0)
    moved = torch_.to("cpu", non_blocking=True)
    assert moved.device == torch.device("cpu") and moved.shape == (3, 4, 50)
    assert torch_.nbytes() == 3 * 4 * 4 + 3 * 4 * 50 * (2 + 4)
    empty = sparse_label_pooling(values[:0], indices[:0], boxes[:0], num_classes=50,
                                 output_size=3)
    assert empty.dense().shape == (0, 9, 50) and len(empty) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="logits"), r"mode must be one of \('softmax', 'argmax'\) for sparse targets"),
    (dict(num_classes=0), r"num_classes must be an int in \[1, MAX_NUM_CLASSES"),
    (dict(output_size=65), "output_size must be at most"),
    (dict(boxes=torch.tensor([[0.0, 0.0, 1.5, 1.0]])), "boxes must be normalized"),
    (dict(sample_index=torch.tensor([5])), r"sample_index must lie in \[0, 2\)"),
    (dict(flip=torch.tensor([True, False])), r"flip must be \[B\] = \[1\]"),
])
def test_bad_arguments_are_named(kwargs, message):
    values, indices = make_label_maps(2, 2, 5, seed=1)
    args = dict(values=values, indices=indices, boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                num_classes=5, sample_index=torch.tensor([1]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sparse_label_pooling(**args)


def test_bad_sparse_targets_are_named():
    fill, classes, probs = torch.zeros(2, 3), torch.zeros(2, 3, 4, dtype=torch.long), \
        torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"classes must be \[\*fill.shape, U\] = \[2, 3, U\]"):
        SparseTargets(fill, classes[:, :2], probs, 10)
    with pytest.raises(ValueError, match="probs must have the shape of classes"):
        SparseTargets(fill, classes, probs[..., :2], 10)
    with pytest.raises(ValueError, match="classes must be an integer tensor"):
        SparseTargets(fill, probs, probs, 10)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        SparseTargets(fill, classes, probs, 0)


# ---- the loss --------------------------------------------------------------------------

def loss_and_grad(logits, targets, reduction):
    logits = logits.detach().requires_grad_()
    loss = soft_target_cross_entropy(logits, targets, reduction=reduction)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss, grad


def float64_truth(logits, dense, reduction):
    logits = logits.detach().double().requires_grad_()
    per_row = -(dense.double() * torch.log_softmax(logits, dim=-1)).sum(-1)
    loss = {"mean": per_row.mean(), "sum": per_row.sum(), "none": per_row}[reduction]
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    return loss, grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("output_size, mode", [(1, "softmax"), (4, "softmax"), (4, "argmax")])
def test_loss_and_gradient_equal_the_dense_float64_computation(output_size, mode, reduction):
    num_classes = 300
    values, indices = make_label_maps(6, 5, num_classes, seed=10)
    sparse = sparse_label_pooling(values, indices, make_boxes(6, seed=11), num_classes=300,
                                  output_size=output_size, mode=mode)
    shape = sparse.shape
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(12)) * 3
    want_loss, want_grad = float64_truth(logits, sparse.dense(), reduction)
    scale = want_grad.abs().max().item()
    for targets in (sparse, sparse.dense()):
        loss, grad = loss_and_grad(logits, targets, reduction)
        assert loss.dtype == torch.float32 and loss.shape == want_loss.shape
        assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-6)
        assert_close(grad.double(), want_grad, rtol=0, atol=1e-6 * scale)


def test_loss_of_hand_made_targets_with_unused_slots_and_bf16_logits():
    """Unused slots (-1) anywhere in a row, targets not summing to 1, bf16 logits."""
    fill = torch.tensor([0.01, 0.0, 0.05])
    classes = torch.tensor([[3, -1, 0], [-1, -1, 7], [-1, -1, -1]], dtype=torch.int16)
    probs = torch.tensor([[0.5, 0.0, 0.3], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    targets = SparseTargets(fill, classes, probs, 8)
    dense = targets.dense()
    assert_close(dense[0], torch.tensor([0.3, 0.01, 0.01, 0.5, 0.01, 0.01, 0.01, 0.01]))
    assert_close(dense[2], torch.full((8,), 0.05))
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(13))
    for dtype in (torch.float32, torch.bfloat16):
        z = logits.to(dtype)
        loss, grad = loss_and_grad(z, targets, "none")
        want_loss, want_grad = float64_truth(z, dense, "none")
        assert grad.dtype == dtype
        assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-6)
        assert_close(grad.double(), want_grad, rtol=0, atol=1e-6 if dtype == torch.float32
                     else 1e-2)


def test_loss_bad_arguments_are_named():
    logits = torch.randn(2, 4, 10)
    sparse = SparseTargets(torch.zeros(2, 4), torch.zeros(2, 4, 3, dtype=torch.long),
                           torch.zeros(2, 4, 3), 10)
    with pytest.raises(ValueError, match="reduction must be one of"):
        soft_target_cross_entropy(logits, sparse, reduction="avg")
    with pytest.raises(ValueError, match=r"targets must have rows \(2, 3\) of C=10 classes"):
        soft_target_cross_entropy(logits[:, :3], sparse)
    with pytest.raises(ValueError, match=r"targets must have rows .* got sparse targets of "
                                         r"shape \(2, 4, 10\)"):
        soft_target_cross_entropy(torch.randn(2, 4, 12), sparse)
    with pytest.raises(ValueError, match="targets must have the shape of logits"):
        soft_target_cross_entropy(logits, torch.zeros(2, 10))
    with pytest.raises(ValueError, match="targets must be a Tensor or SparseTargets"):
        soft_target_cross_entropy(logits, [0.1] * 10)
    with pytest.raises(ValueError, match="logits must be a floating tensor"):
        soft_target_cross_entropy(logits.long(), sparse)


# ---- TargetMaker -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    values, indices = make_label_maps(12, 5, 30, seed=14)
    path = tmp_path_factory.mktemp("store") / "maps.h5"
    write_labelmaps(path, values, indices, labels=torch.arange(12) % 30,
                    paths=[f"c/img_{n}.JPEG" for n in range(12)],
                    classes=[f"class_{c}" for c in range(30)], annotator="test")
    return LabelMapStore.open(path, placement="memory")


@pytest.mark.parametrize("fused_gather", [True, False], ids=["fused", "host-gather"])
@pytest.mark.parametrize("output_size", [1, 3])
@pytest.mark.parametrize("label_mode", LABEL_MODES)
def test_target_maker_sparse_equals_dense(store, label_mode, output_size, fused_gather):
    boxes, flip = make_boxes(8, seed=15), torch.arange(8) % 2 == 1
    rows = torch.tensor([11, 0, 3, 3, 7, 5, 9, 2])
    kwargs = dict(label_mode=label_mode, output_size=output_size, fused_gather=fused_gather)
    if label_mode == "global_multi" and output_size > 1:
        with pytest.raises(ValueError, match=r"sparse targets with label_mode='global_multi' "
                                             r"and output_size > 1: .* K\*H\*W = 1125"):
            TargetMaker(store, torch.device("cpu"), sparse=True, **kwargs)
        return
    makers = [TargetMaker(store, torch.device("cpu"), sparse=sparse, **kwargs)
              for sparse in (False, True)]
    dense, sparse = (maker(boxes, flip, rows) for maker in makers)
    assert isinstance(sparse, SparseTargets) and isinstance(dense, torch.Tensor)
    assert_close(sparse.dense(), dense, atol=1e-6, rtol=0)
