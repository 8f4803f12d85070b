"""dali-relabel: DALI data loading with ReLabel localized multi-label targets.

Implements the LabelPooling supervision of Yun et al., "Re-labeling ImageNet: from Single to
Multi-Labels, from Global to Localized Labels" (CVPR 2021) over top-k label maps held in one
HDF5 file. See DESIGN.md for the conventions.
"""
from dali_relabel.ops import MODES, label_pooling, reference_label_pooling
from dali_relabel.store import LabelMapError, LabelMapStore, LabelMapWriter, write_labelmaps

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "LabelMapError",
    "LabelMapStore",
    "LabelMapWriter",
    "label_pooling",
    "reference_label_pooling",
    "write_labelmaps",
]
