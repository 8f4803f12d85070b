"""The jobs behind the `dali-relabel` command: ``annotate`` (label maps from a timm
classifier), ``import_pt`` (the official release), ``show_labelmap`` (a map over its image),
``make_synthetic_imagenet`` (a small data set to try the loaders on); ``jobs.py`` keeps
resumed jobs consistent. Each loads its heavier dependencies on first use."""

__all__ = ["LOGIT_SCALE", "annotate", "import_pt", "make_synthetic_imagenet", "show_labelmap"]

_MODULES = {"annotate": "annotate", "import_pt": "import_pt", "LOGIT_SCALE": "synthetic",
            "make_synthetic_imagenet": "synthetic", "show_labelmap": "show"}


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(f"dali_relabel.tools.{_MODULES[name]}"), name)
    raise AttributeError(f"module 'dali_relabel.tools' has no attribute {name!r}")
