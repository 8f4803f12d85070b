"""dali-relabel: DALI data loading with ReLabel localized multi-label targets.

Implements the LabelPooling supervision of Yun et al., "Re-labeling ImageNet: from Single to
Multi-Labels, from Global to Localized Labels" (CVPR 2021) over top-k label maps held in one
HDF5 file. The subpackages: ``ops`` (LabelPooling and its kernels), ``labelmaps`` (the file),
``images`` (image files), ``augment`` (augmentations), ``loading`` (the loaders), ``tools``
(the command line's jobs). docs/design.md states the conventions and the design.
"""
from dali_relabel.labelmaps import LabelMapError, LabelMapStore, LabelMapWriter, write_labelmaps
from dali_relabel.ops import (MODES, SparseTargets, label_pooling, reference_label_pooling,
                              soft_target_cross_entropy, sparse_label_pooling)

__version__ = "0.1.0"

# The loaders import DALI; load them on first use so the op and the store stay light.
_LOADING_NAMES = ("LABEL_MODES", "MIXUP_MODES", "ReLabelBatch", "ReLabelLoader", "ValLoader")

__all__ = [
    "MODES",
    "LabelMapError",
    "LabelMapStore",
    "LabelMapWriter",
    "SparseTargets",
    "label_pooling",
    "reference_label_pooling",
    "soft_target_cross_entropy",
    "sparse_label_pooling",
    "write_labelmaps",
    *_LOADING_NAMES,
]


def __getattr__(name: str):
    if name in _LOADING_NAMES:
        from dali_relabel import loading
        return getattr(loading, name)
    raise AttributeError(f"module 'dali_relabel' has no attribute {name!r}")
