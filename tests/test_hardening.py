"""Issue #10, hardening: every case is one row of a table (input -> expected error fragment),
so that a regression names itself. Real checkpoints and subprocesses.

What is left here is the trainer's part (train/run.py, train/trainer.py) and label_pooling's
shape checks; the label-map, image, tool and command-line cases live with their modules'
tests (test_store.py, test_labelmap_format.py, test_images.py, test_verify.py,
test_annotate.py, test_import_pt.py, test_show.py, test_cli.py).
"""
import logging
import os
import subprocess
import sys

import pytest
import torch

from dali_relabel import label_pooling, reference_label_pooling
from dali_relabel.files import atomic_path, check_output_path

import run
import trainer


# ---- 7. temporaries of killed saves are cleaned up ---------------------------------------

def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_atomic_path_removes_stale_temporaries_only(tmp_path):
    target = tmp_path / "last.pt"
    stale = tmp_path / f"last.pt.tmp-{dead_pid()}"
    live = tmp_path / f"last.pt.tmp-{os.getppid()}"
    other = tmp_path / f"best.pt.tmp-{dead_pid()}"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    trainer.save_atomic({"step": 3}, str(target))
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.load(target, weights_only=True) == {"step": 3}
    with pytest.raises(RuntimeError), atomic_path(str(target)) as tmp:
        open(tmp, "wb").close()
        raise RuntimeError("failed write")
    assert sorted(os.listdir(tmp_path)) == sorted(["last.pt", live.name, other.name])


# ---- 8, 9. label_pooling's shape checks --------------------------------------------------

def pooling_args(k=2, h=3, w=3, **changes):
    args = dict(values=torch.randn(2, k, h, w), indices=torch.zeros(2, k, h, w, dtype=torch.long),
                boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.8, 0.9]]),
                num_classes=5)
    args.update(changes)
    return args


POOLING_CASES = [
    pytest.param(pooling_args(h=0), "K, H, W >= 1", id="H-0"),
    pytest.param(pooling_args(w=0), "K, H, W >= 1", id="W-0"),
    pytest.param(pooling_args(k=0), "K, H, W >= 1", id="K-0"),
    pytest.param(pooling_args(values=torch.randn(0, 2, 3, 3),
                              indices=torch.zeros(0, 2, 3, 3, dtype=torch.long),
                              sample_index=torch.tensor([0, 0])), "at least one row",
                 id="N-0-with-sample-index"),
    pytest.param(pooling_args(output_size=2 ** 32), "at most MAX_OUTPUT_SIZE=64",
                 id="output-size-2-pow-32"),
    pytest.param(pooling_args(output_size=65), "at most MAX_OUTPUT_SIZE=64",
                 id="output-size-65"),
]


@pytest.mark.parametrize("args, message", POOLING_CASES)
@pytest.mark.parametrize("check_inputs", [True, False], ids=["checked", "unchecked"])
@pytest.mark.parametrize("op", [label_pooling, reference_label_pooling],
                         ids=["label_pooling", "reference"])
def test_label_pooling_refuses_degenerate_shapes(op, check_inputs, args, message):
    with pytest.raises(ValueError, match=message):
        op(**args, check_inputs=check_inputs)


# ---- 1, 13. the trainer: safe resume, a finished run says so -----------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_holding_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "last.pt"
    torch.save({"model": RunsCode(marker), "epoch": 1}, evil)
    for option in ("--resume", "--checkpoint"):
        with pytest.raises(SystemExit) as error:
            trainer.load_checkpoint(str(evil), option=option)
        message = str(error.value)
        assert message.startswith(f"{option} {evil}: refusing to load it") and "\n" not in message
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(evil.read_bytes()[:50])
    with pytest.raises(SystemExit, match="cannot read the checkpoint"):
        trainer.load_checkpoint(str(tmp_path / "cut.pt"), option="--resume")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from dali_relabel.tools.synthetic import make_synthetic_imagenet
    dataset = make_synthetic_imagenet(tmp_path_factory.mktemp("synthetic"), num_classes=2,
                                      train_per_class=8, val_per_class=2, topk=2,
                                      image_size=(32, 40), progress=False)
    return ["--data", dataset.train_root, "--labelmaps", dataset.labelmaps, "--model",
            "resnet10t", "--image-size", "32", "--batch-size", "8", "--threads", "1",
            "--epochs", "1"]


def test_resume_auto_of_a_finished_run_says_it_is_complete(tiny_run, tmp_path, caplog):
    out = tmp_path / "run"
    run.main([*tiny_run, "--output", str(out)])
    with caplog.at_level(logging.INFO, logger="train"):
        assert run.main([*tiny_run, "--output", str(out), "--resume", "auto"]) == {}
    assert "Run complete: all 1 epochs done, nothing to resume" in caplog.text
    assert "SIGTERM" not in caplog.text
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCode(marker)}, out / "last.pt")
    with pytest.raises(SystemExit, match=f"--resume {out / 'last.pt'}: refusing to load it"):
        run.main([*tiny_run, "--output", str(out), "--resume", "auto"])
    assert not marker.exists()


# ---- 14. output paths are checked before the work (the tools' cases: test_cli.py) -------

def test_output_paths_are_checked_before_any_work(tmp_path):
    existing_file = tmp_path / "file.txt"
    existing_file.write_text("x")
    for argv, message in [
        (["--output", existing_file], "--output: "),
        (["--output", ""], "--output: expected a folder path"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run.parse_args([str(arg) for arg in argv])
    assert check_output_path(tmp_path / "new" / "run", argument="--output", directory=True)


# ---- 15. config values are flags --------------------------------------------------------

CONFIGS = [
    pytest.param("epochs: 1.5\n", "line 1: epochs: invalid int value 1.5", id="float-epochs"),
    pytest.param("model: resnet18\nepochs: ten\n", "line 2: epochs: invalid int value 'ten'",
                 id="word-epochs"),
    pytest.param("epochs: [1, 2\n", "not valid YAML", id="yaml-syntax-error"),
    pytest.param("- epochs\n- 3\n", "expected a mapping", id="not-a-mapping"),
    pytest.param("model: resnet18\nmodle: resnet50\n", "line 2: modle: unknown key",
                 id="unknown-key"),
    pytest.param("label_mode: fancy\n", "label_mode: 'fancy' is not one of",
                 id="bad-choice"),
    pytest.param("amp: 1\n", "amp: expected true or false", id="switch-not-bool"),
    pytest.param("lr: [0.1]\n", "lr: expected a single float value", id="list-value"),
]


@pytest.mark.parametrize("text, message", CONFIGS)
def test_config_values_are_checked_like_flags(tmp_path, text, message):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as error:
        run.parse_args(["--config", str(config)])
    assert str(error.value).startswith(f"--config {config}") and "\n" not in str(error.value)
    assert message in str(error.value)


def test_config_values_are_converted_like_flags(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 2\nlr: 1e-3\namp: true\nbatch_size: '16'\n")
    args = run.parse_args(["--config", str(config), "--batch-size", "8"])
    assert (args.epochs, args.lr, args.amp, args.batch_size) == (2, 1e-3, True, 8)
    with pytest.raises(SystemExit, match="cannot read it"):
        run.parse_args(["--config", str(tmp_path / "none.yaml")])
