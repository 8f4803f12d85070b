"""The loaders: ``ReLabelLoader`` (training: planned crops, DALI decoding, ReLabel targets)
and ``ValLoader`` (evaluation), and what a training script needs beside them.

An epoch is planned on the host (``plan.py``), decoded by one DALI pipeline per epoch
(``decoder.py``, ``pipeline.py``, ``decode_choice.py``), given its targets (``targets.py``)
and mixed (``mixing.py``); ``train_loader.py`` ties them together. The loaders load DALI on
first use; the rest needs only torch. docs/training.md explains them.
"""
from dali_relabel.loading.common import resolve_device
from dali_relabel.loading.mixing import MIXUP_MODES, Mixer, Mixing, smooth_targets
from dali_relabel.loading.plan import EpochPlan, EpochPlanner, random_resized_crop_windows
from dali_relabel.loading.targets import LABEL_MODES, TargetMaker

# The loader's parts (planner, targets, mixing) are public for pipelines of one's own and for
# the DALI-free checks of benchmarks/gpu_check.py.
__all__ = ["LABEL_MODES", "MIXUP_MODES", "EpochPlan", "EpochPlanner", "Mixer", "Mixing",
           "ReLabelBatch", "ReLabelLoader", "TargetMaker", "ValLoader",
           "random_resized_crop_windows", "resolve_device", "smooth_targets"]


def __getattr__(name: str):
    if name in ("ReLabelLoader", "ReLabelBatch"):
        from dali_relabel.loading import train_loader
        return getattr(train_loader, name)
    if name == "ValLoader":
        from dali_relabel.loading.val_loader import ValLoader
        return ValLoader
    raise AttributeError(f"module 'dali_relabel.loading' has no attribute {name!r}")
