"""LabelPooling, the op that turns a crop box into its ReLabel target, and its sparse form.

``label_pooling`` (a torch custom op: compiled C++ on CPU, Triton on CUDA, both in
``kernels/``) and ``reference_label_pooling`` (densify + torchvision's roi_align, the ground
truth) in ``label_pooling.py``; ``sparse_label_pooling``, ``SparseTargets`` and the loss that
takes them in ``sparse_targets.py``; ``testing``, the kernel launches the project makes (for
tests and checks, as ``torch.testing``).
"""
from dali_relabel.ops.label_pooling import (MAX_OUTPUT_SIZE, MODES, label_pooling,
                                            reference_label_pooling)
from dali_relabel.ops.sparse_targets import (SparseTargets, soft_target_cross_entropy,
                                             sparse_label_pooling)
from dali_relabel.ops import testing

__all__ = ["MAX_OUTPUT_SIZE", "MODES", "SparseTargets", "label_pooling",
           "reference_label_pooling", "soft_target_cross_entropy", "sparse_label_pooling",
           "testing"]
