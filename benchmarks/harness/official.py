"""The official ReLabel input pipeline (naver-ai/relabel_imagenet, utils/relabel_functions.py
and utils/data_loader.py; Yun et al., CVPR 2021), the baseline of the benchmarks, minus
ColorJitter and the PCA lighting noise (no loader here applies them).

An ImageFolder whose __getitem__ opens the JPEG with PIL, applies RandomResizedCrop returning
its coordinates, a horizontal flip, ToTensor and Normalize, and torch.load()s the image's own
[2, K, 15, 15] `.pt` label map; a DataLoader; then, per batch in the main process, the target
code: densify into zeros [B, C, 15, 15] with a scatter_ per sample, torchvision roi_align,
softmax. The official code hands roi_align its crop as (y1, x1, y2, x2); here the columns are
in torchvision's (x1, y1, x2, y2) order, the project's convention (same cost, correct
targets).
"""
import os
from typing import Iterator, Sequence

import torch
import torchvision
from torchvision.ops import roi_align
from torchvision.transforms import functional as torchvision_F

from harness.inputs import NUM_CLASSES

IMAGE_SIZE = 224
IMAGENET_MEAN_01 = (0.485, 0.456, 0.406)
IMAGENET_STD_01 = (0.229, 0.224, 0.225)


class RandomResizedCropWithCoords(torchvision.transforms.RandomResizedCrop):
    """RandomResizedCrop that also returns (top/H, left/W, height/H, width/W)."""

    def __call__(self, img):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        coords = (i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0])
        return torchvision_F.resized_crop(img, i, j, h, w, self.size, self.interpolation), coords


class ComposeWithCoords(torchvision.transforms.Compose):
    def __call__(self, img):
        coords = None
        for t in self.transforms:
            if isinstance(t, RandomResizedCropWithCoords):
                img, coords = t(img)
            else:
                img = t(img)
        return img, coords


def pt_path(relative_image_path: str) -> str:
    """The official code's label-map path for an image: class/stem.pt."""
    return "/".join(relative_image_path.split("/")[-2:]).split(".")[0] + ".pt"


class ImageFolderWithCoordsAndLabelMap(torchvision.datasets.ImageFolder):
    """ImageFolder that loads each image's label map from its own .pt file."""

    def __init__(self, relabel_root: str, **kwargs):
        self.relabel_root = relabel_root
        super().__init__(**kwargs)

    def __getitem__(self, index):
        path, target = self.samples[index]
        score_path = os.path.join(self.relabel_root, pt_path(path))
        sample = self.loader(path)  # PIL: Image.open(f).convert("RGB")
        sample, coords = self.transform(sample)
        score_maps = torch.load(score_path)
        return sample, target, coords, score_maps


def official_dataset(image_root: str, relabel_root: str,
                     image_size: int = IMAGE_SIZE) -> ImageFolderWithCoordsAndLabelMap:
    transform = ComposeWithCoords(transforms=[
        RandomResizedCropWithCoords(size=image_size, scale=(0.08, 1)),  # bilinear
        torchvision.transforms.RandomHorizontalFlip(),
        torchvision.transforms.ToTensor(),
        torchvision.transforms.Normalize(mean=IMAGENET_MEAN_01, std=IMAGENET_STD_01),
    ])
    return ImageFolderWithCoordsAndLabelMap(relabel_root=relabel_root, root=image_root,
                                            transform=transform)


def official_loader(image_root: str, relabel_root: str, batch_size: int, workers: int,
                    device: torch.device) -> torch.utils.data.DataLoader:
    """The official DataLoader: W workers, shuffle, drop_last, persistent workers."""
    return torch.utils.data.DataLoader(
        official_dataset(image_root, relabel_root), batch_size=batch_size, shuffle=True,
        num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=workers > 0)


def official_boxes(coords: Sequence[torch.Tensor]) -> torch.Tensor:
    """Collated crop coordinates -> [B, 4] float32 (x1, y1, x2, y2), normalized.

    As relabel_batch_fn: (top, left, h, w) -> (y1, x1, y2, x2); then, unlike the official
    code, the columns in roi_align's (x1, y1, x2, y2) order (the project's convention).
    """
    coords = torch.cat(coords, 0).view(4, -1).transpose(1, 0)
    coords[:, 2:] += coords[:, :2]
    return coords[:, [1, 0, 3, 2]].float()


def densify(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The official get_labelmaps: top-k maps [B, K, H, W] into zeros [B, C, H, W] float32 on
    the host, one scatter_ per sample."""
    batch, _, height, width = values.shape
    dense = torch.zeros(batch, num_classes, height, width)
    for dense_map, top_values, top_indices in zip(dense, values, indices):
        dense_map.scatter_(0, top_indices.long(), top_values.float())
    return dense


def dense_targets(dense: torch.Tensor, boxes: torch.Tensor, output_size: int = 1
                  ) -> torch.Tensor:
    """The official get_relabel on dense maps [B, C, H, W]: torchvision roi_align of each
    box (x1, y1, x2, y2, normalized) into S x S bins, softmax over the classes.

    Returns:
        Tensor[B, C, S*S] float32.
    """
    batch = dense.shape[0]
    boxes = boxes.float()
    rois = torch.cat([torch.arange(batch, device=boxes.device, dtype=boxes.dtype)[:, None],
                      boxes * dense.size(3) - 0.5], dim=1)
    pooled = roi_align(dense, rois, output_size=(output_size, output_size), spatial_scale=1.0,
                       sampling_ratio=-1, aligned=False)
    return pooled.flatten(2).softmax(dim=1)


def official_targets(label_maps_topk: torch.Tensor, boxes: torch.Tensor,
                     device: torch.device, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """The official get_labelmaps + get_relabel: host densify, copy, roi_align, softmax.

    Args:
        label_maps_topk (Tensor[B, 2, K, H, W]): float32 values and class indices, as loaded.
        boxes (Tensor[B, 4]): (x1, y1, x2, y2) normalized, on `device`.
    Returns:
        Tensor[B, C] float32 softmax targets on `device`.
    """
    dense = densify(label_maps_topk[:, 0], label_maps_topk[:, 1], num_classes).to(device)
    return dense_targets(dense, boxes)[..., 0]


def official_batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator:
    """Endless (images, targets) of the official loader, images and targets on `device`."""
    while True:
        for images, _, coords, label_maps in loader:
            images = images.to(device, non_blocking=True)
            boxes = official_boxes(coords).to(device, non_blocking=True)
            yield images, official_targets(label_maps, boxes, device)
