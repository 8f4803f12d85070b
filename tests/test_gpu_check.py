"""benchmarks/gpu_check.py: without a GPU it says so and checks nothing; on the CPU twins
(--device cpu --quick) every step that has one runs end to end and the GPU-only part is
skipped with its reason; and as on the borrowed GPU machines, without nvidia.dali and without
the compiled CPU kernel, the DALI-free steps pass and the DALI steps are skipped naming DALI
(where label_pooling falls back to the dense reference, with a one-time warning)."""
import json
import textwrap

import pytest
import torch

from script_runner import REPO, run_python

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
DALI_FREE = ("kernel_grid", "sparse_targets", "augment_and_mixing", "resnet50_share",
             "kernel_timing", "ddp")
BLOCKER = textwrap.dedent('''
    """Test helper: nvidia.dali and the compiled LabelPooling CPU kernel cannot be imported,
    as on a GPU machine that holds no DALI and only the source tree."""
    import sys

    BLOCKED = ("nvidia.dali", "dali_relabel.ops.kernels._label_pooling_cpu")


    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None


    sys.meta_path.insert(0, _Blocker())
''')
FALLBACK = textwrap.dedent('''
    import warnings
    import torch
    for name in ("nvidia.dali", "nvidia.dali.fn"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} was imported: the blocker does not block")
    try:
        from dali_relabel.ops.kernels import _label_pooling_cpu  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the compiled CPU kernel was imported: the blocker does not block")
    from dali_relabel import label_pooling, reference_label_pooling
    from dali_relabel.ops import testing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, kwargs in list(testing.launches(quick=True))[::40]:
            got = label_pooling(**kwargs)
            want = reference_label_pooling(**kwargs)
            assert torch.equal(got, want), name
    missing = [str(w.message) for w in caught if "CPU kernel" in str(w.message)]
    assert len(missing) == 1, missing
    print(missing[0])
''')


def run(*args, cwd, blocked=None, **options):
    """run_python with `blocked` (a sitecustomize folder) first on the child's PYTHONPATH."""
    env = {"PYTHONPATH": str(blocked)} if blocked is not None else None
    return run_python(*args, cwd=cwd, env=env, timeout=900, **options)


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no_dali")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a GPU-less host")
def test_without_a_gpu_it_says_so_and_checks_nothing(tmp_path):
    result = run(str(SCRIPT), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU is visible here" in result.stderr + result.stdout
    assert "nothing was checked or timed" in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_cpu_twins_run_every_step(tmp_path):
    out = tmp_path / "out"
    result = run(str(SCRIPT), "--device", "cpu", "--quick", "--threads", "2", "--out", str(out),
                 "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["passed"] and (out / "gpu_check.png").stat().st_size > 0
    steps = saved["steps"]
    assert list(steps) == ["kernel_grid", "sparse_targets", "augment_and_mixing", "decoding",
                           "loaders", "resnet50_share", "host_syncs", "kernel_timing", "ddp"]
    for name, row in steps.items():
        expected = "skipped" if name == "host_syncs" else "passed"
        assert row["status"] == expected, (name, row)
    assert "on a GPU only" in steps["host_syncs"]["reason"]
    kernel = steps["kernel_grid"]
    assert kernel["kernel"] == "C++" and kernel["launches"] >= 30
    assert kernel["max_abs_diff"] <= 1e-5 and kernel["failure_count"] == 0
    assert steps["augment_and_mixing"]["erasing"]["const"]["exact"]
    decoding = steps["decoding"]
    assert {row["took"] for row in decoding["decode"].values()} == {"roi", "full"}
    assert decoding["decoder"] == "cpu" and decoding["decode"]["roi"]["images"] == 16
    assert all(row["samples_per_s"] > 0 for row in decoding["num_crops"].values())
    loaders = steps["loaders"]
    assert loaders["percent_of_plain"] > 0 and loaders["skipped_parts"]["gpu_memory"]
    boundary = loaders["epoch_boundary"]["relabel_loader"]
    assert boundary["epochs"] == 4 and len(boundary["boundaries"]) == 3
    assert steps["kernel_timing"]["configs"][0]["gb_per_s"] > 0
    assert steps["ddp"]["backend"] == "gloo" and steps["ddp"]["max_param_diff"] == 0
    assert "8 passed, 1 skipped" in result.stdout


def test_fallback_without_the_compiled_cpu_kernel_warns_once(tmp_path, blocker):
    result = run(None, code=FALLBACK, cwd=tmp_path, blocked=blocker)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "falls back to the dense reference" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_dali_free_steps_pass_without_dali_and_the_cpu_kernel(tmp_path, blocker):
    """As on the borrowed GPU machines: no nvidia.dali, no compiled extension, the source tree
    on PYTHONPATH."""
    out = tmp_path / "out"
    result = run(str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), "--cache",
                 str(tmp_path / "cache"), cwd=tmp_path, blocked=blocker)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["versions"]["dali"].startswith("not installed")
    assert saved["versions"]["label_pooling_cpu_kernel"].startswith("dense reference")
    steps = saved["steps"]
    for name in DALI_FREE:
        assert steps[name]["status"] == "passed", (name, steps[name])
    assert steps["host_syncs"]["status"] == "skipped"
    assert "ran on the CPU without error" in steps["host_syncs"]["reason"]
    for name in ("decoding", "loaders"):
        assert steps[name]["status"] == "skipped"
        assert "needs NVIDIA DALI: nvidia.dali is not installed" in steps[name]["reason"]


def test_isolated_steps_run_in_child_processes_under_a_time_limit(tmp_path, blocker):
    """On a GPU each step runs in a process of its own (--isolate auto): a step past its
    --step-timeout is stopped (its DDP ranks with it) and recorded as an error, the next step
    still runs and sends its result back from its own process, and a step that cannot run
    here is skipped without starting one."""
    out = tmp_path / "out"
    result = run(str(SCRIPT), "--device", "cpu", "--quick", "--steps", "i,b,d", "--isolate",
                 "yes", "--step-timeout", "i=2", "--out", str(out), cwd=tmp_path,
                 blocked=blocker)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((out / "gpu_check.json").read_text())
    steps = saved["steps"]
    assert saved["isolated"] and list(steps) == ["ddp", "sparse_targets", "decoding"]
    assert steps["ddp"]["status"] == "error" and not saved["passed"]
    assert "timed out after 2 s" in steps["ddp"]["error"]
    assert steps["sparse_targets"]["status"] == "passed" and steps["sparse_targets"]["cases"]
    assert steps["decoding"]["status"] == "skipped" and steps["decoding"]["seconds"] < 1
    assert "nvidia.dali is not installed" in steps["decoding"]["reason"]
    assert "ERROR" in result.stdout and "1 passed, 1 skipped, 1 error" in result.stdout
