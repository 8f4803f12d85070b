"""DALI graphs written the way a user writes them without ReLabel, with nvidia.dali.fn:

- plain_dali_pipeline: the training graph, images only: fn.readers.file (shuffled) ->
  fn.decoders.image_random_crop -> fn.resize(224, antialias) -> fn.crop_mirror_normalize
  (random flip); read through DALIGenericIterator
- decode_pipeline: reading and decoding only (no crop, no resize), the decoder's ceiling
"""
from typing import Iterator, Sequence

import nvidia.dali.fn as fn
import nvidia.dali.types as types
import torch
from nvidia.dali import pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from harness.official import IMAGE_SIZE, IMAGENET_MEAN_01, IMAGENET_STD_01

READER = "Reader"
IMAGENET_MEAN = tuple(255 * m for m in IMAGENET_MEAN_01)
IMAGENET_STD = tuple(255 * s for s in IMAGENET_STD_01)


@pipeline_def
def plain_dali_pipeline(files: Sequence[str], decoder_device: str):
    """The DALI training graph one writes without ReLabel: images only, DALI's own crops."""
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=True, dont_use_mmap=True,
                               name=READER)
    images = fn.decoders.image_random_crop(jpegs, device=decoder_device, output_type=types.RGB,
                                           random_area=[0.08, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3])
    images = fn.resize(images, size=[IMAGE_SIZE, IMAGE_SIZE], interp_type=types.INTERP_LINEAR,
                       antialias=True)
    return fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(),
                                    mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD),
                                    dtype=types.FLOAT, output_layout="CHW")


@pipeline_def
def decode_pipeline(files: Sequence[str], decoder_device: str):
    """Reads `files` in order and decodes them whole, with ReLabelLoader's decoder settings
    (RGB, no EXIF orientation, fancy chroma upsampling)."""
    jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False, dont_use_mmap=True,
                               name=READER)
    return fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB,
                             adjust_orientation=False, jpeg_fancy_upsampling=True)


def build(pipeline, files: Sequence[str], device: torch.device, batch_size: int, threads: int,
          seed: int):
    """One of the pipelines above, built: decoding "mixed" on cuda, else "cpu"."""
    pipe = pipeline(files, decoder_device="mixed" if device.type == "cuda" else "cpu",
                    batch_size=batch_size, num_threads=threads,
                    device_id=(device.index or 0) if device.type == "cuda" else None, seed=seed)
    pipe.build()
    return pipe


def plain_dali_loader(files: Sequence[str], device: torch.device, batch_size: int,
                      threads: int, seed: int) -> DALIGenericIterator:
    """plain_dali_pipeline behind DALIGenericIterator, its batches under "images"."""
    pipe = build(plain_dali_pipeline, files, device, batch_size, threads, seed)
    return DALIGenericIterator([pipe], ["images"], reader_name=READER)


def plain_dali_batches(iterator: DALIGenericIterator) -> Iterator:
    """Endless image batches of the plain DALI graph."""
    while True:
        for outputs in iterator:
            yield outputs[0]["images"]
        iterator.reset()


def dali_decode_batches(pipe) -> Iterator:
    """Endless outputs of decode_pipeline (the reader wraps around at the end of its list)."""
    while True:
        yield pipe.run()
