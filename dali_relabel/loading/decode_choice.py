"""Which decode path a training run takes, and the GPU decoder's settings.

"roi" decodes only each planned window (DALI's ROI decoding); "full" decodes the whole image
(on a GPU with the hardware JPEG decoder where there is one) and cuts the windows from it;
both describe the same pixels. "auto" takes "full" for several crops per image, and
otherwise "roi" where ROI decoding is known to work: always on the CPU; on a GPU only after
a probe in a child process (a crash there, such as the SIGSEGV of nvImageCodec 0.9's GPU ROI
decoding on H100, cannot take the training process down) decoded windows of the run's own
files both ways and found them equal. The probe's verdict is kept per GPU model and library
versions in ``~/.cache/dali-relabel/decode_probe.json``. docs/training.md#decoding says more.

Run as ``python -m dali_relabel.loading.decode_choice --decoder mixed --device-id 0 FILE...``
it is the probe's child: it prints one JSON line and exits 0 when both paths agree.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["DECODE_CHOICES", "DEFAULT_GPU_DECODER_OPTIONS", "choose_decode",
           "gpu_decoder_options", "probe_roi_decode", "run_isolated"]

logger = logging.getLogger(__name__)

DECODE_CHOICES = ("auto", "roi", "full")
# The GPU decoder's settings, from NVIDIA's ResNet-50 recipes: nvJPEG buffers sized for the
# largest ImageNet image so that they are never reallocated (DeepLearningExamples' ConvNets
# dali.py: 211025920 bytes on the device, 140544512 pinned on the host per thread), the
# hardware decoder preallocated for it (5980 x 6430, DALI's ResNet-50 example and MLPerf), and
# the hardware decoder's share of the images: 0.99 when decoding whole images (MLPerf's
# DGX-H100 configuration); ROI decodes do not use it (MLPerf's ROI configuration sets 0).
DEFAULT_GPU_DECODER_OPTIONS = dict(device_memory_padding=211025920,
                                   host_memory_padding=140544512,
                                   preallocate_width_hint=5980, preallocate_height_hint=6430)
_HW_DECODER_LOAD = {"full": 0.99, "roi": 0.0}
# A window decoded both ways may differ by IDCT rounding at most (mean abs, 0-255 scale).
_PROBE_TOLERANCE = 1.0
_PROBE_TIMEOUT_S = 300
_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "dali-relabel", "decode_probe.json")


def gpu_decoder_options(decode: str, overrides: Optional[Mapping[str, Any]]) -> dict:
    """The "mixed" decoder's arguments for `decode`, `overrides` on top of the defaults."""
    options = dict(DEFAULT_GPU_DECODER_OPTIONS, hw_decoder_load=_HW_DECODER_LOAD[decode])
    if overrides is not None:
        if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
            raise ValueError(f"decoder_options must be a mapping of DALI decoder argument names "
                             f"to values, got {overrides!r}")
        options.update(overrides)
    return options


def run_isolated(command: Sequence[str], timeout: float) -> tuple[bool, str]:
    """Runs `command` in a child process: (True, its stdout) when it exits 0, else (False,
    why: the signal that killed it, the timeout, or its exit status and last error line)."""
    try:
        result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the probe did not finish in {timeout:.0f} s"
    if result.returncode < 0:
        try:
            name = signal.Signals(-result.returncode).name
        except ValueError:
            name = f"signal {-result.returncode}"
        return False, f"the probe was killed by {name}"
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return False, (f"the probe exited with status {result.returncode}: "
                       f"{lines[-1] if lines else 'no message'}")
    return True, result.stdout


def probe_roi_decode(files: Sequence[str], *, decoder_device: str, device_id: Optional[int],
                     adjust_orientation: bool, timeout: float = _PROBE_TIMEOUT_S
                     ) -> tuple[bool, str]:
    """Decodes windows of `files` with ROI decoding and with a whole-image decode and a
    slice, in a child process: (True, what matched) when both agree, else (False, why)."""
    command = [sys.executable, "-m", "dali_relabel.loading.decode_choice", "--decoder",
               decoder_device, "--device-id", str(-1 if device_id is None else device_id),
               *(["--adjust-orientation"] if adjust_orientation else []), *files]
    ok, out = run_isolated(command, timeout)
    if not ok:
        return False, out
    try:
        report = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, f"the probe printed no result ({out[-200:]!r})"
    if report["max_mean_abs_diff"] > _PROBE_TOLERANCE:
        return False, (f"ROI-decoded windows differ from whole-image decodes by "
                       f"{report['max_mean_abs_diff']:.2f} (mean abs, 0-255)")
    return True, (f"{report['windows']} ROI-decoded windows of {report['images']} images "
                  f"matched whole-image decodes (mean abs diff at most "
                  f"{report['max_mean_abs_diff']:.2f})")


def _probe_key(device_id: int) -> str:
    import nvidia.dali
    import torch

    try:
        from importlib.metadata import version
        codec = version("nvidia-nvimgcodec-cu13")
    except Exception:  # noqa: BLE001 (another CUDA flavour's package name)
        codec = "unknown"
    return (f"{torch.cuda.get_device_name(device_id)} | DALI {nvidia.dali.__version__} | "
            f"nvImageCodec {codec}")


def _cached(key: str) -> Optional[tuple[bool, str]]:
    try:
        with open(_CACHE, encoding="utf-8") as f:
            entry = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(entry, list) and len(entry) == 2:
        return bool(entry[0]), str(entry[1])
    return None


def _remember(key: str, verdict: tuple[bool, str]) -> None:
    try:
        try:
            with open(_CACHE, encoding="utf-8") as f:
                known = json.load(f)
        except (OSError, ValueError):
            known = {}
        known[key] = list(verdict)
        os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
        tmp = f"{_CACHE}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f, indent=1)
        os.replace(tmp, _CACHE)
    except OSError as error:  # a read-only home only costs a probe per run
        logger.debug("could not record the decode probe's verdict: %s", error)


def choose_decode(decode: str, *, num_crops: int, decoder_device: str,
                  device_id: Optional[int], files: Sequence[str],
                  adjust_orientation: bool) -> tuple[str, str]:
    """("roi" or "full", why) for the `decode` asked for."""
    if decode != "auto":
        return decode, "as asked"
    if num_crops > 1:
        return "full", f"{num_crops} crops per image are cut from one whole-image decode"
    if decoder_device == "cpu":
        return "roi", "ROI decoding on the CPU (libjpeg-turbo) decodes only the window"
    key = _probe_key(device_id)
    verdict = _cached(key)
    if verdict is None:
        verdict = probe_roi_decode(files, decoder_device=decoder_device, device_id=device_id,
                                   adjust_orientation=adjust_orientation)
        _remember(key, verdict)
    ok, why = verdict
    if ok:
        return "roi", f"GPU ROI decoding passed a probe on {key}: {why}"
    logger.warning("GPU ROI decoding failed a probe in a child process on %s (%s): decoding "
                   "whole images and cropping on the GPU (decode='full')", key, why)
    return "full", f"GPU ROI decoding failed a probe on {key}: {why}"


def _probe_main(argv: Optional[Sequence[str]] = None) -> int:
    """The probe's child: windows of each file decoded both ways, compared."""
    parser = argparse.ArgumentParser(description="decode-path probe (child process)")
    parser.add_argument("--decoder", choices=("cpu", "mixed"), required=True)
    parser.add_argument("--device-id", type=int, default=-1)
    parser.add_argument("--adjust-orientation", action="store_true")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from dali_relabel.images.files import read_image_sizes

    sizes = read_image_sizes("/", [os.path.abspath(f).lstrip("/") for f in args.files],
                             adjust_orientation=args.adjust_orientation, progress=False)
    # Four windows per image: the whole image, an inner one and two at opposite corners.
    windows = []
    for height, width in sizes:
        h, w = max(1, height // 2), max(1, width // 2)
        windows += [(0, 0, height, width), (height // 4, width // 4, h, w), (0, 0, h, w),
                    (height - h, width - w, h, w)]
    windows = np.asarray(windows, np.int32)
    files = [f for f in args.files for _ in range(4)]

    @pipeline_def(batch_size=len(files), num_threads=1, prefetch_queue_depth=1,
                  device_id=None if args.device_id < 0 else args.device_id)
    def both_ways():
        jpegs, _ = fn.readers.file(files=files, dont_use_mmap=True)
        anchor = fn.external_source(source=lambda: list(windows[:, :2]), dtype=types.INT32)
        shape = fn.external_source(source=lambda: list(windows[:, 2:]), dtype=types.INT32)
        common = dict(device=args.decoder, output_type=types.RGB,
                      adjust_orientation=args.adjust_orientation)
        roi = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="HW", **common)
        whole = fn.slice(fn.decoders.image(jpegs, **common), anchor, shape, axis_names="HW")
        return roi, whole

    pipe = both_ways()
    pipe.build()
    roi, whole = pipe.run()
    if args.decoder == "mixed":
        roi, whole = roi.as_cpu(), whole.as_cpu()
    worst = 0.0
    for k in range(len(files)):
        a, b = np.asarray(roi[k], np.float32), np.asarray(whole[k], np.float32)
        worst = max(worst, float(np.abs(a - b).mean()) if a.shape == b.shape else np.inf)
    print(json.dumps(dict(images=len(args.files), windows=len(files), max_mean_abs_diff=worst)))
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main())
