"""Worker of tests/test_gpu.py (a GPU only): the compiled Triton kernel against the reference
on whole-pixel boxes, every mode and output size, the fused gather, flips, many classes, every
entry another class and boxes beyond the image; reruns bit-identical (no atomics)."""
import torch
from torch.testing import assert_close

from dali_relabel import MODES, label_pooling, reference_label_pooling
from labelmap_data import make_boxes, make_label_maps


def check(values, indices, boxes, num_classes, output_sizes, flip=None, sample_index=None):
    # check_inputs=False: the last case pools boxes beyond [0, 1] on purpose.
    options = dict(num_classes=num_classes, check_inputs=False)
    on_gpu = [None if t is None else t.cuda() for t in (values, indices, boxes, flip,
                                                        sample_index)]
    for output_size in output_sizes:
        for mode in MODES:
            want = reference_label_pooling(values, indices, boxes, output_size=output_size,
                                           flip=flip, sample_index=sample_index, mode=mode,
                                           **options)
            runs = [label_pooling(*on_gpu[:3], output_size=output_size, flip=on_gpu[3],
                                  sample_index=on_gpu[4], mode=mode, **options)
                    for _ in range(2)]
            assert_close(runs[0].cpu(), want, atol=1e-5, rtol=0)
            assert torch.equal(runs[0], runs[1])  # no atomics: reruns are bit-identical


def main() -> None:
    for num_classes in (1000, 21843, 40000):
        values, indices = make_label_maps(64, 5, num_classes, seed=num_classes)
        # Boxes of whole pixels of 230 x 173 images: where fused multiply-adds or approximate
        # division would change the sample count ceil(roi / S).
        pixels = (make_boxes(64, seed=1) * torch.tensor([230, 173, 230, 173])).round()
        boxes = pixels / torch.tensor([230, 173, 230, 173])
        sample_index = torch.randint(0, 64, (64,), generator=torch.Generator().manual_seed(2))
        flip = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
        check(values, indices, boxes, num_classes, (1, 2, 3, 5, 14), flip, sample_index)
    # Every pair a different ImageNet-21k class (one walk step each), and boxes beyond the
    # image whose footprints need more than one register tile.
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(3, 5, 15, 15, generator=gen) * 4
    indices = torch.randperm(21843, generator=gen)[:3 * 5 * 15 * 15].view(3, 5, 15, 15).int()
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.5, 1.5], [-0.4, 0.2, 1.3, 0.6]])
    check(values, indices, boxes, 21843, (1, 3))


if __name__ == "__main__":
    main()
