"""Find the images a training run would choke on, before it starts.

A truncated or corrupt JPEG fails its whole DALI batch, and a zero-byte file can stop a reader
for good; 300 epochs should not end on one bad file. ``verify_images`` decodes every listed
file with the decoder the loaders use (DALI's, on the CPU, in parallel), and the bad ones go
to a list (``path_lists.write_bad_list``) that ``ReLabelLoader(exclude=...)`` and
``ValLoader(exclude=...)`` accept.
"""
import io
import logging
import os
from typing import List, Sequence, Tuple

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dali_relabel import _checks, _system
from dali_relabel.images.rule import (
    check_decode_memory,
    header_of,
    open_image_file,
    without_pil_pixel_limit,
)


__all__ = ["verify_images"]

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
                          device_id=(_system.local_cuda_index() if decoder_device == "mixed"
                                     else None),
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


def _read(path: str) -> Tuple[bytes, str]:
    """The file's bytes, or why it is not a usable image before decoding (the rule of
    `rule.py`: a regular file, not empty, a format DALI decodes, a declared size that fits
    in memory); the bytes are then b"". What PIL cannot identify is left to DALI's decoder
    to judge."""
    try:
        with open_image_file(path) as f:
            data = f.read()
    except ValueError as error:
        return b"", str(error).removeprefix(f"{path}: ")
    except OSError as error:
        return b"", f"unreadable: {error.strerror or error}"
    if not data:
        return b"", "empty file (0 bytes)"
    try:
        with without_pil_pixel_limit(), Image.open(io.BytesIO(data)) as image:
            check_decode_memory(header_of(path, image))
    except ValueError as error:
        return b"", str(error).removeprefix(f"{path}: ")
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError):
        pass  # not identified by its header: DALI's decoding says what it is
    return data, ""


def verify_images(image_root: str, paths: Sequence[str], *, batch_size: int = 64,
                  num_threads: int = 2, decoder_device: str = "cpu",
                  adjust_orientation: bool = False,
                  progress: bool = True) -> List[Tuple[str, str]]:
    """Decode every image; return the bad ones as (relative path, reason).

    Every file is first held to the rule every tool applies (`rule.py`: a regular file,
    not empty, a format the decoder decodes, a declared size that fits in memory), then
    decoded by DALI.

    Args:
        image_root: Folder the paths are relative to.
        paths: Relative image paths ('/' separated), e.g. a store's /paths.
        batch_size: Files decoded per DALI batch.
        num_threads: DALI decoding threads.
        decoder_device: "cpu", or "mixed" to decode on this process's GPU (LOCAL_RANK's,
            as the loaders) as GPU training does; the two decoders can disagree on marginal
            files.
        adjust_orientation: Decode as a loader with this setting would.
        progress: Show a progress bar.
    """
    _checks.check_int("batch_size", batch_size, 1)
    _checks.check_int("num_threads", num_threads, 1)
    _checks.check_choice("decoder_device", decoder_device, ("cpu", "mixed"))
    decoder = _Decoder(batch_size, num_threads, decoder_device, adjust_orientation)
    bad: List[Tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="verify", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch, buffers = [], []
        for path in paths[start:start + batch_size]:
            data, problem = _read(os.path.join(image_root, path))
            if problem:
                bad.append((path, problem))
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
