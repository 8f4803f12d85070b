"""The lines only a GPU runs: the compiled Triton kernel and the loaders' CUDA paths.

Skipped without CUDA (the CI machine has none; every path here has a CPU twin that the rest
of the suite runs). conftest.py switches triton's interpreter on for the session, so the checks
run as workers (tests/workers/gpu_*.py) in a subprocess without it, where the kernel is
compiled for the GPU.
"""
import gc

import pytest
import torch

from dali_relabel import LabelMapStore, write_labelmaps
from labelmap_data import make_label_maps
from script_runner import run_worker_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def run_worker(name: str, *args) -> None:
    result = run_worker_script(name, *args, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_compiled_triton_kernel_matches_reference():
    run_worker("gpu_kernel.py")


def test_every_launch_of_the_grid_matches_reference():
    run_worker("gpu_grid.py")


def test_loaders_on_cuda(dataset):
    run_worker("gpu_loaders.py", *dataset)


def test_pinned_store_is_page_locked_in_place(tmp_path):
    values, indices = make_label_maps(37, 5, 1000, seed=7)
    path = tmp_path / "maps.h5"
    write_labelmaps(path, values, indices, labels=torch.arange(37) % 1000,
                    paths=[f"img_{n}.JPEG" for n in range(37)],
                    classes=[f"class_{c}" for c in range(1000)])
    torch.cuda.init()  # host_memory_stats() is empty before
    grown = torch.cuda.host_memory_stats()["num_host_alloc"]
    pinned = LabelMapStore.open(path, placement="pinned")
    mapped = LabelMapStore.open(path, placement="mmap")
    for name in ("values", "indices", "labels"):
        tensor = getattr(pinned, name)
        assert tensor.is_pinned() and torch.equal(tensor, getattr(mapped, name))
    # Registered in place: torch's caching host allocator, which rounds up to powers of two,
    # did not grow.
    assert torch.cuda.host_memory_stats()["num_host_alloc"] == grown
    row = pinned.values[3]
    pinned.close()
    gc.collect()
    assert row.is_pinned()  # the registration lives as long as a view of the memory
    assert torch.equal(row.to("cuda", non_blocking=True).cpu(), mapped.values[3])
