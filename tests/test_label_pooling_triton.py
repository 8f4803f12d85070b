"""The CUDA (Triton) LabelPooling kernel, run on CPU tensors by triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter costs about a
millisecond per program (one program per box and output bin), so batches stay small here.
"""
import pytest
import torch
from torch.testing import assert_close

from conftest import make_boxes, make_label_maps
from dali_relabel import MODES, reference_label_pooling
from dali_relabel.kernels.label_pooling_triton import label_pooling_triton
from test_label_pooling import EDGE_BOXES


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "num_classes, topk, output_size",
    [pytest.param(1000, 5, 1, id="paper-setting"),
     pytest.param(10, 1, 2, id="tiny-C-K1-S2"),
     pytest.param(2500, 5, 3, id="C-spans-three-blocks-S3")])
def test_triton_kernel_matches_reference(mode, num_classes, topk, output_size):
    values, indices = make_label_maps(10, topk, num_classes, seed=output_size)
    sample_index = torch.tensor([9, 0, 4, 4, 2, 7])
    boxes = torch.cat([make_boxes(3, seed=1), EDGE_BOXES[[0, 1, 7]]])
    flip = torch.tensor([True, False, False, True, True, False])
    got = label_pooling_triton(values, indices, boxes, sample_index, flip, num_classes,
                               output_size, mode)
    want = reference_label_pooling(values, indices, boxes, num_classes=num_classes,
                                   output_size=output_size, flip=flip,
                                   sample_index=sample_index, mode=mode)
    assert_close(got.view_as(want), want, atol=1e-5, rtol=0)


def test_triton_kernel_without_gather_or_flip():
    values, indices = make_label_maps(4, 5, 300, dtype=torch.float32, seed=3)
    boxes = EDGE_BOXES[[2, 3, 5, 8]]
    got = label_pooling_triton(values, indices, boxes, None, None, 300, 1, "logits")
    want = reference_label_pooling(values, indices, boxes, num_classes=300, mode="logits")
    assert_close(got.squeeze(1), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_triton_kernel_int32_classes_bf16_values_and_repeats(mode):
    """ImageNet-21k class ids as int32 indices, bfloat16 values, a class listed twice."""
    values, indices = make_label_maps(3, 2, 21843, dtype=torch.bfloat16, seed=4)
    indices = indices.to(torch.int32)
    indices[0, 1] = indices[0, 0]
    boxes = torch.cat([make_boxes(2, seed=5), EDGE_BOXES[[0]]])
    got = label_pooling_triton(values, indices, boxes, None, None, 21843, 1, mode)
    want = reference_label_pooling(values, indices, boxes, num_classes=21843, mode=mode)
    assert_close(got.squeeze(1), want, atol=1e-5, rtol=0)
