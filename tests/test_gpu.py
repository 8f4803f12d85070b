"""The lines only a GPU runs: the compiled Triton kernel and the loaders' CUDA paths.

Skipped without CUDA (the CI machine has none; every path here has a CPU twin that the rest
of the suite runs). conftest.py switches triton's interpreter on for the session, so these
run in a subprocess without it, where the kernel is compiled for the GPU.
"""
import gc
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from labelmap_data import make_label_maps
from dali_relabel import LabelMapStore, write_labelmaps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KERNEL = textwrap.dedent("""
    import sys
    import torch
    from torch.testing import assert_close
    sys.path.insert(0, sys.argv[1])
    from labelmap_data import make_boxes, make_label_maps
    from dali_relabel import MODES, label_pooling, reference_label_pooling

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
""")

GRID = textwrap.dedent("""
    import torch
    from dali_relabel import label_pooling, reference_label_pooling
    from dali_relabel.ops import testing

    # Every launch the project makes (dali_relabel.ops.testing), compiled by Triton's JIT for
    # this GPU, against the reference on the same device; reruns bit-identical.
    failures = []
    for name, kwargs in testing.launches("cuda"):
        runs = [label_pooling(**kwargs, check_inputs=False) for _ in range(2)]
        want = reference_label_pooling(**kwargs, check_inputs=False)
        diff = float((runs[0] - want).abs().max())
        if not diff <= 1e-5 or not torch.equal(runs[0], runs[1]):
            failures.append((name, diff))
    assert not failures, failures[:20]
""")

LOADER = textwrap.dedent("""
    import sys
    import torch
    from torch.testing import assert_close
    from dali_relabel import LabelMapStore, ReLabelLoader, ValLoader, reference_label_pooling

    root, store_path = sys.argv[1:3]
    store = LabelMapStore.open(store_path, placement="memory")
    for fused in (True, False):
        loader = ReLabelLoader(root, store_path, 8, device="cuda", image_size=32, output_size=2,
                               fused_gather=fused, return_meta=True,
                               labelmaps_placement="device" if fused else "mmap")
        for batch in loader:
            assert batch.images.is_cuda and batch.targets.is_cuda
            rows, boxes, flip = (t.cpu() for t in (batch.sample_index, batch.boxes, batch.flip))
            want = reference_label_pooling(store.values, store.indices, boxes,
                                           num_classes=store.num_classes, output_size=2,
                                           flip=flip, sample_index=rows)
            assert_close(batch.targets.cpu(), want, atol=1e-5, rtol=0)
    cpu = [b.images for b in ReLabelLoader(root, store_path, 8, device="cpu", image_size=32,
                                           seed=5, return_meta=True)]
    gpu = [b.images for b in ReLabelLoader(root, store_path, 8, device="cuda", image_size=32,
                                           seed=5, return_meta=True)]
    for a, b in zip(cpu, gpu):  # nvJPEG and libjpeg-turbo differ by a little, not by crops
        assert (a - b.cpu()).abs().mean() < 0.05
    images, labels = next(iter(ValLoader(root, 8, device="cuda", image_size=32,
                                         resize_size=40)))
    assert images.is_cuda and labels.is_cuda and images.shape == (8, 3, 32, 32)
""")


def run_without_interpreter(code: str, *args: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_compiled_triton_kernel_matches_reference():
    run_without_interpreter(KERNEL, os.path.dirname(__file__))


def test_every_launch_of_the_grid_matches_reference():
    run_without_interpreter(GRID)


def test_loaders_on_cuda(dataset):  # noqa: F811
    run_without_interpreter(LOADER, *dataset)


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
