"""Worker of tests/test_gpu_augment.py (a GPU only): the augmented, mixed loader with the GPU
decoder and the graph on the device against the same loader on the CPU.

Usage: python gpu_augment.py IMAGE_ROOT LABELMAPS
"""
import sys

import torch
from torch.testing import assert_close

from dali_relabel import ReLabelLoader


def main() -> None:
    root, store_path = sys.argv[1:3]
    kwargs = dict(image_size=32, seed=3, return_meta=True, output_size=2,
                  color_jitter=(0.4, 0.4, 0.4, 0.1), force_color_jitter=True, lighting=0.1,
                  auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5, mixup_alpha=0.8,
                  cutmix_alpha=1.0, mixup_mode="elem")
    for placement in ("device", "mmap"):  # fused gather, and rows gathered on the host
        cpu = list(ReLabelLoader(root, store_path, 8, device="cpu", **kwargs))
        gpu = list(ReLabelLoader(root, store_path, 8, device="cuda",
                                 labelmaps_placement=placement, **kwargs))
        assert len(cpu) == len(gpu) > 0
        for a, b in zip(cpu, gpu):
            assert b.images.is_cuda and b.targets.is_cuda and b.lam.is_cuda
            # The same plan: the same crops, parameters, mixing and targets.
            assert torch.equal(a.cut_box, b.cut_box.cpu()) and torch.equal(a.lam, b.lam.cpu())
            assert_close(a.targets, b.targets.cpu(), atol=1e-5, rtol=0)
            # Pixels differ by the decoders (nvJPEG and libjpeg-turbo) and what thresholds
            # (solarize, posterize, equalize) make of that, not by the augmentations drawn.
            diff = (a.images - b.images.cpu()).abs().flatten(1).mean(1)
            assert diff.median() < 0.1, diff


if __name__ == "__main__":
    main()
