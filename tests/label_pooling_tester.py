"""The tests every LabelPooling entry point must pass, written once (as torchvision's
RoIOpTester): against the densify + roi_align reference on gathered, flipped, whole-pixel,
repeated-class, adversarial and many-class inputs, argmax's tie rules, and bit-identical
reruns. A subclass named Test... says how to call its entry point (``pool``) and which modes
and output sizes it has; tests/conftest.py parametrizes the methods by them (a method marked
``modes(...)`` takes only those of the subclass's modes).
"""
import pytest
import torch
from torch.testing import assert_close

from dali_relabel import MODES, reference_label_pooling
from labelmap_data import EDGE_BOXES, REPEATED_CLASSES, make_boxes, make_label_maps


def pixel_boxes(num_boxes: int, width: int, height: int, seed: int) -> torch.Tensor:
    """Boxes of whole pixels of a width x height image, normalized."""
    size = torch.tensor([width, height, width, height])
    return (make_boxes(num_boxes, seed=seed) * size).round() / size


class LabelPoolingTester:
    modes = MODES
    output_sizes = (1, 2, 3, 14)
    batch = 12  # boxes per case (the interpreter runs one program per box and bin)

    def pool(self, values, indices, boxes, **kwargs) -> torch.Tensor:
        """The entry point's targets, dense: [B, C] for output_size 1, else [B, S*S, C]."""
        raise NotImplementedError

    def check(self, values, indices, boxes, **kwargs) -> torch.Tensor:
        """The entry point against the reference (1e-5 absolute, float32)."""
        got = self.pool(values, indices, boxes, **kwargs)
        want = reference_label_pooling(values, indices, boxes, check_inputs=False, **kwargs)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert_close(got, want, atol=1e-5, rtol=0)
        return got

    def test_matches_reference_with_gather_and_flip(self, output_size, mode):
        values, indices = make_label_maps(self.batch + 4, 5, 1000, seed=output_size)
        edges = EDGE_BOXES[:min(len(EDGE_BOXES), self.batch // 2)]
        boxes = torch.cat([make_boxes(self.batch - len(edges), seed=output_size), edges])
        gen = torch.Generator().manual_seed(output_size)
        sample_index = torch.randint(0, self.batch + 4, (self.batch,), generator=gen)
        flip = torch.rand(self.batch, generator=gen) < 0.5
        out = self.check(values, indices, boxes, num_classes=1000, output_size=output_size,
                         mode=mode, flip=flip, sample_index=sample_index)
        if mode != "logits":
            assert_close(out.sum(-1), torch.ones(out.shape[:-1]))

    @pytest.mark.parametrize("boxes", [
        # A box W cells wide with W / S whole takes exactly W / S samples per bin; a division
        # one ulp high would take one more. The pooled values show it.
        pytest.param(torch.tensor([[0.0, 0.0, 0.6, 1.0], [0.2, 0.4, 1.0, 0.8]]),
                     id="cell-aligned-9x15-12x6"),
        pytest.param(pixel_boxes(2, 230, 173, seed=2), id="whole-pixels-of-230x173"),
        pytest.param(pixel_boxes(2, 500, 375, seed=3), id="whole-pixels-of-500x375"),
        # 15 x 15 and 10 x 10 cells: 3 and 2 samples per bin at S = 5.
        pytest.param(torch.tensor([[0.0, 0.0, 1.0, 1.0], [1 / 3, 0.0, 1.0, 2 / 3]]),
                     id="cells-15x15-10x10")])
    def test_whole_pixel_boxes(self, boxes, output_size):
        values, indices = make_label_maps(2, 5, 100, seed=output_size)
        self.check(values, indices, boxes, num_classes=100, output_size=output_size,
                   mode=self.modes[-1] if "logits" not in self.modes else "logits",
                   flip=torch.tensor([False, True]))

    @pytest.mark.parametrize("change", REPEATED_CLASSES)
    def test_repeated_classes_add_up(self, mode, change):
        values, indices = change(*make_label_maps(2, 3, 20, dtype=torch.float32, seed=14))
        boxes = torch.cat([make_boxes(1, seed=15), EDGE_BOXES[[0]]])
        for size in (1, 2):
            self.check(values, indices, boxes, num_classes=20, output_size=size, mode=mode)

    def test_every_pair_a_different_class(self, mode):
        """Adversarial map: all K*H*W pairs distinct, a whole-image box lists them all."""
        gen = torch.Generator().manual_seed(16)
        values = torch.randn(2, 3, 8, 8, generator=gen) * 4
        indices = torch.randperm(600, generator=gen)[:384].view(2, 3, 8, 8).to(torch.int16)
        boxes = torch.cat([EDGE_BOXES[[0]], make_boxes(1, seed=18)])
        for size in (1, 2):
            self.check(values, indices, boxes, num_classes=600, output_size=size, mode=mode)

    def test_imagenet21k_int32_classes_bf16_values(self, mode):
        """ImageNet-21k class ids as int32 indices, bfloat16 values, a class listed twice,
        the last class."""
        values, indices = make_label_maps(3, 2, 21843, dtype=torch.bfloat16, seed=4)
        indices = indices.to(torch.int32)
        indices[0, 1] = indices[0, 0]
        indices[1, 0, :, :5] = 21842
        boxes = torch.cat([make_boxes(2, seed=5), EDGE_BOXES[[0]]])
        self.check(values, indices, boxes, num_classes=21843, mode=mode)

    @pytest.mark.parametrize("num_classes, classes, values, box, want", [
        # Every listed logit negative: an unlisted class (logit 0) wins, the first of them.
        pytest.param(10, (3, 7), (-0.5, -1.0), (0.1, 0.2, 0.7, 0.9), 0, id="unlisted-0-wins"),
        pytest.param(10, (0, 1), (-0.5, -1.0), (0.1, 0.2, 0.7, 0.9), 2,
                     id="first-unlisted-after-listed-0-1"),
        pytest.param(10, (0, 2), (-0.5, -1.0), (0.1, 0.2, 0.7, 0.9), 1,
                     id="unlisted-gap-between-listed"),
        pytest.param(2, (0, 1), (-0.5, -1.0), (0.1, 0.2, 0.7, 0.9), 0,
                     id="all-listed-negative-max-wins"),
        # Equal logits of two listed classes: the first (smallest) wins, as torch.argmax.
        pytest.param(10, (7, 3), (1.0, 1.0), (0.1, 0.1, 0.9, 0.9), 3, id="tie-first-wins"),
        # A zero logit ties with every unlisted class: the smallest class wins.
        pytest.param(8, (3, 5), (0.0, -2.0), (0.0, 0.0, 1.0, 1.0), 0, id="zero-ties-unlisted"),
    ])
    def test_argmax_follows_torch_argmax(self, num_classes, classes, values, box, want):
        maps = torch.tensor(values).view(1, 2, 1, 1).expand(1, 2, 15, 15).contiguous()
        indices = torch.tensor(classes, dtype=torch.int16).view(1, 2, 1, 1).expand(
            1, 2, 15, 15).contiguous()
        got = self.check(maps, indices, torch.tensor([box]), num_classes=num_classes,
                         mode="argmax")
        assert got.argmax(-1).item() == want

    @pytest.mark.modes("softmax", "argmax")
    def test_every_class_listed_with_very_negative_logits(self, mode):
        """u == C: no unlisted class of logit 0, and e^-m would overflow."""
        values = torch.full((1, 3, 15, 15), -1000.0)
        values[0, 1] = -900.0
        indices = torch.arange(3, dtype=torch.int16).view(1, 3, 1, 1).expand(1, 3, 15, 15)
        got = self.check(values, indices.contiguous(), EDGE_BOXES[[0]], num_classes=3,
                         mode=mode)
        assert got.argmax(-1).item() == 1

    def test_reruns_are_bit_identical(self, mode):
        values, indices = make_label_maps(4, 5, 1000, seed=20)
        values[:, 1] = values[:, 0]  # equal contributions: a changed summation order shows
        boxes = torch.cat([make_boxes(2, seed=21), EDGE_BOXES[[0, 4]]])
        kwargs = dict(num_classes=1000, output_size=2, mode=mode,
                      sample_index=torch.tensor([3, 1, 1, 0]),
                      flip=torch.tensor([True, False, True, False]))
        first = self.pool(values, indices, boxes, **kwargs)
        assert torch.equal(first, self.pool(values, indices, boxes, **kwargs))
