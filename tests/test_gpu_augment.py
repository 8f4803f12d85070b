"""The augmentations and mixing on a GPU ("mixed" decoding, the graph on the device), against
the same loader on the CPU, which the rest of the suite checks in detail.

Skipped without CUDA (the CI machine has none). Runs in a subprocess without triton's
interpreter (conftest.py switches it on for the session), so the kernels compile for the GPU.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jpeg_data import make_jpeg_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CHECK = textwrap.dedent("""
    import sys
    import torch
    from torch.testing import assert_close
    from dali_relabel import ReLabelLoader

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
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_jpeg_dataset(tmp_path_factory.mktemp("gpu_augment"))


def test_augmented_mixed_loader_on_cuda_matches_cpu(dataset):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CHECK, *dataset], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
