"""train/run.py refuses bad input before it trains: every flag, config value and input file is
checked at the start, in one line naming the flag (never a traceback, never after an epoch
of training); checkpoints of another set-up, or holding code, are refused by name; a full
disk stops the run in one line with its last good checkpoint intact; temporaries of killed
saves are cleaned up. Real runs on a tiny synthetic set; a file-size limit (RLIMIT_FSIZE) in
a subprocess for the full disk."""
import errno
import json
import logging
import os
import shutil

import pytest
import timm
import torch

import run
import trainer
from dali_relabel.files import atomic_path, check_output_path
from dali_relabel.tools import make_synthetic_imagenet
from script_runner import REPO, run_python, start_python

RUN = REPO / "train" / "run.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny set (2 classes, 16 training and 4 validation images) and bad input files."""
    base = tmp_path_factory.mktemp("synthetic")
    dataset = make_synthetic_imagenet(base, num_classes=2, train_per_class=8, val_per_class=2,
                                      topk=2, image_size=(32, 40), progress=False)
    files = base / "files"
    files.mkdir()
    (files / "ints.json").write_text(json.dumps([0, 1, 0, 1]))
    (files / "cut.json").write_text("[[0], [1]")
    (files / "class9.json").write_text(json.dumps([[0], [1], [9], [0]]))
    (files / "latin1.yaml").write_bytes("model: r\xe9snet10t\n".encode("latin-1"))
    (files / "escape.txt").write_text("../x.jpg\n")
    (files / "text.h5").write_text("not an HDF5 file\n")
    extra = files / "val_extra"
    shutil.copytree(dataset.val_root, extra)
    first = sorted(os.listdir(extra))[0]
    shutil.copytree(extra / first, extra / "zz_unknown")
    return dataset, files


def base_args(dataset):
    return ["--data", dataset.train_root, "--labelmaps", dataset.labelmaps,
            "--val-data", dataset.val_root, "--real-labels", dataset.real_labels,
            "--model", "resnet10t", "--image-size", "32", "--val-resize", "36",
            "--batch-size", "8", "--threads", "1", "--epochs", "1", "--no-progress"]


def with_flags(argv, changes):
    """argv with each flag of `changes` set to its value (appended if absent; None drops
    the flag and its value)."""
    argv = list(argv)
    for flag, value in changes.items():
        if flag in argv:
            at = argv.index(flag)
            del argv[at:at + 2]
        if value is not None:
            argv += [flag, value]
    return argv


# (changes, the flag the message names, a fragment of it); "{files}" and "{data}" are the
# fixture's folders. For the flags the loaders check, the fragment is the bad value: the
# wording is the loader's.
BAD_INPUTS = [
    ({"--eval-every": "0"}, "--eval-every", ">= 1"),
    ({"--real-labels": "{files}/ints.json"}, "--real-labels", "list of class indices"),
    ({"--real-labels": "{files}/cut.json"}, "--real-labels", "not valid JSON"),
    ({"--real-labels": "{files}/none.json"}, "--real-labels", "cannot read"),
    ({"--real-labels": "{files}/class9.json"}, "--real-labels", "[0, 2)"),
    ({"--val-data": None}, "--real-labels", "needs --val-data"),
    ({"--data": "{files}/none"}, "--data", "not a folder"),
    ({"--labelmaps": "{files}/none.h5"}, "--labelmaps", "not a file"),
    ({"--labelmaps": "{files}/text.h5"}, "--labelmaps", "text.h5"),
    ({"--exclude": "{files}/none.txt"}, "--exclude", "cannot read the path list"),
    ({"--exclude": "{files}/escape.txt"}, "--exclude", "not normalized"),
    ({"--batch-size": "0"}, "--batch-size", "got 0"),
    ({"--image-size": "0"}, "--image-size", "got 0"),
    ({"--val-resize": "16"}, "--val-resize", ">= --image-size"),
    ({"--model": "resnet_nosuch"}, "--model", "not a timm model"),
    ({"--opt": "nosuch"}, "--opt", "nosuch"),
    ({"--lr": "-1"}, "--lr", "> 0"),
    ({"--lr": "nan"}, "--lr", "> 0"),
    ({"--min-lr": "-0.1"}, "--min-lr", ">= 0"),
    ({"--weight-decay": "inf"}, "--weight-decay", ">= 0"),
    ({"--momentum": "1.5"}, "--momentum", "[0, 1)"),
    ({"--threads": "-1"}, "--threads", "got -1"),
    ({"--log-every": "0"}, "--log-every", ">= 1"),
    ({"--ckpt-every": "-1"}, "--ckpt-every", ">= 0"),
    ({"--warmup-epochs": "nan"}, "--warmup-epochs", ">= 0"),
    ({"--val-data": "{files}/val_extra"}, "--val-data", "zz_unknown"),
    ({"--config": "{files}/latin1.yaml"}, "--config", "not UTF-8"),
    ({"--epochs": "-1"}, "--epochs", ">= 1"),
    ({"--epochs": "0"}, "--epochs", ">= 1"),
    ({"--ema": "2"}, "--ema", "[0, 1)"),
    ({"--smoothing": "2"}, "--smoothing", "[0, 1)"),
    ({"--drop-path": "1"}, "--drop-path", "[0, 1)"),
    ({"--token-loss-weight": "-1"}, "--token-loss-weight", ">= 0"),
    ({"--cutmix-prob": "2"}, "--cutmix-prob", "[0, 1]"),
    ({"--num-crops": "3"}, "--num-crops", "multiple of"),
    ({"--num-crops": "0"}, "--num-crops", "got 0"),
    ({"--aa": "nosuch"}, "--aa", "unknown policy"),
    ({"--color-jitter": "-1"}, "--color-jitter", "-1"),
    ({"--reprob": "2"}, "--reprob", "got 2"),
    ({"--recount": "0"}, "--recount", "got 0"),
    ({"--mixup": "-1"}, "--mixup", "-1"),
    ({"--trace-samples": "{files}/no/such/trace.jsonl"}, "--trace-samples", "does not exist"),
    ({"--resume": "{files}/none.pt"}, "--resume", "no such file"),
    ({"--checkpoint": "{files}/none.pt"}, "--checkpoint", "cannot read"),
]


def case_id(case):
    changes, flag, _ = case
    value = next(iter(changes.values()))
    return f"{flag}={os.path.basename(value) if value else 'absent'}".replace("{files}", "")


@pytest.mark.parametrize("changes, flag, expected", BAD_INPUTS,
                         ids=[case_id(case) for case in BAD_INPUTS])
def test_bad_input_stops_at_the_start_in_one_line_naming_the_flag(data, tmp_path, changes,
                                                                   flag, expected):
    dataset, files = data
    changes = {key: value.format(files=files, data=dataset.train_root) if value else value
               for key, value in changes.items()}
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as error:
        run.main(with_flags([*base_args(dataset), "--output", str(out)], changes))
    message = str(error.value)
    assert "\n" not in message and flag in message and expected in message, message
    # Refused before any training: no epoch was spent on it.
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


# ---- checkpoints of another set-up, or of no trainer ------------------------------------

@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """The output folder of a finished one-epoch run (2 steps, no validation)."""
    dataset, _ = data
    out = tmp_path_factory.mktemp("finished")
    run.main(with_flags([*base_args(dataset), "--output", str(out)],
                        {"--val-data": None, "--real-labels": None}))
    return out


def crafted(path, finished, change):
    """A copy of the finished run's last.pt with `change` applied to its contents."""
    state = torch.load(finished / "last.pt", weights_only=True)
    state = change(state)
    torch.save(state, path)
    return str(path)


def model_weights(name, classes):
    return timm.create_model(name, num_classes=classes).state_dict()


CHECKPOINTS = [
    pytest.param("--resume", lambda s: s["model"], [], "not a checkpoint of train/run.py",
                 id="resume-a-bare-state-dict"),
    pytest.param("--resume", lambda s: {k: v for k, v in s.items() if k != "loaders"}, [],
                 "'loaders'", id="resume-without-loaders"),
    pytest.param("--resume", lambda s: dict(s, loaders=[{"epoch": "one"}]), [],
                 "loader position", id="resume-malformed-loader-position"),
    pytest.param("--resume", lambda s: dict(s, meters=[{"loss_sum": 1.0}]), [],
                 "'meters'", id="resume-malformed-meters"),
    pytest.param("--resume", lambda s: dict(s, model=[1, 2]), [], "'model'",
                 id="resume-model-not-a-state-dict"),
    pytest.param("--resume", lambda s: dict(s, model=model_weights("resnet18", 2)), [],
                 "--model resnet10t", id="resume-another-model"),
    pytest.param("--resume", lambda s: s, ["--batch-size", "4"], "batch_size",
                 id="resume-another-batch-size"),
    pytest.param("--resume", lambda s: s, ["--seed", "1"], "seed", id="resume-another-seed"),
    pytest.param("--resume", lambda s: s, ["--opt", "adamw"], "--opt sgd",
                 id="resume-another-optimizer"),
    pytest.param("--checkpoint", lambda s: model_weights("resnet18", 2), [],
                 "--model resnet10t", id="checkpoint-another-model"),
    pytest.param("--checkpoint", lambda s: model_weights("resnet10t", 3), [], "shape",
                 id="checkpoint-another-class-count"),
    pytest.param("--checkpoint", lambda s: [1, 2], [], "state_dict",
                 id="checkpoint-not-a-state-dict"),
]


@pytest.mark.parametrize("option, change, extra, expected", CHECKPOINTS)
def test_a_checkpoint_of_another_set_up_is_refused_in_one_line(data, finished, tmp_path,
                                                               option, change, extra,
                                                               expected):
    dataset, _ = data
    path = crafted(tmp_path / "other.pt", finished, change)
    out = tmp_path / "run"
    argv = with_flags([*base_args(dataset), "--epochs", "2", "--output", str(out), option,
                       path, *extra], {"--val-data": None, "--real-labels": None})
    with pytest.raises(SystemExit) as error:
        run.main(argv)
    message = str(error.value)
    assert message.startswith(f"{option} {path}: ") and "\n" not in message, message
    assert expected in message, message
    assert not (out / "metrics.jsonl").exists() and not (out / "last.pt").exists()


def test_the_unchanged_checkpoint_resumes(data, finished, tmp_path):
    """The control of the table above: the same call with the finished run's own file."""
    dataset, _ = data
    path = crafted(tmp_path / "same.pt", finished, lambda s: s)
    argv = with_flags([*base_args(dataset), "--epochs", "2", "--output",
                       str(tmp_path / "run"), "--resume", path],
                      {"--val-data": None, "--real-labels": None})
    assert run.main(argv)["epoch"] == 1


# ---- 14. a full disk: one line, and the last good last.pt stays -------------------------

def test_full_disk_at_last_pt_stops_in_one_line_and_keeps_the_last_good_one(data, finished,
                                                                           tmp_path):
    dataset, _ = data
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    good = (out / "last.pt").read_bytes()
    argv = with_flags([*base_args(dataset), "--epochs", "2", "--output", str(out),
                       "--resume", "auto"], {"--val-data": None, "--real-labels": None})
    limit = len(good) // 2  # room for the metrics line, not for a checkpoint

    result = run_python(RUN, *argv, timeout=300, file_size_limit=limit)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "no space left" in line]
    assert len(errors) == 1 and f"cannot write {out / 'last.pt'}" in errors[0], \
        result.stderr[-3000:]
    assert f"last good checkpoint: {out / 'last.pt'}" in errors[0]
    assert (out / "last.pt").read_bytes() == good  # the epoch-1 checkpoint, intact
    assert sorted(os.listdir(out)) == ["args.yaml", "last.pt", "metrics.jsonl"]
    # With the space back, --resume auto goes on from it.
    assert run.main(argv)["epoch"] == 1
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


def test_full_disk_at_best_pt_keeps_last_pt_and_names_best_pt(data, tmp_path, monkeypatch):
    """Room for last.pt but not for best.pt: best.pt cannot be written, and last.pt stays
    the last good checkpoint (the one before the epoch that best.pt would have held)."""
    dataset, _ = data
    out = tmp_path / "run"
    argv = [*base_args(dataset), "--batch-size", "2", "--ckpt-every", "4", "--output",
            str(out)]
    real_save = torch.save

    def save_without_room_for_best(obj, f, *args, **kwargs):
        if "best.pt" in os.path.basename(getattr(f, "name", str(f))):
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_without_room_for_best)
    with pytest.raises(SystemExit) as error:
        run.main(argv)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"cannot write {out / 'best.pt'}: "
                                                      "no space left"), message
    assert f"last good checkpoint: {out / 'last.pt'}" in message
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["loaders"][0]["batches_done"]) == (0, 4, 4)
    assert sorted(os.listdir(out)) == ["args.yaml", "last.pt"]
    monkeypatch.undo()
    record = run.main([*argv, "--resume", "auto"])  # the epoch ends as it would have
    assert record["steps"] == 8 and (out / "best.pt").exists()

# Temporaries of killed saves are cleaned up.

def dead_pid():
    process = start_python(None, code="pass")
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


# Safe resume; a finished run says so.

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


# Output paths are checked before the work (the tools' cases: test_cli.py).

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


# Config values are flags.

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
