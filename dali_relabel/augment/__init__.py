"""The training loader's augmentations, one module per family, as timm's: colour jitter and
PCA lighting (``color.py``), auto-augment policies (``auto_augment.py``), random erasing
(``random_erasing.py``); ``Augmentations`` checks and ties them, ``AugmentDraws`` holds what
an epoch drew. The colour and policy modules build DALI graph operations and load DALI on
first use; the draws and random erasing need only torch.
"""
from dali_relabel.augment.draws import AugmentDraws, PerSample
from dali_relabel.augment.random_erasing import RE_MODES, random_erase

__all__ = ["Augmentations", "AugmentDraws", "PerSample", "RE_MODES", "parse_auto_augment",
           "parse_color_jitter", "random_erase"]

_DALI_NAMES = {"Augmentations": "augmentations", "parse_auto_augment": "auto_augment",
               "parse_color_jitter": "color"}


def __getattr__(name: str):
    if name in _DALI_NAMES:
        import importlib

        module = importlib.import_module(f"dali_relabel.augment.{_DALI_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'dali_relabel.augment' has no attribute {name!r}")
