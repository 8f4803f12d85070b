"""dali-relabel: DALI data loading with ReLabel localized multi-label targets.

Implements the LabelPooling supervision of Yun et al., "Re-labeling ImageNet: from Single to
Multi-Labels, from Global to Localized Labels" (CVPR 2021) over top-k label maps held in one
HDF5 file. docs/design.md states the conventions and the design.
"""
from dali_relabel.ops import MODES, label_pooling, reference_label_pooling
from dali_relabel.sparse_targets import (SparseTargets, soft_target_cross_entropy,
                                         sparse_label_pooling)
from dali_relabel.store import LabelMapError, LabelMapStore, LabelMapWriter, write_labelmaps

__version__ = "0.1.0"

# The loaders import DALI; load them on first use so the op and the store stay light.
_LOADER_NAMES = ("LABEL_MODES", "ReLabelBatch", "ReLabelLoader", "ValLoader")

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
    *_LOADER_NAMES,
]


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from dali_relabel import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'dali_relabel' has no attribute {name!r}")
