"""The augmentations and mixing on a GPU ("mixed" decoding, the graph on the device), against
the same loader on the CPU, which the rest of the suite checks in detail.

Skipped without CUDA (the CI machine has none). Runs as a worker (tests/workers/gpu_augment.py)
in a subprocess without triton's interpreter (conftest.py switches it on for the session), so
the kernels compile for the GPU.
"""
import pytest
import torch

from jpeg_data import make_jpeg_dataset
from script_runner import run_worker_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_jpeg_dataset(tmp_path_factory.mktemp("gpu_augment"))


def test_augmented_mixed_loader_on_cuda_matches_cpu(dataset):
    result = run_worker_script("gpu_augment.py", *dataset, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
