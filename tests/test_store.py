"""Tests of the label-map package (dali_relabel.labelmaps: the store, the writers, the
checks on open, the full scan) and of the `dali-relabel info` and `index` commands."""
import logging
import os
import textwrap
import tracemalloc

import h5py
import numpy as np
import pytest
import torch

import dali_relabel._system as system_module
import dali_relabel.labelmaps.scan as scan_module
import dali_relabel.labelmaps.writer as writer_module
from dali_relabel.cli import main
from dali_relabel.labelmaps import (
    LabelMapError,
    LabelMapStore,
    LabelMapWriter,
    read_header,
    write_labelmaps,
)
from script_runner import run_code, run_python

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
    with caplog.at_level(logging.WARNING, logger="dali_relabel.labelmaps.writer"):
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
                   r"/sizes: 12 rows hold a height or width outside \[1, 2147483647\] \(int32\), "
                   r"found \[0, 1\], first rows \[0, 1, 2, 3, 4\]"),
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
    monkeypatch.setattr(scan_module, "SCAN_CHUNK_BYTES", rows_per_chunk * K * H * W * 2)
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
    result = run_python("dali_relabel.cli", "info", good_file, module=True, timeout=120)
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
    writer_module.add_sizes(good_file, np.full((N, 2), 3), adjust_orientation=False)
    writer_module.add_sizes(good_file, np.full((N, 2), 5), adjust_orientation=True)  # replaces
    with LabelMapStore.open(good_file) as store:
        assert store.sizes.eq(5).all() and store.sizes_adjust_orientation is True
        assert_store_equals(store, rows)
    assert read_header(good_file).provenance == before.provenance
    assert sorted(os.listdir(os.path.dirname(good_file))) == [os.path.basename(good_file)]


def test_add_sizes_interrupted_leaves_the_file_as_it_was(good_file):
    """A file-size limit makes the copy fail part-way: the original stays, no temporary."""
    before = open(good_file, "rb").read()
    script = ("import sys, numpy as np\n"
              "from dali_relabel.labelmaps import add_sizes\n"
              f"add_sizes(sys.argv[1], np.full(({N}, 2), 3))\n")
    result = run_code(script, good_file, file_size_limit=len(before) // 2)
    assert result.returncode != 0, result.stderr
    assert "no space left" in result.stderr or "File too large" in result.stderr, result.stderr
    assert open(good_file, "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(good_file))) == [os.path.basename(good_file)]
    with pytest.raises(ValueError, match=rf"sizes: expected an integer array \[{N}, 2\]"):
        writer_module.add_sizes(good_file, np.full((N + 1, 2), 3))


# ---- image paths stay inside the image root: refused when written and when opened --------

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
    pytest.param(None, "must be unique", id="duplicate"),  # the path of row 0
]


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_write_labelmaps_refuses_bad_path(tmp_path, rows, bad, message):
    paths = list(rows["paths"])
    paths[3] = paths[0] if bad is None else bad
    with pytest.raises(ValueError, match="paths") as error:
        write_labelmaps(tmp_path / "x.h5", **dict(rows, paths=paths), classes=CLASSES)
    assert message in str(error.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_writer_refuses_bad_path(tmp_path, rows, bad, message):
    with LabelMapWriter(tmp_path / "x.h5", **writer_args()) as writer:
        write_some(writer, rows, np.arange(3))
        with pytest.raises(ValueError, match="paths") as error:
            writer.write(np.array([3]), rows["values"][3:4], rows["indices"][3:4],
                         rows["labels"][3:4], [rows["paths"][0] if bad is None else bad])
        assert message in str(error.value)
        assert writer.num_written == 3


@pytest.mark.parametrize("bad, message", BAD_PATHS)
def test_open_refuses_bad_path_patched_into_file(good_file, rows, tmp_path, capsys, bad,
                                                 message):
    with h5py.File(good_file, "r+") as f:
        f["paths"][3] = rows["paths"][0] if bad is None else bad
    for read in (read_header, LabelMapStore.open):
        with pytest.raises(LabelMapError, match="dataset /paths") as error:
            read(good_file)
        assert str(good_file) in str(error.value) and message in str(error.value)
        assert "[3]" in str(error.value) or "row" in str(error.value)
    # show reads the store's /paths: it cannot be made to read outside the image root.
    assert main(["show", str(good_file), "--images", str(tmp_path), "--index", "3",
                 "--box", "0", "0", "1", "1", "--out", str(tmp_path / "x.png")]) == 1
    assert "dataset /paths" in capsys.readouterr().err


# ---- declared sizes must be backed by stored data ----------------------------------------

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
    pytest.param(lambda p: bomb(p, "labels"), f"/labels: 0 of {N} chunks stored",
                 id="labels-never-written"),
    pytest.param(lambda p: bomb(p, "paths", chunks=False), "/paths: no data stored",
                 id="paths-never-written"),
    pytest.param(lambda p: bomb(p, "classes"), f"/classes: 0 of {C} chunks stored",
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
    with pytest.raises(LabelMapError, match=f"/written: 0 of {N} chunks stored"):
        read_header(good_file)
    with h5py.File(good_file, "r+") as f:
        del f["written"]
        f.create_dataset("sizes", shape=(N, 2), dtype=np.int32)
    with pytest.raises(LabelMapError, match="/sizes: no data stored"):
        read_header(good_file)


def test_loading_needs_the_memory(tmp_path, rows, monkeypatch):
    path = tmp_path / "maps.h5"  # maps of 2 x 12 x 3 x 32 x 32 x 2 bytes = 147 kB
    write_labelmaps(path, np.zeros((N, K, 32, 32)), np.zeros((N, K, 32, 32), np.int64),
                    rows["labels"], rows["paths"], CLASSES)
    # Room for the metadata (/paths as Python strings and the rest), not for the maps.
    monkeypatch.setattr(system_module, "available_memory", lambda: 20_000)
    with LabelMapStore.open(path, placement="mmap"):
        pass
    with pytest.raises(LabelMapError, match=r"datasets /values and /indices: reading it needs "
                                            r"about 147.5 kB of memory \(147456 bytes\), 20.0 kB "
                                            r"are available; open it with placement='mmap'"):
        LabelMapStore.open(path, placement="memory")
    monkeypatch.setattr(system_module, "available_memory", lambda: 5_000)
    with pytest.raises(LabelMapError, match=r"the metadata \(/labels, /paths, /classes\) of 12 "
                                            r"rows: reading it needs about 8.6 kB"):
        LabelMapStore.open(path, placement="mmap")


@pytest.mark.parametrize("full", [False, True], ids=["info", "info-full"])
def test_info_never_loads_the_maps(tmp_path, monkeypatch, capsys, full):
    num_rows = 2000  # 2 x 2000 x 64 x 7 x 7 x 2 bytes = 25 MB of maps, compressed
    path = tmp_path / "big.h5"
    values = np.zeros((num_rows, 64, 7, 7), np.float16)
    write_labelmaps(path, values, np.zeros(values.shape, np.int64), np.zeros(num_rows, np.int64),
                    [f"c0/{i}.jpg" for i in range(num_rows)], CLASSES, compression="gzip")
    monkeypatch.setattr(scan_module, "SCAN_CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        assert main(["info", str(path)] + (["--full"] if full else [])) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "validation: ok" in capsys.readouterr().out
    assert peak < 8 << 20, peak


# ---- a full disk loses no finished row ---------------------------------------------------

WRITER_JOB = textwrap.dedent("""
    import sys
    import numpy as np
    from dali_relabel.labelmaps import LabelMapError, LabelMapWriter

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
    limited = run_code(WRITER_JOB, out, 400, file_size_limit=os.path.getsize(reference) - 20_000)
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


def test_writers_refuse_empty_maps(tmp_path, rows):
    with pytest.raises(ValueError, match="K, H, W >= 1"):
        write_labelmaps(tmp_path / "x.h5", rows["values"][:, :, :0], rows["indices"][:, :, :0],
                        rows["labels"], rows["paths"], CLASSES)
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        LabelMapWriter(tmp_path / "x.h5", **writer_args(height=0))
    assert os.listdir(tmp_path) == []


# ---- 2. a store must not change under its reader -----------------------------------------

def test_check_unchanged_tells_a_file_modified_in_place(tmp_path, rows, good_file):
    other = tmp_path / "other.h5"
    write_labelmaps(other, **make_rows(seed=1), classes=CLASSES, **PROVENANCE)
    assert other.stat().st_size == good_file.stat().st_size
    hour_ago = good_file.stat().st_mtime_ns - 3600 * 10 ** 9
    for modify in ("cp", "truncate", "touch"):
        os.utime(good_file, ns=(hour_ago, hour_ago))  # written long before the run
        with LabelMapStore.open(good_file) as store:
            store.check_unchanged()
            if modify == "cp":  # a `cp` of another valid file: same size, other maps
                with open(other, "rb") as source, open(good_file, "r+b") as target:
                    target.write(source.read())
                expected = "contents rewritten"
            elif modify == "truncate":  # reading the map now would end in SIGBUS
                os.truncate(good_file, good_file.stat().st_size // 2)
                expected = f"size {other.stat().st_size} -> "
            else:
                os.utime(good_file)
                expected = "contents rewritten"
            with pytest.raises(LabelMapError) as error:
                store.check_unchanged()
            message = str(error.value)
            assert message.startswith(f"{good_file}: the label-map file was modified in place "
                                      f"while in use ({expected}")
            assert "renaming it onto the old name" in message
            with pytest.raises(LabelMapError, match="modified in place"):
                store.validate()
        write_labelmaps(good_file, **rows, classes=CLASSES, **PROVENANCE)


def test_a_store_replaced_by_rename_keeps_reading_the_old_file(tmp_path, rows, good_file):
    with LabelMapStore.open(good_file) as store:
        before = store.values.clone()
        write_labelmaps(good_file, **make_rows(seed=1), classes=CLASSES)  # temporary + rename
        store.check_unchanged()  # replaced, not modified: the store reads the file it opened
        assert torch.equal(store.values, before)
    with pytest.raises(ValueError, match="closed"):
        store.check_unchanged()
    built = LabelMapStore(header=read_header(good_file), placement="memory",
                          values=before, indices=before.long(), labels=torch.zeros(N),
                          paths=rows["paths"], classes=CLASSES)
    built.check_unchanged()  # made from tensors: nothing to check


def test_the_store_closes_its_file(good_file):
    def open_files():
        return sum(os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(good_file)
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    before = open_files()
    for placement in ("mmap", "memory"):
        with LabelMapStore.open(good_file, placement=placement):
            assert open_files() > before  # the store's descriptor (and the memory maps')
        assert open_files() == before


# ---- 8. placement="device" without a GPU -------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_placement_without_a_gpu_is_a_named_value_error(good_file):
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"^device must be an available device: 'cuda(:0)?' "
                                             r"was asked for but CUDA is not available"):
            LabelMapStore.open(good_file, placement="device", device=device)
    with pytest.raises(ValueError, match=r"^device must be a torch device such as 'cuda', "
                                         r"'cuda:1' or 'cpu', got 'gpu:x'"):
        LabelMapStore.open(good_file, placement="device", device="gpu:x")
    with LabelMapStore.open(good_file, placement="device") as store:  # the default: CPU here
        assert store.values.device.type == "cpu"


# ---- 9. one writer per file --------------------------------------------------------------

def test_a_second_writer_of_the_same_file_is_refused(tmp_path, rows):
    path = tmp_path / "maps.h5"
    first = LabelMapWriter(path, **writer_args())
    for other in (path, str(path), tmp_path / "." / "maps.h5"):
        with pytest.raises(LabelMapError, match=rf"^{path}.partial: another LabelMapWriter of "
                                                rf"this process is writing it; close that one "
                                                rf"first"):
            LabelMapWriter(other, **writer_args())
    write_some(first, rows, np.arange(N))
    first.close()
    assert path.exists()
    with LabelMapWriter(tmp_path / "again.h5", **writer_args()) as second:  # others are fine
        with LabelMapWriter(path, **writer_args()):  # and so is the same path once closed
            pass
        write_some(second, rows, np.arange(N))
    abandoned = LabelMapWriter(tmp_path / "dropped.h5", **writer_args())
    del abandoned  # never closed: its claim goes with it
    LabelMapWriter(tmp_path / "dropped.h5", **writer_args()).close()


# ---- 10. /sizes is checked: integers in [1, 2**31 - 1] -----------------------------------

@pytest.mark.parametrize("value, dtype", [(2 ** 31 + 5, np.int64), (2 ** 32, np.uint64),
                                          (-3, np.int64), (0, np.int32)])
def test_sizes_beyond_int32_or_below_one_are_refused(good_file, capsys, value, dtype):
    sizes = np.full((N, 2), 100, dtype)
    sizes[4, 1] = value
    rewrite(good_file, "sizes", sizes)
    message = (r"dataset /sizes: 1 rows hold a height or width outside \[1, 2147483647\] "
               rf"\(int32\), found \[{min(100, value)}, {max(100, value)}\], first rows \[4\]")
    for read in (read_header, LabelMapStore.open, scan_module.scan_file):
        with pytest.raises(LabelMapError, match=message):
            read(good_file)
    for extra in ([], ["--full"]):
        assert main(["info", str(good_file), *extra]) == 1
        assert "validation: FAILED" in capsys.readouterr().out


def test_add_sizes_refuses_sizes_beyond_int32(good_file):
    with pytest.raises(ValueError, match=r"sizes: expected image heights and widths >= 1 \(and "
                                         r"<= 2147483647\), found \[100, 2147483653\]"):
        writer_module.add_sizes(good_file, np.array([[100, 2 ** 31 + 5]] * N))


# ---- 15. `index` of a link rewrites the file it points to --------------------------------

def test_index_follows_a_link_to_a_shared_store(tmp_path, rows, capsys):
    from PIL import Image

    images, shared = tmp_path / "images", tmp_path / "shared"
    os.makedirs(shared)
    for i, path in enumerate(rows["paths"]):
        os.makedirs(images / os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (20 + i, 10), (i, 0, 0)).save(images / path, format="JPEG")
    store = shared / "maps.h5"
    write_labelmaps(store, **rows, classes=CLASSES)
    link = tmp_path / "mine.h5"
    os.symlink(store, link)
    assert main(["index", str(link), "--images", str(images)]) == 0
    assert f"{link} (a link; rewrote {store}): stored the (height, width) of {N} images" in (
        capsys.readouterr().out)
    assert os.path.islink(link) and os.readlink(link) == str(store)
    with LabelMapStore.open(store) as opened:
        assert opened.sizes.tolist() == [[10, 20 + i] for i in range(N)]
    assert sorted(os.listdir(shared)) == ["maps.h5"] and sorted(os.listdir(tmp_path)) == [
        "images", "mine.h5", "shared"]


def test_index_names_bad_thread_counts(good_file, tmp_path, capsys):
    assert main(["index", str(good_file), "--images", str(tmp_path), "--num-threads",
                 "-1"]) == 1
    assert "error: --num-threads must be an int >= 1, got -1" in capsys.readouterr().err


# ---- 16. `info` prints what a file holds without letting it drive the terminal -----------

def test_info_escapes_control_characters(tmp_path, rows, capsys):
    path = tmp_path / "maps.h5"
    classes = ["\x1b[31mred", "tab\there", *CLASSES[2:]]
    write_labelmaps(path, **rows, classes=classes, annotator="\x1b]0;pwned\x07",
                    **{"new\nline": "bell\x07"})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\t" not in out
    assert "first: \\x1b[31mred, tab\\there, n00000002" in out
    assert "  annotator: \\x1b]0;pwned\\x07\n" in out and "  new\\nline: bell\\x07\n" in out


# ---- 5. the metadata is checked against the memory, by its declared size -----------------

INFO_UNDER_ULIMIT = """
import resource, sys
from dali_relabel.cli import main
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + (768 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(["info", sys.argv[1]]))
"""


def test_info_of_a_small_file_declaring_many_rows_says_it_needs_memory(tmp_path):
    """A 1 MB file of compressed constant rows declaring 2e7 rows: reading its /labels and
    /paths takes gigabytes, refused in one line under `ulimit -v` (not a MemoryError)."""
    num_rows, chunk = 2 * 10 ** 7, 10 ** 6
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(format="dali-relabel-labelmaps", version=1, num_classes=C, topk=1,
                       height=1, width=1, value_kind="logits")
        datasets = [f.create_dataset(name, shape=shape, dtype=dtype, compression="gzip",
                                     chunks=(chunk,) + shape[1:])
                    for name, shape, dtype in (("values", (num_rows, 1, 1, 1), np.float16),
                                               ("indices", (num_rows, 1, 1, 1), np.int16),
                                               ("labels", (num_rows,), np.int64),
                                               ("paths", (num_rows,), "S8"))]
        for start in range(0, num_rows, chunk):
            for ds in datasets:  # the same path everywhere: one str object per row once read
                ds[start:start + chunk] = np.full((chunk,) + ds.shape[1:],
                                                  b"c0/x.jpg" if ds.name == "/paths" else 0,
                                                  ds.dtype)
        f.create_dataset("classes", data=np.array(CLASSES, dtype=object),
                         dtype=h5py.string_dtype())
    assert path.stat().st_size < 2 << 20
    result = run_code(INFO_UNDER_ULIMIT, path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert result.stdout.startswith(
        f"validation: FAILED: {path}: the metadata (/labels, /paths, /classes) of 20000000 "
        f"rows: reading it needs about "), result.stdout
    assert result.stdout.count("\n") == 1 and " are available\n" in result.stdout
