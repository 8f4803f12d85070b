"""What every benchmark writes: its JSON and its PNG in one results folder, the same way, and
the machine and versions it ran on."""
import argparse
import json
import os
import platform
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from dali_relabel.files import atomic_path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def add_device_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """--device, cuda where there is one, else cpu."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help=f"{help} (default: cuda if present, else cpu)")


def add_out_argument(parser: argparse.ArgumentParser, files: str) -> None:
    """--out, the results folder (default: benchmarks/results)."""
    parser.add_argument("--out", default=str(RESULTS),
                        help=f"folder for {files} (default: benchmarks/results)")


def subplots(*args, **kwargs):
    """matplotlib's subplots on the Agg backend (no display needed): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, path: Path) -> None:
    """Lays the figure out, writes it as a PNG at 110 dpi and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(path: Path, data) -> None:
    """`data` as indented JSON, written to a temporary name and renamed."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


def write_results(out: Path, stem: str, result: Dict,
                  draw: Optional[Callable[[Path], None]] = None) -> Tuple[Path, Optional[Path]]:
    """`out`/`stem`.json from `result` and, given `draw(path)`, `out`/`stem`.png; returns
    their paths (None for a PNG not drawn)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    png = None
    if draw is not None:
        png = out / f"{stem}.png"
        draw(png)
    return out / f"{stem}.json", png


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return model


def device_name(device: torch.device) -> str:
    """The GPU's name on cuda, the CPU's model on cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_info(device: torch.device) -> Dict:
    """The machine, the device and the versions of what a loader runs on."""
    import nvidia.dali as dali
    import PIL
    import torchvision

    import dali_relabel

    return dict(
        cpu=cpu_model(),
        cpu_count=os.cpu_count(),
        cpu_affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        device=str(device),
        device_name=device_name(device),
        platform=platform.platform(),
        python=platform.python_version(),
        torch_version=torch.__version__,
        torchvision_version=torchvision.__version__,
        dali_version=dali.__version__,
        pillow_version=PIL.__version__,
        dali_relabel_version=dali_relabel.__version__,
    )


def device_info(device: torch.device) -> Dict:
    """The device, its name, torch's threads and version: the head of a kernel benchmark's
    JSON."""
    return dict(device=str(device), device_name=device_name(device),
                torch_threads=torch.get_num_threads(), torch_version=torch.__version__)
