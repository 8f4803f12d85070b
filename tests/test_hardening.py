"""Issue #10, hardening: every case is one row of a table (input -> expected error fragment),
so that a regression names itself. Real HDF5 files, JPEGs, checkpoints and subprocesses."""
import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from labelmap_data import KILLED_AFTER_TWO_WRITES

import dali_relabel.labelmaps.store as store_module
from dali_relabel import label_pooling, reference_label_pooling
from dali_relabel.files import atomic_path, check_output_path
from dali_relabel.cli import main
from dali_relabel.tools.jobs import check_resumable, read_name_list
from dali_relabel.labelmaps.store import (
    LabelMapError,
    LabelMapStore,
    LabelMapWriter,
    read_header,
    write_labelmaps,
)
from dali_relabel.images.path_lists import read_path_list, write_bad_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_DIR = os.path.join(REPO, "train")
import run
import trainer

N, K, H, W, C = 6, 2, 3, 3, 4
CLASSES = [f"c{c}" for c in range(C)]
PATHS = [f"c{i % 2}/img_{i}.jpg" for i in range(N)]


def rows(num_rows=N, seed=0):
    rng = np.random.default_rng(seed)
    return dict(values=rng.normal(size=(num_rows, K, H, W)).astype(np.float32),
                indices=rng.integers(0, C, (num_rows, K, H, W)),
                labels=rng.integers(0, C, num_rows))


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "maps.h5"
    write_labelmaps(path, **rows(), paths=PATHS, classes=CLASSES)
    return path


def run_python(code, *args, limit=None, timeout=300):
    """Runs `code` in a fresh interpreter, with RLIMIT_FSIZE = `limit` bytes if given."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env,
                          preexec_fn=set_limit if limit is not None else None)


# ---- 2. image paths must stay inside the image root --------------------------------------

BAD_PATHS = [
    pytest.param("../../secret.jpg", "component '..'", id="dotdot-escape"),
    pytest.param("/etc/passwd", "absolute path", id="absolute"),
    pytest.param("", "empty path", id="empty"),
    pytest.param("c0/./img.jpg", "component '.'", id="dot-component"),
    pytest.param("c0//img.jpg", "component ''", id="empty-component"),
    pytest.param("c0/", "component ''", id="trailing-slash"),
    pytest.param("\\\\server\\share\\img.jpg", "absolute path", id="backslash-unc"),
    pytest.param("C:\\images\\img.jpg", "absolute path", id="drive-letter"),
    pytest.param("c0/img\n.jpg", "control character", id="newline"),
    pytest.param(PATHS[0], "must be unique", id="duplicate"),
]


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_write_labelmaps_refuses_bad_path(tmp_path, bad, message):
    paths = PATHS[:3] + [bad] + PATHS[4:]
    with pytest.raises(ValueError, match="paths") as error:
        write_labelmaps(tmp_path / "x.h5", **rows(), paths=paths, classes=CLASSES)
    assert message in str(error.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_writer_refuses_bad_path(tmp_path, bad, message):
    data = rows()
    with LabelMapWriter(tmp_path / "x.h5", num_rows=N, num_classes=C, topk=K, height=H,
                        width=W, classes=CLASSES) as writer:
        writer.write(np.arange(3), data["values"][:3], data["indices"][:3],
                     data["labels"][:3], PATHS[:3])
        with pytest.raises(ValueError, match="paths") as error:
            writer.write(np.array([3]), data["values"][3:4], data["indices"][3:4],
                         data["labels"][3:4], [bad])
        assert message in str(error.value)
        assert writer.num_written == 3


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_open_refuses_bad_path_patched_into_file(good_file, tmp_path, capsys, bad, message):
    with h5py.File(good_file, "r+") as f:
        f["paths"][3] = bad
    for read in (read_header, LabelMapStore.open):
        with pytest.raises(LabelMapError, match="dataset /paths") as error:
            read(good_file)
        assert str(good_file) in str(error.value) and message in str(error.value)
        assert "[3]" in str(error.value) or "row" in str(error.value)
    # show reads the store's /paths: it cannot be made to read outside the image root.
    assert main(["show", str(good_file), "--images", str(tmp_path), "--index", "3",
                 "--box", "0", "0", "1", "1", "--out", str(tmp_path / "x.png")]) == 1
    assert "dataset /paths" in capsys.readouterr().err


# ---- 3. declared sizes must be backed by stored data -------------------------------------

def bomb(path, name, *, chunks=True):
    """Replaces dataset /name of a good file by one of the same shape with no data."""
    with h5py.File(path, "r+") as f:
        ds = f[name]
        shape, dtype = ds.shape, ds.dtype
        del f[name]
        f.create_dataset(name, shape=shape, dtype=dtype,
                         chunks=(1,) + shape[1:] if chunks else None)


def huge_file(path, num_rows):
    """A few kB declaring num_rows x K x H x W maps (chunked, nothing written)."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format="dali-relabel-labelmaps", version=1, num_classes=C, topk=K,
                       height=H, width=W, value_kind="logits")
        for name, dtype in (("values", np.float16), ("indices", np.int16)):
            f.create_dataset(name, shape=(num_rows, K, H, W), dtype=dtype, chunks=(1, K, H, W))
        f.create_dataset("labels", shape=(num_rows,), dtype=np.int64, chunks=(4096,))
        f.create_dataset("paths", shape=(num_rows,), dtype=h5py.string_dtype(), chunks=(4096,))
        f.create_dataset("classes", data=np.array(CLASSES, dtype=object),
                         dtype=h5py.string_dtype())


STORAGE_BOMBS = [
    pytest.param(lambda p: huge_file(p, 10 ** 7), "/values: 0 of 10000000 chunks stored",
                 id="chunked-values-1e7-rows-nothing-written"),
    pytest.param(lambda p: huge_file(p, 10 ** 9), "/values: 0 of 1000000000 chunks stored",
                 id="chunked-values-1e9-rows-nothing-written"),
    pytest.param(lambda p: bomb(p, "values", chunks=False), "/values: no data stored",
                 id="contiguous-values-never-written"),
    pytest.param(lambda p: bomb(p, "labels"), "/labels: 0 of 6 chunks stored",
                 id="labels-never-written"),
    pytest.param(lambda p: bomb(p, "paths", chunks=False), "/paths: no data stored",
                 id="paths-never-written"),
    pytest.param(lambda p: bomb(p, "classes"), "/classes: 0 of 4 chunks stored",
                 id="classes-never-written"),
]


@pytest.mark.parametrize("make, message", STORAGE_BOMBS)
def test_declared_sizes_must_be_stored(good_file, capsys, make, message):
    make(good_file)
    assert os.path.getsize(good_file) < 64 << 10
    with pytest.raises(LabelMapError, match=message) as error:
        LabelMapStore.open(good_file, placement="memory")
    assert str(good_file) in str(error.value)
    for extra in ([], ["--full"]):
        assert main(["info", str(good_file), *extra]) == 1
        assert f"validation: FAILED: {good_file}" in capsys.readouterr().out


def test_written_and_sizes_are_guarded_too(good_file):
    with h5py.File(good_file, "r+") as f:
        f.create_dataset("written", shape=(N,), dtype=np.uint8, chunks=(1,))
    with pytest.raises(LabelMapError, match="/written: 0 of 6 chunks stored"):
        read_header(good_file)
    with h5py.File(good_file, "r+") as f:
        del f["written"]
        f.create_dataset("sizes", shape=(N, 2), dtype=np.int32)
    with pytest.raises(LabelMapError, match="/sizes: no data stored"):
        read_header(good_file)


def test_loading_needs_the_memory(good_file, monkeypatch):
    # Room for /paths (6 x 64 bytes) and the other small datasets, not for the 432 bytes
    # of maps.
    monkeypatch.setattr(store_module, "_available_memory", lambda: 400)
    with pytest.raises(LabelMapError, match="needs .* bytes of memory, 400 are available; "
                                            "open it with placement='mmap'"):
        LabelMapStore.open(good_file, placement="memory")


@pytest.mark.parametrize("full", [False, True], ids=["info", "info-full"])
def test_info_never_loads_the_maps(tmp_path, monkeypatch, capsys, full):
    num_rows = 2000  # 2 x 2000 x 64 x 7 x 7 x 2 bytes = 25 MB of maps, compressed
    path = tmp_path / "big.h5"
    values = np.zeros((num_rows, 64, 7, 7), np.float16)
    write_labelmaps(path, values, np.zeros(values.shape, np.int64), np.zeros(num_rows, np.int64),
                    [f"c0/{i}.jpg" for i in range(num_rows)], CLASSES, compression="gzip")
    monkeypatch.setattr(store_module, "_SCAN_CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        assert main(["info", str(path)] + (["--full"] if full else [])) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "validation: ok" in capsys.readouterr().out
    assert peak < 8 << 20, peak


# ---- 4. a full disk loses no finished row ------------------------------------------------

WRITER_JOB = textwrap.dedent("""
    import sys
    import numpy as np
    from dali_relabel.labelmaps.store import LabelMapError, LabelMapWriter

    def job(out, num_rows):
        rng = np.random.default_rng(0)
        values = rng.normal(size=(num_rows, 2, 3, 3)).astype(np.float32)
        indices = rng.integers(0, 4, (num_rows, 2, 3, 3))
        paths = [f"c0/{'x' * 200}_{row}.jpg" for row in range(num_rows)]
        with LabelMapWriter(out, num_rows=num_rows, num_classes=4, topk=2, height=3, width=3,
                            classes=["a", "b", "c", "d"]) as writer:
            for start in writer.missing()[::10]:
                rows = np.arange(start, min(start + 10, num_rows))
                writer.write(rows, values[rows], indices[rows], rows % 4,
                             [paths[row] for row in rows])

    if __name__ == "__main__":
        try:
            job(sys.argv[1], int(sys.argv[2]))
        except LabelMapError as e:
            print(e)
            sys.exit(1)
""")


def test_full_disk_keeps_the_written_rows_and_the_rerun_completes(tmp_path):
    namespace = {}
    exec(WRITER_JOB, namespace)  # the same job in this process, without the limit
    reference = tmp_path / "reference.h5"
    namespace["job"](reference, 400)
    out = tmp_path / "maps.h5"
    # Room for the maps but not for all the paths (their strings grow the file as written).
    limited = run_python(WRITER_JOB, out, 400, limit=os.path.getsize(reference) - 20_000)
    assert limited.returncode == 1, limited.stderr[-2000:]
    message = limited.stdout.strip()
    assert "\n" not in message and "no space left" in message and "file-size limit" in message
    assert "rerun to continue" in message and not out.exists()
    with h5py.File(f"{out}.partial") as f:
        written = int(f["written"][()].sum())
    assert 0 < written < 400
    namespace["job"](out, 400)
    with LabelMapStore.open(out) as resumed, LabelMapStore.open(reference) as whole:
        assert resumed.paths == whole.paths
        assert torch.equal(resumed.values, whole.values)
        assert torch.equal(resumed.indices, whole.indices)


@pytest.fixture
def release(tmp_path):
    """Two class folders of JPEGs and the official-format .pt maps of every image."""
    images, src = tmp_path / "train", tmp_path / "relabel"
    gen = torch.Generator().manual_seed(0)
    for c in range(2):
        os.makedirs(images / f"c{c}")
        os.makedirs(src / f"c{c}")
        for i in range(3):
            Image.new("RGB", (16, 12), (90 * c, 40, 0)).save(images / f"c{c}" / f"img_{i}.jpg")
            maps = torch.stack([torch.randn(K, H, W, generator=gen),
                                torch.randint(0, 2, (K, H, W), generator=gen).float()])
            torch.save(maps, src / f"c{c}" / f"img_{i}.pt")
    return images, src


IMPORT = "import sys; from dali_relabel.cli import main; sys.exit(main(sys.argv[1:]))"


def test_import_pt_under_a_file_size_limit(release, tmp_path):
    images, src = release
    args = ["import-pt", str(src), "--images", str(images), "--layout", "hw"]
    assert main([*args, "--out", str(tmp_path / "reference.h5")]) == 0
    out = tmp_path / "maps.h5"
    limited = run_python(IMPORT, *args, "--out", out, limit=12_000)
    assert limited.returncode == 1, (limited.returncode, limited.stderr[-2000:])
    errors = [line for line in limited.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "no space left" in errors[0], limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    assert main([*args, "--out", str(out)]) == 0
    with LabelMapStore.open(out) as resumed, LabelMapStore.open(tmp_path / "reference.h5") as ref:
        assert resumed.paths == ref.paths and torch.equal(resumed.values, ref.values)


# ---- 5. a lock is a lock -----------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time, h5py
    f = h5py.File(sys.argv[1], "r+")
    print("holding", flush=True)
    time.sleep(60)
""")


def test_a_locked_partial_is_reported_as_locked_not_damaged(release, tmp_path, capsys):
    images, src = release
    out = tmp_path / "maps.h5"
    partial = f"{out}.partial"
    LabelMapWriter(out, num_rows=6, num_classes=2, topk=K, height=H, width=W,
                   classes=["c0", "c1"]).close()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, partial], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        attempts = [
            lambda: LabelMapWriter(out, num_rows=6, num_classes=2, topk=K, height=H, width=W,
                                   classes=["c0", "c1"]),
            lambda: check_resumable(partial, paths=[], identity={}),
            lambda: LabelMapStore.open(partial),
        ]
        for attempt in attempts:
            with pytest.raises(LabelMapError, match="is locked by another process") as error:
                attempt()
            assert partial in str(error.value) and "delete" not in str(error.value)
            assert "damaged" not in str(error.value)
        assert main(["import-pt", str(src), "--images", str(images), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "is locked by another process" in err and "delete" not in err
    finally:
        holder.kill()
        holder.wait()
    LabelMapWriter(out, num_rows=6, num_classes=2, topk=K, height=H, width=W,
                   classes=["c0", "c1"]).close()  # the lock went with its holder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), path)
    return path


def annotate_args(images, out, checkpoint, workers):
    return ["annotate", "--model", "test_resnet", "--checkpoint", str(checkpoint),
            "--images", str(images), "--out", str(out), "--input-size", "64", "--map-size",
            "2", "--topk", "2", "--batch-size", "1", "--device", "cpu", "--num-workers",
            str(workers)]


def test_rerun_right_after_kill_9_is_not_locked_out_by_workers(release, tmp_path, checkpoint):
    images, _ = release
    out = tmp_path / "maps.h5"
    args = annotate_args(images, out, checkpoint, workers=1)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # Not run_python: reading the output would wait for the orphaned worker as well.
    killed = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_TWO_WRITES, *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    # The killed job's loading worker lives on for a few seconds; it must not hold the file.
    h5py.File(f"{out}.partial", "r+").close()
    assert main(args) == 0
    assert LabelMapStore.open(out).paths == [f"c{c}/img_{i}.jpg" for c in range(2)
                                             for i in range(3)]


# ---- 6. path lists: path TAB reason, '#' only starts comments ----------------------------

PATH_LISTS = [
    pytest.param("c00/img #7.JPEG\tempty file (0 bytes)\n", ["c00/img #7.JPEG"],
                 id="hash-in-file-name"),
    pytest.param("# made by verify\n\nc0/a.jpg\n c0/b.jpg\tx # y\n", ["c0/a.jpg", " c0/b.jpg"],
                 id="comment-blank-and-reason"),
    pytest.param("c0/a.jpg\r\n", ["c0/a.jpg"], id="crlf"),
    pytest.param("../secret.jpg\tbad\n", "line 1: not normalized", id="escaping-path"),
    pytest.param("c0/a.jpg\n/abs.jpg\n", "line 2: absolute path", id="absolute-path"),
]


@pytest.mark.parametrize("text, expected", PATH_LISTS)
def test_read_path_list(tmp_path, text, expected):
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    if isinstance(expected, list):
        assert read_path_list(str(path)) == expected
    else:
        with pytest.raises(ValueError, match=expected) as error:
            read_path_list(path)
        assert str(path) in str(error.value)


def test_read_path_list_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"cannot read the path list {tmp_path / 'no.txt'}"):
        read_path_list(tmp_path / "no.txt")
    assert read_path_list(None) == [] and read_path_list(["a/b.jpg"]) == ["a/b.jpg"]


def test_verify_list_round_trips_through_exclude(tmp_path, capsys):
    root = tmp_path / "train"
    os.makedirs(root / "c00")
    Image.new("RGB", (16, 16), (200, 0, 0)).save(root / "c00" / "good.JPEG")
    (root / "c00" / "img #7.JPEG").write_bytes(b"")
    out = tmp_path / "bad.txt"
    assert main(["verify", str(root), "--out", str(out), "--num-threads", "1"]) == 1
    assert "c00/img #7.JPEG\t" in out.read_text()
    assert read_path_list(str(out)) == ["c00/img #7.JPEG"]
    write_bad_list(str(out), [("c0/x.jpg", "two\nlines")])
    assert out.read_text().splitlines()[1] == "c0/x.jpg\ttwo lines"


def test_name_lists_keep_hashes_inside_names(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# classes\nn01#a\n  n02  \n\n")
    assert read_name_list(path, argument="--classes") == ["n01#a", "n02"]


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


def test_writers_refuse_empty_maps(tmp_path):
    data = rows()
    with pytest.raises(ValueError, match="K, H, W >= 1"):
        write_labelmaps(tmp_path / "x.h5", data["values"][:, :, :0], data["indices"][:, :, :0],
                        data["labels"], PATHS, CLASSES)
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        LabelMapWriter(tmp_path / "x.h5", num_rows=N, num_classes=C, topk=K, height=0, width=W,
                       classes=CLASSES)
    assert os.listdir(tmp_path) == []


# ---- 11. images over PIL's pixel limit decode, as DALI decodes them ----------------------

def test_images_over_pils_pixel_limit_decode_in_annotate_and_show(release, tmp_path,
                                                                   checkpoint, monkeypatch,
                                                                   capsys):
    images, _ = release
    out = tmp_path / "maps.h5"
    # The 16 x 12 test images are over twice this; the forked loading worker sees it too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    assert main(annotate_args(images, out, checkpoint, workers=1)) == 0
    assert main(["show", str(out), "--images", str(images), "--index", "0", "--box", "0",
                 "0", "1", "1", "--out", str(tmp_path / "row0.png")]) == 0
    assert "DecompressionBomb" not in capsys.readouterr().err
    assert (tmp_path / "row0.png").read_bytes()[:4] == b"\x89PNG"
    assert Image.MAX_IMAGE_PIXELS == 50  # lifted only while decoding


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


# ---- 14. output paths are checked before the work ----------------------------------------

def output_cases(tmp_path, images, src):
    existing_file = tmp_path / "file.txt"
    existing_file.write_text("x")
    missing = tmp_path / "no" / "such" / "dir"
    return [
        (["import-pt", src, "--images", images, "--out", ""], "out: expected a file path"),
        (["import-pt", src, "--images", images, "--out", tmp_path], "is a folder"),
        (["import-pt", src, "--images", images, "--out", missing / "x.h5"], "does not exist"),
        (["annotate", "--model", "test_resnet", "--checkpoint", "none.pth", "--images", images,
          "--out", ""], "out: expected a file path"),
        (["verify", images, "--out", ""], "--out: expected a file path"),
        (["verify", images, "--out", missing / "bad.txt"], "does not exist"),
        (["show", "maps.h5", "--images", images, "--index", "0", "--out", tmp_path],
         "is a folder"),
    ], [
        (["--output", existing_file], "--output: "),
        (["--output", ""], "--output: expected a folder path"),
    ]


def test_output_paths_are_checked_before_any_work(release, tmp_path, capsys):
    images, src = release
    cli_cases, train_cases = output_cases(tmp_path, images, src)
    for argv, message in cli_cases:
        assert main([str(arg) for arg in argv]) == 1, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert not os.path.exists(".partial") and not os.path.exists(tmp_path / ".partial")
    for argv, message in train_cases:
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
