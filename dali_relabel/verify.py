"""Find the images a training run would choke on, before it starts.

A truncated or corrupt JPEG fails its whole DALI batch, and a zero-byte file can stop a reader
for good; 300 epochs should not end on one bad file. ``verify_images`` decodes every listed
file with the decoder the loaders use (DALI's, on the CPU, in parallel), and the bad ones go
to a list that ``ReLabelLoader(exclude=...)`` and ``ValLoader(exclude=...)`` accept.

The list format (``write_bad_list`` writes it, ``read_path_list`` reads it): one image per
line, its relative path, then optionally a TAB and the reason; lines that start with '#'
are comments. A path may hold '#' and spaces, so nothing else is cut.
"""
import logging
import os
from typing import List, Sequence, Tuple, Union

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from tqdm import tqdm

from dali_relabel._utils import atomic_path, relative_path_problem

__all__ = ["read_path_list", "verify_images", "write_bad_list"]

logger = logging.getLogger(__name__)


@pipeline_def(exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
def _decode_pipeline(decoder_device: str, adjust_orientation: bool):
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
    return fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB,
                             adjust_orientation=adjust_orientation, jpeg_fancy_upsampling=True)


class _Decoder:
    """A CPU decode pipeline, rebuilt after a failure (a failed DALI pipeline stays invalid)."""

    def __init__(self, batch_size: int, num_threads: int, decoder_device: str,
                 adjust_orientation: bool) -> None:
        self._args = dict(batch_size=batch_size, num_threads=num_threads,
                          device_id=0 if decoder_device == "mixed" else None,
                          decoder_device=decoder_device, adjust_orientation=adjust_orientation)
        self._pipe = None

    def decode(self, buffers: List[np.ndarray]) -> None:
        """Raises RuntimeError (DALI's message) if any buffer fails to decode."""
        if self._pipe is None:
            self._pipe = _decode_pipeline(**self._args)
            self._pipe.build()
        try:
            self._pipe.feed_input("encoded", buffers)
            self._pipe.run()
        except RuntimeError:
            self._pipe = None
            raise


def _reason(error: Exception) -> str:
    """DALI's line that says what failed (its message starts with the graph's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = [line for line in lines if line.lower().startswith(("failed to decode", "assert"))]
    return f"decoding failed: {(detail or lines or [type(error).__name__])[0].rstrip(' :')}"


def verify_images(image_root: str, paths: Sequence[str], *, batch_size: int = 64,
                  num_threads: int = 2, decoder_device: str = "cpu",
                  adjust_orientation: bool = False,
                  progress: bool = True) -> List[Tuple[str, str]]:
    """Decode every image; return the bad ones as (relative path, reason).

    Args:
        image_root: Folder the paths are relative to.
        paths: Relative image paths ('/' separated), e.g. a store's /paths.
        batch_size: Files decoded per DALI batch.
        num_threads: DALI decoding threads.
        decoder_device: "cpu", or "mixed" to decode on the GPU (device 0) as GPU training
            does; the two decoders can disagree on marginal files.
        adjust_orientation: Decode as a loader with this setting would.
        progress: Show a progress bar.
    """
    if batch_size < 1 or num_threads < 1:
        raise ValueError(f"batch_size and num_threads must be >= 1, got {batch_size}, "
                         f"{num_threads}")
    if decoder_device not in ("cpu", "mixed"):
        raise ValueError(f"decoder_device must be 'cpu' or 'mixed', got {decoder_device!r}")
    decoder = _Decoder(batch_size, num_threads, decoder_device, adjust_orientation)
    bad: List[Tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="verify", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch, buffers = [], []
        for path in paths[start:start + batch_size]:
            try:
                with open(os.path.join(image_root, path), "rb") as f:
                    data = f.read()
            except OSError as error:
                bad.append((path, f"unreadable: {error.strerror or error}"))
                continue
            if not data:
                bad.append((path, "empty file (0 bytes)"))
                continue
            batch.append(path)
            buffers.append(np.frombuffer(data, dtype=np.uint8))
        if buffers:
            try:
                decoder.decode(buffers)
            except RuntimeError:
                # Some file of the batch is bad: decode them one by one to name it.
                for path, buffer in zip(batch, buffers):
                    try:
                        decoder.decode([buffer])
                    except RuntimeError as error:
                        bad.append((path, _reason(error)))
        bar.update(min(batch_size, len(paths) - start))
        bar.set_postfix(bad=len(bad))
    bar.close()
    return bad


def write_bad_list(path: str, bad: Sequence[Tuple[str, str]]) -> None:
    """Write the bad images as a path list (atomically): one per line, the relative path, a
    TAB and the reason (with any line break in the reason turned into a space).

    Args:
        path: The list file to write.
        bad: (relative path, reason) pairs, as `verify_images` returns them.

    Raises:
        ValueError: A path that the list cannot hold (see `relative_path_problem`).
    """
    lines = ["# images that failed to decode (dali-relabel verify): path TAB reason; "
             "pass as exclude=\n"]
    for image, reason in bad:
        problem = relative_path_problem(image)
        if problem is not None:
            raise ValueError(f"bad: {problem}, found {image!r}")
        lines.append(f"{image}\t{' '.join(reason.split())}\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def read_path_list(exclude: Union[None, str, os.PathLike, Sequence[str]]) -> List[str]:
    """Relative image paths from a path list file, or from a sequence of paths.

    A file holds one image per line: the relative path, then optionally a TAB and anything
    (the reason `write_bad_list` wrote). Blank lines and lines whose first character is '#'
    are skipped; a '#' elsewhere is part of the path.

    Args:
        exclude: None (no paths), a list file, or the paths themselves.

    Returns:
        The paths, in the order given.

    Raises:
        ValueError: The file is missing or unreadable, or a line holds no relative,
            normalized path (both named).
    """
    if exclude is None:
        return []
    if not isinstance(exclude, (str, os.PathLike)):
        return [str(path) for path in exclude]
    try:
        with open(exclude, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"exclude: cannot read the path list {os.fspath(exclude)} "
                         f"({getattr(e, 'strerror', None) or e})") from e
    paths = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path = line.split("\t", 1)[0]
        problem = relative_path_problem(path)
        if problem is not None:
            raise ValueError(f"exclude: {os.fspath(exclude)} line {number}: {problem}, found "
                             f"{path!r}")
        paths.append(path)
    return paths
