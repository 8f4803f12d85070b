"""Test utilities: random top-k label maps and crop boxes shaped like the real ones, and a
label-map job killed mid-way."""
import textwrap

import pytest
import torch

# `python -c KILLED_AFTER_TWO_WRITES <dali-relabel arguments>`: runs the command and kills
# itself (SIGKILL: no clean-up of any kind) right after the second LabelMapWriter.write.
KILLED_AFTER_TWO_WRITES = textwrap.dedent("""
    import os, signal, sys
    from dali_relabel.cli import main
    from dali_relabel.labelmaps import LabelMapWriter

    write, calls = LabelMapWriter.write, []

    def write_then_die(self, *args, **kwargs):
        write(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    LabelMapWriter.write = write_then_die
    sys.exit(main(sys.argv[1:]))
""")


def make_label_maps(num_rows: int, topk: int, num_classes: int, *, height: int = 15,
                    width: int = 15, dtype: torch.dtype = torch.float16, seed: int = 0):
    """Random top-k label maps shaped like an annotator's: each image draws a few classes it
    'contains', every cell lists `topk` distinct ones of them with logit-like values."""
    gen = torch.Generator().manual_seed(seed)
    pool_size = max(topk, min(num_classes, 8))
    values = torch.empty(num_rows, topk, height, width)
    indices = torch.empty(num_rows, topk, height, width, dtype=torch.int64)
    for n in range(num_rows):
        pool = torch.randperm(num_classes, generator=gen)[:pool_size]
        choice = torch.rand(height, width, pool_size, generator=gen).argsort(dim=-1)[..., :topk]
        indices[n] = pool[choice].permute(2, 0, 1)
        values[n] = torch.randn(topk, height, width, generator=gen) * 4
    index_dtype = torch.int16 if num_classes <= 32767 else torch.int32
    return values.to(dtype), indices.to(index_dtype)


def make_boxes(num_boxes: int, *, seed: int = 0) -> torch.Tensor:
    """Boxes as RandomResizedCrop makes them (scale 0.08-1, ratio 3/4-4/3), normalized."""
    gen = torch.Generator().manual_seed(seed)
    area = torch.empty(num_boxes).uniform_(0.08, 1.0, generator=gen)
    log_ratio = torch.empty(num_boxes).uniform_(-0.2877, 0.2877, generator=gen)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    x1 = torch.rand(num_boxes, generator=gen) * (1 - w)
    y1 = torch.rand(num_boxes, generator=gen) * (1 - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


# Boxes at the map's edges and degenerate ones: whole image, one pixel wide or high, at the
# borders, empty.
EDGE_BOXES = torch.tensor([
    [0.0, 0.0, 1.0, 1.0],
    [0.3, 0.2, 0.302, 0.9],
    [0.1, 0.5, 0.8, 0.502],
    [0.0, 0.1, 0.3, 0.7],
    [0.6, 0.2, 1.0, 0.9],
    [0.2, 0.0, 0.5, 0.4],
    [0.1, 0.7, 0.9, 1.0],
    [0.9, 0.9, 1.0, 1.0],
    [0.5, 0.5, 0.5, 0.5],
])


def repeat_in_cell(values, indices):
    indices[:, 1] = indices[:, 0]
    return values, indices


def same_classes_everywhere(values, indices):
    # Every cell lists the same 3 classes: each class gathers pairs from the whole footprint.
    indices[:] = torch.tensor([7, 3, 5], dtype=indices.dtype).view(1, 3, 1, 1)
    return values, indices


def repeat_in_cell_and_everywhere(values, indices):
    indices[:, 1] = indices[:, 0]
    indices[:, 2] = 11
    return values, indices


# Changes to 3-class-per-cell maps of 20 classes; the densified map sums repeated entries.
REPEATED_CLASSES = [
    pytest.param(repeat_in_cell, id="class-twice-in-a-cell"),
    pytest.param(same_classes_everywhere, id="same-classes-in-every-cell"),
    pytest.param(repeat_in_cell_and_everywhere, id="twice-in-a-cell-and-everywhere"),
]
