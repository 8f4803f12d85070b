"""Tests of the label-map store (dali_relabel.labelmaps.store) and the `dali-relabel info` command."""
import logging
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

import dali_relabel.labelmaps.store as store_module
from dali_relabel.cli import main
from dali_relabel.labelmaps.store import (
    LabelMapError,
    LabelMapStore,
    LabelMapWriter,
    read_header,
    write_labelmaps,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K, H, W, C = 12, 3, 4, 5, 10
PROVENANCE = {"annotator": "resnet-test", "source": "unit test", "epochs": 3, "top1": 80.5}


def make_rows(num_rows=N, num_classes=C, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_rows)
    labels[1] = -1
    return {
        "values": (rng.normal(size=(num_rows, K, H, W)) * 8).astype(np.float32),
        "indices": rng.integers(0, num_classes, (num_rows, K, H, W)),
        "labels": labels,
        "paths": [f"n{label:08d}/img_{i}.JPEG" for i, label in enumerate(labels)],
    }


CLASSES = [f"n{c:08d}" for c in range(C)]


@pytest.fixture
def rows():
    return make_rows()


@pytest.fixture
def good_file(tmp_path, rows):
    path = tmp_path / "maps.h5"
    write_labelmaps(path, **rows, classes=CLASSES, **PROVENANCE)
    return path


def assert_store_equals(store, rows, classes=CLASSES):
    assert len(store) == len(rows["labels"])
    assert (store.num_classes, store.topk, store.height, store.width) == (len(classes), K, H, W)
    assert store.values.dtype == torch.float16
    np.testing.assert_array_equal(store.values.cpu().numpy(), rows["values"].astype(np.float16))
    np.testing.assert_array_equal(store.indices.cpu().numpy(), rows["indices"])
    assert store.labels.dtype == torch.int64
    np.testing.assert_array_equal(store.labels.cpu().numpy(), rows["labels"])
    assert store.paths == rows["paths"]
    assert store.classes == classes


@pytest.mark.parametrize("placement", ["mmap", "memory", "pinned", "device"])
def test_round_trip_every_placement(good_file, rows, placement):
    device = "cpu" if placement == "device" else None
    if placement == "pinned" and not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA"):
            store = LabelMapStore.open(good_file, placement=placement)
    else:
        store = LabelMapStore.open(good_file, placement=placement, device=device)
    with store:
        assert store.placement == placement
        assert store.indices.dtype == torch.int16
        assert_store_equals(store, rows)
        assert store.attrs == {
            "format": "dali-relabel-labelmaps", "version": 1, "num_classes": C, "topk": K,
            "height": H, "width": W, "value_kind": "logits", **PROVENANCE,
        }
        assert store.header.provenance == PROVENANCE
        assert str(good_file) in repr(store)
    with pytest.raises(ValueError, match="closed"):
        store.values


def test_write_accepts_torch_tensors(tmp_path, rows):
    path = tmp_path / "torch.h5"
    tensors = {key: torch.as_tensor(value) if key != "paths" else value
               for key, value in rows.items()}
    tensors["values"] = tensors["values"].to(torch.bfloat16)
    write_labelmaps(path, **tensors, classes=CLASSES)
    expected = dict(rows, values=tensors["values"].float().numpy())
    with LabelMapStore.open(path, placement="memory") as store:
        assert_store_equals(store, expected)


def test_mmap_maps_the_file_without_copying(good_file):
    with h5py.File(good_file) as f:
        offsets = {name: f[name].id.get_offset() for name in ("values", "indices")}
        assert f["values"].chunks is None and f["indices"].chunks is None
    store = LabelMapStore.open(good_file, placement="mmap")
    real = os.path.realpath(good_file)
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mappings.append((start, end, int(fields[2], 16)))
    for name in ("values", "indices"):
        ptr = getattr(store, name).data_ptr()
        # The tensor's memory lies in a mapping of this file, at the dataset's file offset.
        assert any(start <= ptr < end and ptr - start + file_offset == offsets[name]
                   for start, end, file_offset in mappings), (name, mappings)


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_file_needs_memory_placement(tmp_path, rows, compression):
    path = tmp_path / "archive.h5"
    write_labelmaps(path, **rows, classes=CLASSES, compression=compression)
    with h5py.File(path) as f:
        assert f["values"].compression == compression
        assert f["values"].chunks == (1, K, H, W)
    with pytest.raises(LabelMapError, match="placement='memory'") as error:
        LabelMapStore.open(path, placement="mmap")
    assert str(path) in str(error.value) and "/values" in str(error.value)
    with LabelMapStore.open(path, placement="memory") as store:
        assert_store_equals(store, rows)
    assert not read_header(path).mmappable


def test_int32_indices_when_classes_exceed_int16(tmp_path):
    num_classes = 40_000
    rows = make_rows(num_rows=4, num_classes=num_classes)
    rows["indices"][0, 0, 0, 0] = num_classes - 1
    classes = [f"class{c}" for c in range(num_classes)]
    path = tmp_path / "wide.h5"
    write_labelmaps(path, **rows, classes=classes)
    with h5py.File(path) as f:
        assert f["indices"].dtype == np.int32
    with LabelMapStore.open(path) as store:
        assert store.indices.dtype == torch.int32
        assert int(store.indices.max()) == num_classes - 1
        assert_store_equals(store, rows, classes=classes)


def writer_args(**overrides):
    return {"num_rows": N, "num_classes": C, "topk": K, "height": H, "width": W,
            "classes": CLASSES, **overrides}


def write_some(writer, rows, ids):
    ids = np.asarray(ids)
    writer.write(ids, rows["values"][ids], rows["indices"][ids], rows["labels"][ids],
                 [rows["paths"][i] for i in ids])


def test_writer_resumes_random_rows_across_sessions(tmp_path, rows, caplog):
    path = tmp_path / "maps.h5"
    partial = tmp_path / "maps.h5.partial"
    order = np.random.default_rng(1).permutation(N)
    first, second = order[: N // 2], order[N // 2:]
    with caplog.at_level(logging.WARNING, logger="dali_relabel.labelmaps.store"):
        with LabelMapWriter(path, **writer_args(), annotator="resnet-test") as writer:
            write_some(writer, rows, first[:3])
            write_some(writer, rows, torch.as_tensor(first[3:]))
            assert writer.num_written == N // 2 and not writer.is_complete
    assert f"{N - N // 2} of {N} rows missing" in caplog.text
    assert partial.exists() and not path.exists()
    with pytest.raises(LabelMapError, match="rows were never written"):
        LabelMapStore.open(partial)

    writer = LabelMapWriter(path, **writer_args(), annotator="resnet-test")
    np.testing.assert_array_equal(writer.missing(), np.sort(second))
    write_some(writer, rows, second[::-1])
    assert writer.is_complete and writer.missing().size == 0
    writer.close()
    assert path.exists() and not partial.exists()

    with LabelMapStore.open(path) as store:
        assert_store_equals(store, rows)
        assert store.attrs["annotator"] == "resnet-test"
        store.validate(full=True, progress=False)
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["written"][()], np.ones(N, dtype=np.uint8))


@pytest.mark.parametrize("overrides, mismatch", [
    ({"topk": K + 1}, "topk"),
    ({"num_rows": N + 1}, "num_rows"),
    ({"classes": CLASSES[::-1]}, "class names"),
])
def test_writer_resume_with_other_geometry_raises(tmp_path, rows, overrides, mismatch):
    path = tmp_path / "maps.h5"
    with LabelMapWriter(path, **writer_args()) as writer:
        write_some(writer, rows, [0, 5])
    with pytest.raises(LabelMapError, match=mismatch) as error:
        LabelMapWriter(path, **writer_args(**overrides))
    assert f"{path}.partial" in str(error.value)


def test_writer_refuses_an_unreadable_partial(tmp_path):
    path = tmp_path / "maps.h5"
    with open(f"{path}.partial", "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(LabelMapError, match="delete") as error:
        LabelMapWriter(path, **writer_args())
    assert f"{path}.partial" in str(error.value)


def test_writer_rejects_bad_rows(tmp_path, rows):
    with LabelMapWriter(tmp_path / "maps.h5", **writer_args()) as writer:
        with pytest.raises(ValueError, match="distinct"):
            write_some(writer, rows, [3, 1, 3])
        with pytest.raises(ValueError, match="rows"):
            writer.write(np.array([N]), rows["values"][:1], rows["indices"][:1],
                         rows["labels"][:1], rows["paths"][:1])
        assert writer.num_written == 0


def set_attr(path, name, value):
    with h5py.File(path, "r+") as f:
        f.attrs[name] = value


def delete(path, name, attribute=False):
    with h5py.File(path, "r+") as f:
        del (f.attrs if attribute else f)[name]


def rewrite(path, name, data):
    """Replaces (or adds) dataset `name`."""
    with h5py.File(path, "r+") as f:
        if name in f:
            del f[name]
        f.create_dataset(name, data=data)


CORRUPTIONS = {
    "wrong format": (lambda p: set_attr(p, "format", "other"), "attribute 'format'"),
    "newer version": (lambda p: set_attr(p, "version", 2),
                      "found version 2, this library reads version 1"),
    "missing attr": (lambda p: delete(p, "topk", attribute=True), "attribute 'topk'"),
    "missing dataset": (lambda p: delete(p, "labels"), "missing dataset.*/labels"),
    "int32 values": (lambda p: rewrite(p, "values", np.zeros((N, K, H, W), np.int32)),
                     "/values: expected dtype float16"),
    "short labels": (lambda p: rewrite(p, "labels", np.zeros(N - 1, np.int64)),
                     f"/labels: expected shape \\[{N}\\]"),
    "classes vs num_classes": (lambda p: rewrite(p, "classes", np.array(CLASSES[:-1], "S")),
                               f"/classes: expected shape \\[{C}\\]"),
    "indices shape": (lambda p: rewrite(p, "indices", np.zeros((N, K, H, W + 1), np.int16)),
                      "/indices: expected shape"),
    "narrow indices": (lambda p: rewrite(p, "indices", np.zeros((N, K, H, W), np.int8)),
                       "/indices: expected int16"),
    "sizes shape": (lambda p: rewrite(p, "sizes", np.ones((N, 3), np.int32)),
                    f"/sizes: expected shape \\[{N}, 2\\]"),
    "float sizes": (lambda p: rewrite(p, "sizes", np.ones((N, 2), np.float32)),
                    "/sizes: expected an integer dtype"),
    "zero sizes": (lambda p: rewrite(p, "sizes", np.eye(N, 2, dtype=np.int32)[::-1]),
                   r"/sizes: 12 rows hold a height or width < 1, first rows \[0, 1, 2, 3, 4\]"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_open_refuses_inconsistent_files(good_file, corruption):
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(good_file)
    with pytest.raises(LabelMapError, match=message) as error:
        LabelMapStore.open(good_file, placement="memory")
    assert str(good_file) in str(error.value)


def test_open_refuses_unwritten_rows(good_file):
    with h5py.File(good_file, "r+") as f:
        written = np.ones(N, np.uint8)
        written[[2, 7]] = 0
        f.create_dataset("written", data=written)
    with pytest.raises(LabelMapError, match=f"/written: 2 of {N} rows were never written"):
        LabelMapStore.open(good_file)


@pytest.mark.parametrize("damage", ["truncate to half", "truncate last byte", "garbage",
                                    "missing"])
def test_open_refuses_damaged_files(good_file, damage):
    size = os.path.getsize(good_file)
    if damage == "truncate to half":
        os.truncate(good_file, size // 2)
    elif damage == "truncate last byte":
        os.truncate(good_file, size - 1)
    elif damage == "garbage":
        good_file.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        good_file.unlink()
    with pytest.raises(LabelMapError) as error:
        LabelMapStore.open(good_file)
    assert str(good_file) in str(error.value)


def test_open_refuses_truncated_data_behind_an_intact_header(good_file, tmp_path):
    # Rebuild the file so that /values' data is its tail, cut into that data, and patch the
    # end-of-file address of the (version 0) superblock so the header looks consistent.
    path = tmp_path / "cut.h5"
    with h5py.File(good_file) as src, h5py.File(path, "w", libver="earliest") as dst:
        dst.attrs.update(src.attrs)
        names = ["classes", "paths", "labels", "indices", "values"]
        for name in names:
            dst.create_dataset(name, shape=src[name].shape, dtype=src[name].dtype)
        dst.flush()
        for name in names:
            dst[name][...] = src[name][()]
    layout = read_header(path).layout["values"]
    assert layout.offset + layout.nbytes == os.path.getsize(path)
    cut = layout.offset + layout.nbytes // 2
    os.truncate(path, cut)
    with open(path, "r+b") as f:
        assert f.read(9)[8] == 0  # superblock version 0: end-of-file address at byte 40
        f.seek(40)
        f.write(cut.to_bytes(8, "little"))
    with pytest.raises(LabelMapError, match="/values") as error:
        LabelMapStore.open(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("rows_per_chunk", [1, 4, N])
def test_full_validation_finds_bad_values_and_classes(good_file, monkeypatch, rows_per_chunk):
    monkeypatch.setattr(store_module, "_SCAN_CHUNK_BYTES", rows_per_chunk * K * H * W * 2)
    with h5py.File(good_file, "r+") as f:
        values = f["values"][()]
        values[3, 0, 1, 1] = np.nan
        values[8, 2, 0, 0] = np.inf
        f["values"][...] = values
        f["indices"][5, 1, 2, 3] = C
        f["labels"][9] = C + 4
    with LabelMapStore.open(good_file) as store:
        store.validate()
        with pytest.raises(LabelMapError) as error:
            store.validate(full=True, progress=False)
    message = str(error.value)
    assert str(good_file) in message
    assert "/values: NaN/inf: 2 entries, first rows [3, 8]" in message
    assert f"/indices: class outside [0, {C}): 1 entries, first rows [5]" in message
    assert f"/labels: label outside [-1, {C}): 1 entries, first rows [9]" in message


@pytest.mark.parametrize("change, argument", [
    (lambda r: r.update(values=r["values"][0]), "values"),
    (lambda r: r.update(indices=r["indices"][:, :2]), "indices"),
    (lambda r: r.update(indices=r["indices"].astype(np.float32)), "indices"),
    (lambda r: r["indices"].__setitem__((0, 0, 0, 0), C), "indices"),
    (lambda r: r.update(labels=r["labels"][1:]), "labels"),
    (lambda r: r["labels"].__setitem__(0, -2), "labels"),
    (lambda r: r.update(paths=r["paths"][1:]), "paths"),
    (lambda r: r["paths"].__setitem__(0, "/abs/path.JPEG"), "paths"),
    (lambda r: r["values"].__setitem__((0, 0, 0, 0), 1e6), "values"),
    (lambda r: r.update(classes=CLASSES[:-1] + [CLASSES[0]]), "classes"),
    (lambda r: r.update(compression="zstd"), "compression"),
    (lambda r: r.update(version=2), "version"),
    (lambda r: r.update(annotator=["a", "list"]), "annotator"),
])
def test_write_labelmaps_rejects_bad_arguments(tmp_path, rows, change, argument):
    arguments = dict(rows, classes=CLASSES)
    change(arguments)
    path = tmp_path / "bad.h5"
    with pytest.raises(ValueError, match=argument):
        write_labelmaps(path, **arguments)
    assert os.listdir(tmp_path) == []


def test_open_rejects_bad_placement_arguments(good_file):
    with pytest.raises(ValueError, match="placement"):
        LabelMapStore.open(good_file, placement="gpu")
    with pytest.raises(ValueError, match="device"):
        LabelMapStore.open(good_file, placement="memory", device="cpu")


@pytest.mark.parametrize("full", [False, True])
def test_info_prints_summary(good_file, rows, capsys, full):
    assert main(["info", str(good_file)] + (["--full"] if full else [])) == 0
    out = capsys.readouterr().out
    assert f"rows (N):     {N}\n" in out
    assert f"classes (C):  {C}   first: n00000000, n00000001" in out
    assert f"top-k (K):    {K}\n" in out
    assert f"map (H x W):  {H} x {W}\n" in out
    assert f"/values:      float16 [{N}, {K}, {H}, {W}]" in out
    assert f"/indices:     int16 [{N}, {K}, {H}, {W}]" in out
    assert "contiguous (mmap-able)" in out
    distinct = len(set(rows["labels"].tolist()) - {-1})
    assert f"labels:       {distinct} distinct, 1 unknown (-1)" in out
    for key, value in PROVENANCE.items():
        assert f"  {key}: {value}\n" in out
    assert "  format:" not in out
    assert out.endswith(f"validation: ok ({'full scan' if full else 'metadata'})\n")


def test_info_reports_broken_files(good_file, capsys):
    with h5py.File(good_file, "r+") as f:
        f["indices"][0, 0, 0, 0] = -3
    assert main(["info", str(good_file)]) == 0
    assert main(["info", "--full", str(good_file)]) == 1
    assert "validation: FAILED: " in capsys.readouterr().out
    os.truncate(good_file, os.path.getsize(good_file) // 2)
    assert main(["info", str(good_file)]) == 1
    out = capsys.readouterr().out
    assert f"validation: FAILED: {good_file}" in out


def test_info_runs_as_module(good_file):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "dali_relabel.cli", "info", str(good_file)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"rows (N):     {N}" in result.stdout
    assert "validation: ok (metadata)" in result.stdout


def test_sizes_round_trip_and_are_optional(tmp_path, rows, good_file):
    sizes = np.stack([np.arange(N) + 100, np.arange(N) + 200], axis=1)
    path = tmp_path / "sized.h5"
    write_labelmaps(path, **rows, classes=CLASSES, sizes=sizes, adjust_orientation=True)
    with LabelMapStore.open(path) as store:
        assert store.sizes.dtype == torch.int32 and store.sizes.tolist() == sizes.tolist()
        assert store.sizes_adjust_orientation is True
    with LabelMapStore.open(good_file) as store:  # written without: still valid
        assert store.sizes is None and store.sizes_adjust_orientation is None


@pytest.mark.parametrize("sizes, message", [
    pytest.param(np.ones((N, 3), np.int64), rf"sizes: expected an integer array \[{N}, 2\]",
                 id="shape"),
    pytest.param(np.ones((N, 2)), "sizes: expected an integer array", id="float"),
    pytest.param(np.zeros((N, 2), np.int64), "sizes: expected image heights and widths >= 1",
                 id="zero"),
])
def test_write_refuses_bad_sizes(tmp_path, rows, sizes, message):
    with pytest.raises(ValueError, match=message):
        write_labelmaps(tmp_path / "x.h5", **rows, classes=CLASSES, sizes=sizes)
    assert not os.listdir(tmp_path)


def test_writer_with_sizes_needs_them_on_every_write_and_on_resume(tmp_path, rows):
    path = tmp_path / "maps.h5"
    sizes = np.full((N, 2), 7)
    with LabelMapWriter(path, **writer_args(), with_sizes=True) as writer:
        with pytest.raises(ValueError, match="sizes: required"):
            write_some(writer, rows, np.arange(3))
        ids = np.arange(N // 2)
        writer.write(ids, rows["values"][ids], rows["indices"][ids], rows["labels"][ids],
                     [rows["paths"][i] for i in ids], sizes=sizes[ids])
    with pytest.raises(LabelMapError, match="/sizes present"):
        LabelMapWriter(path, **writer_args())
    with LabelMapWriter(path, **writer_args(), with_sizes=True) as writer:
        ids = writer.missing()
        writer.write(ids, rows["values"][ids], rows["indices"][ids], rows["labels"][ids],
                     [rows["paths"][i] for i in ids], sizes=sizes[ids] + 1)
    with LabelMapStore.open(path) as store:
        assert store.sizes[: N // 2].eq(7).all() and store.sizes[N // 2:].eq(8).all()
        assert store.sizes_adjust_orientation is False


def test_add_sizes_in_place_keeps_the_maps(good_file, rows):
    before = read_header(good_file)
    store_module.add_sizes(good_file, np.full((N, 2), 3), adjust_orientation=False)
    store_module.add_sizes(good_file, np.full((N, 2), 5), adjust_orientation=True)  # replaces
    with LabelMapStore.open(good_file) as store:
        assert store.sizes.eq(5).all() and store.sizes_adjust_orientation is True
        assert_store_equals(store, rows)
    assert read_header(good_file).provenance == before.provenance
    assert sorted(os.listdir(os.path.dirname(good_file))) == [os.path.basename(good_file)]


def test_add_sizes_interrupted_leaves_the_file_as_it_was(good_file):
    """A file-size limit makes the copy fail part-way: the original stays, no temporary."""
    before = open(good_file, "rb").read()
    script = (
        "import resource, signal, numpy as np\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, {len(before) // 2}))\n"
        "from dali_relabel.labelmaps.store import add_sizes\n"
        f"add_sizes({str(good_file)!r}, np.full(({N}, 2), 3))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0, result.stderr
    assert "no space left" in result.stderr or "File too large" in result.stderr, result.stderr
    assert open(good_file, "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(good_file))) == [os.path.basename(good_file)]
    with pytest.raises(ValueError, match=rf"sizes: expected an integer array \[{N}, 2\]"):
        store_module.add_sizes(good_file, np.full((N + 1, 2), 3))
