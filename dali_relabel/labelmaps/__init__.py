"""The label-map file: one HDF5 file of top-k ReLabel label maps (format version 1).

One module per job: ``format`` defines the file and validates it when opened
(``read_header``, ``read_paths``, ``open_h5``, ``LabelMapError``); ``writer`` writes one
(``write_labelmaps``, the resumable ``LabelMapWriter``, ``add_sizes`` for the images'
sizes), through ``rows``' checks of what a row may hold; ``store`` places one for the
loaders (``LabelMapStore``: memory-mapped, in memory, pinned or on the GPU); ``scan`` reads
every row (``scan_file``). docs/labelmaps.md describes the format.
"""
from dali_relabel.labelmaps.format import (FORMAT, VERSION, DatasetLayout, LabelMapError,
                                           LabelMapHeader, open_h5, read_header, read_paths)
from dali_relabel.labelmaps.scan import scan_file
from dali_relabel.labelmaps.store import PLACEMENTS, LabelMapStore
from dali_relabel.labelmaps.writer import LabelMapWriter, add_sizes, write_labelmaps

__all__ = ["FORMAT", "PLACEMENTS", "VERSION", "DatasetLayout", "LabelMapError",
           "LabelMapHeader", "LabelMapStore", "LabelMapWriter", "add_sizes", "open_h5",
           "read_header", "read_paths", "scan_file", "write_labelmaps"]
