"""The CUDA (Triton) LabelPooling kernel, run on CPU tensors by triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter costs tens of
milliseconds per program (one program per box and output bin, a few more for each distinct
class under the bin), so batches stay small here. The interpreter does no bounds checking:
every index stays in range. The interpreter does not specialize arguments as Triton's
compiler does, so the last tests compile every launch for GPU targets (no GPU needed, see
triton_compile.py) and read the generated code.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from labelmap_data import EDGE_BOXES, REPEATED_CLASSES, make_boxes, make_label_maps
from dali_relabel import MODES, reference_label_pooling
from dali_relabel.ops.kernels.label_pooling_triton import label_pooling_triton

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "num_classes, topk, output_size",
    [pytest.param(1000, 5, 1, id="S1-paper-setting"),
     pytest.param(10, 1, 2, id="S2-tiny-C-K1"),
     pytest.param(2500, 5, 3, id="S3-C-spans-five-blocks")])
def test_matches_reference_with_gather_and_flip(mode, num_classes, topk, output_size):
    values, indices = make_label_maps(10, topk, num_classes, seed=output_size)
    sample_index = torch.tensor([9, 0, 4, 4, 2, 7])
    boxes = torch.cat([make_boxes(3, seed=1), EDGE_BOXES[[0, 1, 7]]])
    flip = torch.tensor([True, False, False, True, True, False])
    assert_matches_reference(values, indices, boxes, num_classes, output_size, mode,
                             flip=flip, sample_index=sample_index)


@pytest.mark.parametrize(
    "output_size, boxes",
    # A box W cells wide with W / S whole takes exactly W / S samples per bin; a division one
    # ulp high would take one more. The pooled logits show it; the epilogues are tested above.
    [pytest.param(3, torch.tensor([[0.0, 0.0, 0.6, 1.0], [0.2, 0.4, 1.0, 0.8]]),
                  id="S3-cell-aligned-9x15-12x6"),
     pytest.param(3, pixel_boxes(2, 230, 173, seed=2), id="S3-whole-pixels-of-230x173"),
     pytest.param(5, pixel_boxes(2, 230, 173, seed=3), id="S5-whole-pixels-of-230x173")])
def test_whole_pixel_boxes(output_size, boxes):
    values, indices = make_label_maps(2, 5, 100, seed=output_size)
    flip = torch.tensor([False, True])
    assert_matches_reference(values, indices, boxes, 100, output_size, "logits", flip=flip)


@pytest.mark.parametrize("mode", MODES)
def test_s5_cell_aligned_boxes_with_gather_and_flip(mode):
    """S = 5 in every mode; boxes of 15x15 and 10x10 cells take exactly 3 and 2 samples."""
    values, indices = make_label_maps(4, 5, 100, seed=5)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1 / 3, 0.0, 1.0, 2 / 3]])
    assert_matches_reference(values, indices, boxes, 100, 5, mode, flip=torch.tensor([False, True]),
                             sample_index=torch.tensor([3, 1]))


def test_without_gather_or_flip():
    values, indices = make_label_maps(4, 5, 300, dtype=torch.float32, seed=3)
    boxes = EDGE_BOXES[[2, 3, 5, 8]]
    assert_matches_reference(values, indices, boxes, 300, 1, "logits")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("output_size", [1, 2], ids=["S1", "S2"])
@pytest.mark.parametrize("change", REPEATED_CLASSES)
def test_repeated_classes_add_up(mode, output_size, change):
    values, indices = change(*make_label_maps(2, 3, 20, dtype=torch.float32, seed=14))
    boxes = torch.cat([make_boxes(1, seed=15), EDGE_BOXES[[0]]])
    assert_matches_reference(values, indices, boxes, 20, output_size, mode)


@pytest.mark.parametrize("mode", MODES)
def test_imagenet21k_int32_classes_bf16_values(mode):
    """ImageNet-21k class ids as int32 indices, bfloat16 values, a class listed twice."""
    values, indices = make_label_maps(3, 2, 21843, dtype=torch.bfloat16, seed=4)
    indices = indices.to(torch.int32)
    indices[0, 1] = indices[0, 0]
    indices[1, 0, :, :5] = 21842  # the last class
    boxes = torch.cat([make_boxes(2, seed=5), EDGE_BOXES[[0]]])
    assert_matches_reference(values, indices, boxes, 21843, 1, mode)


@pytest.mark.parametrize(
    "num_classes, classes, want",
    # Every listed logit negative: an unlisted class (logit 0) wins, the first of them.
    [pytest.param(10, (3, 7), 0, id="unlisted-class-0-wins"),
     pytest.param(10, (0, 1), 2, id="first-unlisted-after-listed-0-1"),
     pytest.param(10, (0, 2), 1, id="unlisted-gap-between-listed"),
     pytest.param(2, (0, 1), 0, id="all-classes-listed-negative-max-wins")])
def test_argmax_with_negative_logits(num_classes, classes, want):
    values = -torch.ones(1, 2, 15, 15)
    values[0, 0] = -0.5  # class classes[0] pools highest among the listed
    indices = torch.tensor(classes, dtype=torch.int16).view(1, 2, 1, 1).expand(1, 2, 15, 15)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    got = assert_matches_reference(values, indices.contiguous(), boxes, num_classes, 1, "argmax")
    assert got.argmax(-1).item() == want


@pytest.mark.parametrize("mode", ["softmax", "argmax"])
def test_every_class_listed_with_very_negative_logits(mode):
    """u == C: no unlisted class of logit 0, and e^-m would overflow."""
    values = torch.full((1, 3, 15, 15), -1000.0)
    values[0, 1] = -900.0
    indices = torch.arange(3, dtype=torch.int16).view(1, 3, 1, 1).expand(1, 3, 15, 15)
    got = assert_matches_reference(values, indices.contiguous(), EDGE_BOXES[[0]], 3, 1, mode)
    assert got.argmax(-1).item() == 1


@pytest.mark.parametrize("mode", MODES)
def test_every_pair_a_different_class(mode):
    """Adversarial map: all K*H*W pairs distinct, so the footprint lists ~100 classes."""
    values = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(16)) * 4
    indices = torch.randperm(300, generator=torch.Generator().manual_seed(17))[:216]
    indices = indices.view(2, 3, 6, 6).to(torch.int16)
    boxes = torch.cat([EDGE_BOXES[[0]], make_boxes(1, seed=18)])
    assert_matches_reference(values, indices, boxes, 300, 1, mode)


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


@pytest.mark.parametrize("mode", MODES)
def test_reruns_are_bit_identical(mode):
    values, indices = make_label_maps(4, 5, 1000, seed=20)
    values[:, 1] = values[:, 0]  # equal contributions: summation order would show
    boxes = torch.cat([make_boxes(2, seed=21), EDGE_BOXES[[0, 4]]])
    sample_index = torch.tensor([3, 1, 1, 0])
    flip = torch.tensor([True, False, True, False])
    runs = [label_pooling_triton(values, indices, boxes, sample_index, flip, 1000, 2, mode)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


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
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if triton_version != "installed":
        assert (TRITON_36 / "triton").is_dir(), (
            f"{TRITON_36} is missing: `make venv` installs triton 3.6 there for this test")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TRITON_36),
                                                          env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile.py")),
                             "--arch", str(arch)], env=env, capture_output=True, text=True,
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
