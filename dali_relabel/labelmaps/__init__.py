"""The label-map file: one HDF5 file of top-k ReLabel label maps (format version 1).

``LabelMapStore.open`` validates and places a file (memory-mapped, in memory, pinned or on
the GPU); ``write_labelmaps`` and ``LabelMapWriter`` write one; ``read_header`` validates the
metadata alone; ``add_sizes`` records the images' sizes. docs/labelmaps.md describes the
format.
"""
from dali_relabel.labelmaps.store import (PLACEMENTS, LabelMapError, LabelMapStore,
                                          LabelMapWriter, add_sizes, read_header,
                                          write_labelmaps)

__all__ = ["PLACEMENTS", "LabelMapError", "LabelMapStore", "LabelMapWriter", "add_sizes",
           "read_header", "write_labelmaps"]
