"""Worker of tests/test_gpu.py (a GPU only): the loaders with the GPU decoder, targets from the
store on the device (fused gather) and from host-gathered rows against the reference, and the
same crops as the CPU loader.

Usage: python gpu_loaders.py IMAGE_ROOT LABELMAPS
"""
import sys

from torch.testing import assert_close

from dali_relabel import LabelMapStore, ReLabelLoader, ValLoader, reference_label_pooling


def main() -> None:
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


if __name__ == "__main__":
    main()
