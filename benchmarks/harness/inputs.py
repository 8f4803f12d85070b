"""Random inputs of LabelPooling: top-k label maps shaped like an annotator's and crop boxes
drawn as RandomResizedCrop draws them. ImageNet's sizes: C = 1000 classes, top-5 label maps
of 15 x 15 cells."""
import math

import torch

NUM_CLASSES = 1000
TOPK = 5
MAP_SIZE = 15


def make_inputs(batch: int, topk: int, num_classes: int, classes_per_image: int = 32,
                seed: int = 0):
    """Random top-k maps shaped like an annotator's: each image draws `classes_per_image`
    classes it 'contains' and each cell lists `topk` distinct ones of them (0: every cell draws
    from all C classes, the worst case for the sparse epilogue); and square boxes.

    Returns:
        values (Tensor[B, K, 15, 15] float16), indices (Tensor[B, K, 15, 15] int16, int32
        past 32767 classes), boxes (Tensor[B, 4] float32 (x1, y1, x2, y2), normalized).
    """
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(batch, topk, MAP_SIZE, MAP_SIZE, generator=gen) * 4).half()
    cells = (batch, MAP_SIZE, MAP_SIZE)
    if classes_per_image > 0:
        pool_size = max(topk, min(classes_per_image, num_classes))
        pools = torch.rand(batch, num_classes, generator=gen).argsort(dim=1)[:, :pool_size]
        picks = torch.rand(*cells, pool_size, generator=gen).argsort(dim=-1)[..., :topk]
        indices = torch.gather(pools[:, None, None, :].expand(*cells, pool_size), 3, picks)
    else:
        base = torch.randint(0, num_classes, (*cells, 1), generator=gen)
        step = torch.randint(1, num_classes // topk + 1, (*cells, 1), generator=gen)
        indices = (base + step * torch.arange(topk)) % num_classes
    indices = indices.permute(0, 3, 1, 2)
    index_dtype = torch.int16 if num_classes <= 32767 else torch.int32
    area = torch.empty(batch).uniform_(0.08, 1.0, generator=gen)
    side = area.sqrt()
    x1 = torch.rand(batch, generator=gen) * (1 - side)
    y1 = torch.rand(batch, generator=gen) * (1 - side)
    boxes = torch.stack([x1, y1, x1 + side, y1 + side], dim=1)
    return values, indices.to(index_dtype).contiguous(), boxes


def random_boxes(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Tensor[B, 4] float32 (x1, y1, x2, y2), normalized: RandomResizedCrop's area (0.08-1)
    and aspect ratio (3/4-4/3) ranges, clipped to the image."""
    area = torch.empty(batch).uniform_(0.08, 1.0, generator=gen)
    log_ratio = torch.empty(batch).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    x1 = torch.rand(batch, generator=gen) * (1 - w)
    y1 = torch.rand(batch, generator=gen) * (1 - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)
