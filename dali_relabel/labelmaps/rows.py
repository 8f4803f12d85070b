"""What a writer accepts: rows of label maps checked and converted to the stored dtypes,
and the class names, compression and provenance attributes of a new file."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from dali_relabel import _checks
from dali_relabel._paths import check_relative_paths
from dali_relabel.labelmaps.format import FORMAT_ATTRS, INT32_MAX, index_dtype

__all__ = ["COMPRESSIONS", "Rows", "as_numpy", "check_attrs", "check_classes",
           "check_compression", "check_rows", "check_sizes"]

COMPRESSIONS = (None, "gzip", "lzf")


class Rows(NamedTuple):
    """Validated rows, converted to the stored dtypes."""

    values: np.ndarray
    indices: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    sizes: np.ndarray | None

    def arrays(self) -> dict[str, np.ndarray]:
        """The datasets to write, by name (/sizes only when given)."""
        return {name: array for name, array in self._asdict().items() if array is not None}


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (bfloat16 as float32) or array-like as a numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def check_sizes(sizes: Any, num_rows: int) -> np.ndarray:
    """Image sizes as int32 [n, 2] (height, width), each in [1, 2**31 - 1]."""
    sizes = as_numpy(sizes)
    if sizes.shape != (num_rows, 2) or not np.issubdtype(sizes.dtype, np.integer):
        raise ValueError(f"sizes: expected an integer array [{num_rows}, 2] of image (height, "
                         f"width), found {sizes.dtype} {sizes.shape}")
    if sizes.size and (sizes.min() < 1 or sizes.max() > INT32_MAX):
        raise ValueError(f"sizes: expected image heights and widths >= 1 (and <= {INT32_MAX}), "
                         f"found [{sizes.min()}, {sizes.max()}]")
    return sizes.astype(np.int32)


def check_classes(classes: Sequence[str]) -> list[str]:
    """Class names as a list: non-empty, each a non-empty str, unique."""
    classes = list(classes)
    if not classes or not all(isinstance(name, str) and name for name in classes):
        raise ValueError("classes: expected a non-empty sequence of non-empty class names")
    if len(set(classes)) != len(classes):
        raise ValueError("classes: class names must be unique")
    return classes


def check_compression(compression: str | None) -> None:
    _checks.check_choice("compression", compression, COMPRESSIONS)


def check_attrs(attrs: dict[str, Any]) -> None:
    """Provenance attributes: str, int or float, none of the format's own."""
    for key, value in attrs.items():
        if key in FORMAT_ATTRS:
            raise ValueError(f"attribute {key!r} is set by the format and cannot be passed")
        if not isinstance(value, (str, int, float)):
            raise ValueError(
                f"attribute {key!r}: expected str, int or float, found {type(value).__name__}"
            )


def check_rows(
    values: Any,
    indices: Any,
    labels: Any,
    paths: Sequence[str],
    *,
    num_classes: int,
    map_shape: tuple[int, int, int] | None = None,
    sizes: Any = None,
) -> Rows:
    """Validates a block of rows and converts it to the stored dtypes.

    Args:
        values (Tensor[n, K, H, W] | ndarray): Logits, any float dtype.
        indices (Tensor[n, K, H, W] | ndarray): Class indices in [0, num_classes).
        labels (Tensor[n] | ndarray): Original labels in [-1, num_classes).
        paths: n relative image paths.
        num_classes: C.
        map_shape: Required (K, H, W), or None to accept the shape of `values`.
        sizes (Tensor[n, 2] | ndarray | None): Image (height, width) of each row.

    Returns:
        The rows as float16 values, int16/int32 indices, int64 labels, an object array of
        paths and int32 sizes (or None).

    Raises:
        ValueError: Naming the offending argument.
    """
    values, indices, labels = as_numpy(values), as_numpy(indices), as_numpy(labels)
    if values.ndim != 4 or not np.issubdtype(values.dtype, np.floating):
        raise ValueError(
            f"values: expected a float array [N, K, H, W], found {values.dtype} {values.shape}"
        )
    n = values.shape[0]
    if min(values.shape[1:]) < 1:
        raise ValueError(f"values: expected [N, K, H, W] with K, H, W >= 1, found {values.shape}")
    if map_shape is not None and values.shape[1:] != map_shape:
        raise ValueError(
            f"values: expected [N, K, H, W] with (K, H, W) = {map_shape}, found {values.shape}"
        )
    if indices.shape != values.shape or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices: expected an integer array of shape {values.shape} like values, "
            f"found {indices.dtype} {indices.shape}"
        )
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels: expected an integer array of shape ({n},), found {labels.dtype} "
            f"{labels.shape}"
        )
    paths = np.array(list(paths), dtype=object)
    if paths.shape != (n,):
        raise ValueError(f"paths: expected {n} paths (one per row of values), found {len(paths)}")
    check_relative_paths(paths.tolist())
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(
            f"indices: expected class indices in [0, {num_classes}), found "
            f"[{indices.min()}, {indices.max()}]"
        )
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(
            f"labels: expected labels in [-1, {num_classes}), found "
            f"[{labels.min()}, {labels.max()}]"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        values16 = values.astype(np.float16)
    bad = values16.size - int(np.count_nonzero(np.isfinite(values16)))
    if bad:
        raise ValueError(f"values: {bad} entries are NaN/inf or overflow float16 (|x| > 65504)")
    indices = indices.astype(index_dtype(num_classes))
    sizes = None if sizes is None else check_sizes(sizes, n)
    return Rows(values16, indices, labels.astype(np.int64), paths, sizes)
