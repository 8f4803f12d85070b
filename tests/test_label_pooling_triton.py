"""The CUDA (Triton) LabelPooling kernel, run on CPU tensors by triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The shared tests
(tests/label_pooling_tester.py) run here too; the interpreter costs tens of milliseconds per
program (one program per box and output bin, a few more for each distinct class under the
bin), so batches stay small here. The interpreter does no bounds checking:
every index stays in range. The interpreter does not specialize arguments as Triton's
compiler does, so the last tests compile every launch for GPU targets (no GPU needed, see
triton_compile.py) and read the generated code.
"""
import concurrent.futures
import json
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from dali_relabel import MODES, reference_label_pooling
from dali_relabel.ops.kernels.label_pooling_triton import label_pooling_triton
from label_pooling_tester import LabelPoolingTester
from labelmap_data import EDGE_BOXES, make_boxes, make_label_maps
from script_runner import run_python

REPO = Path(__file__).resolve().parents[1]


class TestTritonKernel(LabelPoolingTester):
    """The CUDA kernel's launcher, on CPU tensors under triton's interpreter."""

    output_sizes = (1, 3, 5)
    batch = 4

    def pool(self, values, indices, boxes, *, num_classes, output_size=1, flip=None,
             sample_index=None, mode="softmax"):
        out = label_pooling_triton(values, indices, boxes, sample_index, flip, num_classes,
                                   output_size, mode)
        return out.squeeze(1) if output_size == 1 else out


def assert_matches_reference(values, indices, boxes, num_classes, output_size, mode, *,
                             flip=None, sample_index=None):
    """The kernel against densify + torchvision roi_align (1e-5 absolute, float32)."""
    got = label_pooling_triton(values, indices, boxes, sample_index, flip, num_classes,
                               output_size, mode)
    # check_inputs=False: some cases pool boxes beyond [0, 1] on purpose.
    want = reference_label_pooling(values, indices, boxes, num_classes=num_classes,
                                   output_size=output_size, flip=flip,
                                   sample_index=sample_index, mode=mode, check_inputs=False)
    assert got.shape == (boxes.shape[0], output_size ** 2, num_classes)
    assert_close(got.view_as(want), want, atol=1e-5, rtol=0)
    return got


def pixel_boxes(num_boxes: int, width: int, height: int, seed: int) -> torch.Tensor:
    """Boxes of whole pixels of a width x height image, normalized."""
    size = torch.tensor([width, height, width, height])
    return (make_boxes(num_boxes, seed=seed) * size).round() / size


def test_without_gather_or_flip():
    values, indices = make_label_maps(4, 5, 300, dtype=torch.float32, seed=3)
    boxes = EDGE_BOXES[[2, 3, 5, 8]]
    assert_matches_reference(values, indices, boxes, 300, 1, "logits")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "shape, output_size, boxes",
    # The register tile covers the footprint of any normalized box; these need more tiles.
    [pytest.param((5, 15, 15), 3, torch.tensor([[0.0, 0.0, 1.5, 1.5], [-0.4, 0.2, 1.3, 0.6]]),
                  id="boxes-beyond-the-image-S3"),
     pytest.param((4, 48, 40), 1, torch.tensor([[0.0, 0.0, 1.0, 1.0]]),
                  id="48x40-map-larger-than-one-tile")])
def test_footprint_larger_than_a_tile(mode, shape, output_size, boxes):
    values, indices = make_label_maps(boxes.shape[0], shape[0], 50, height=shape[1],
                                      width=shape[2], seed=19)
    assert_matches_reference(values, indices, boxes, 50, output_size, mode)


def test_launcher_rejects_bad_arguments():
    values, indices = make_label_maps(2, 5, 10, seed=22)
    boxes = make_boxes(2, seed=23)
    with pytest.raises(ValueError, match="mode must be one of"):
        label_pooling_triton(values, indices, boxes, None, None, 10, 1, "sigmoid")
    with pytest.raises(ValueError, match="boxes must be"):
        label_pooling_triton(values, indices, boxes[:, :3], None, None, 10, 1, "softmax")
    with pytest.raises(ValueError, match="2 boxes need as many rows"):
        label_pooling_triton(values, indices, boxes, torch.tensor([1]), None, 10, 1, "softmax")
    with pytest.raises(ValueError, match="K, H, W >= 1"):
        label_pooling_triton(values[:, :0], indices[:, :0], boxes, None, None, 10, 1, "logits")


# (triton, compute capability): sm_80 (A100), sm_90 (H100, H200), sm_100 (B200) with the
# triton torch ships; sm_90 also with triton 3.6, which the GPU machines we borrow hold.
COMPILE_TARGETS = [("installed", 80), ("installed", 90), ("installed", 100), ("3.6", 90)]
TRITON_36 = REPO / ".venv" / "triton-3.6"


def compile_for(triton_version: str, arch: int) -> dict:
    env = {}
    if triton_version != "installed":
        assert (TRITON_36 / "triton").is_dir(), (
            f"{TRITON_36} is missing: `make venv` installs triton 3.6 there for this test")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_36),
                                                          os.environ.get("PYTHONPATH")]))
    result = run_python(Path(__file__).with_name("triton_compile.py"), "--arch", arch, env=env,
                        timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compiled():
    """Every launch compiled for every target, two targets at a time (one per core)."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda target: compile_for(*target), COMPILE_TARGETS))
    return dict(zip(COMPILE_TARGETS, reports))


@pytest.mark.parametrize("target", COMPILE_TARGETS, ids=lambda t: f"triton-{t[0]}-sm{t[1]}")
def test_every_launch_compiles_for_gpu_targets(compiled, target):
    """Triton's own JIT path for a GPU target, on this machine without a GPU: the launcher
    specializes, compiles to PTX and assembles a cubin, as on that GPU (triton_compile.py)."""
    report = compiled[target]
    if target[0] == "3.6":
        assert report["triton"].startswith("3.6"), report["triton"]
    assert report["launches"] >= 1800
    assert report["failures"] == [], json.dumps(report["failures"], indent=1)[:6000]
    # Sizes, flags and alignment are not specialized: one variant per tile shape and dtype.
    assert report["variants"] <= 80, report["variants"]


@pytest.mark.parametrize("target", COMPILE_TARGETS, ids=lambda t: f"triton-{t[0]}-sm{t[1]}")
def test_compiled_kernels_round_as_torchvision_without_atomics_or_spills(compiled, target):
    """The S = 1 and S = 14 kernels of every mode: no atomics (reruns are bit-identical), every
    float division rounded to nearest and no fused multiply-add (torchvision's arithmetic,
    which decides the sample counts), no local memory (no spills, no stack)."""
    inspected = compiled[target]["inspected"]
    assert sorted(inspected) == sorted(f"S={s} {m}" for s in (1, 14) for m in MODES)
    for name, facts in inspected.items():
        assert facts["atomics"] == [], name
        assert facts["divisions"] == ["div.rn.f32"], (name, facts["divisions"])
        assert facts["fused_multiply_adds"] == [], name
        assert facts["local_declarations"] == 0, name
        assert facts["ptxas"] == dict(stack_frame=0, spill_stores=0, spill_loads=0), (
            name, facts["ptxas"])
        assert facts["resources"]["LOCAL"] == 0 and facts["resources"]["STACK"] == 0, (
            name, facts["resources"])
