"""benchmarks/gpu_check.py: without a GPU it says so and checks nothing; on the CPU twins
(--device cpu) every step runs end to end, as it would on a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args, cwd):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a GPU-less host")
def test_without_a_gpu_it_says_so_and_checks_nothing(tmp_path):
    result = run("--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU is visible here" in result.stderr + result.stdout
    assert "nothing was checked or timed" in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_cpu_twins_run_every_step(tmp_path):
    out = tmp_path / "out"
    result = run("--device", "cpu", "--quick", "--out", str(out), "--cache",
                 str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["passed"] and (out / "gpu_check.png").stat().st_size > 0
    kernel, loader, trainer = (saved["checks"][name] for name in ("kernel", "loader", "trainer"))
    assert kernel["passed"] and kernel["reruns_bit_identical"] and kernel["comparisons"] >= 12
    assert loader["passed"] and loader["images"] == 32 and loader["decoder"] == "cpu"
    assert trainer["passed"] and "--amp --channels-last" in trainer["command"]
    assert saved["kernel_timing"][0]["sparse_gb_per_s"] > 0
    timing = saved["loader_timing"]
    assert timing["percent_of_plain"] > 0 and timing["fancy_on_images_per_s"] > 0
