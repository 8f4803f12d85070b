"""What the benchmarks share, so that each of them holds its own sweep only:

- ``timing``: waiting on the device, warm-up then timed calls, timed streams of batches and
  the CPU other processes take meanwhile
- ``stats``: means with a Student-t 95% interval, and of paired ratios
- ``report``: the JSON and the PNG in the results folder, the machine and versions
- ``inputs``: random top-k label maps and crop boxes
- ``official``: the official ReLabel PIL pipeline and target code, the baseline
- ``plain_dali``: the DALI graphs a user writes without ReLabel
- ``jpegs``: the ImageNet-like JPEG set with its label maps, cached
- ``training``: a run of train/run.py
- ``train_step``: training steps on device tensors without DALI (gpu_check): a store of
  random maps, a timm model's step, CUDA-event timing, host-sync counting, a DDP run

The modules that import DALI or torchvision (``official``, ``plain_dali``, ``jpegs``) are
imported by name, not here.
"""
from harness.report import machine_info, write_results
from harness.stats import mean_interval, ratio_interval
from harness.timing import device_sync, median_ms, time_batches

__all__ = ["device_sync", "machine_info", "mean_interval", "median_ms", "ratio_interval",
           "time_batches", "write_results"]
