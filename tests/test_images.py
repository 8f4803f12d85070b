"""Image files on disk (dali_relabel.images: files.py, rule.py): the listing, the start-up
checks, the one rule of what a usable image file is, and that every tool applies it."""
import errno
import io
import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

import dali_relabel
import dali_relabel._system as system_module
from dali_relabel.cli import main
from dali_relabel.images.files import (
    check_image_files,
    find_images,
    open_rgb_image,
    read_image_sizes,
)
from dali_relabel.images.path_lists import read_path_list
from dali_relabel.images.rule import read_image_header
from dali_relabel.images.verify import verify_images
from script_runner import run_code

CLASSES = ["c0", "c1"]


def jpeg(path, size=(24, 16), colour=(200, 40, 0)):
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=90)


def claiming_jpeg(width, height):
    """A small JPEG whose header (SOF0) claims width x height pixels: ~600 bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 90, 90)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture
def tree(tmp_path):
    """Two class folders of JPEGs, the second with a sub-folder: (root, relative paths)."""
    root = tmp_path / "train"
    paths = ["c0/a.jpg", "c0/b.JPEG", "c1/a.jpg", "c1/sub/z.png"]
    for path in paths:
        os.makedirs(root / os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (20, 10)).save(root / path)
    return root, paths


def test_find_images_lists_in_image_folder_order(tree):
    root, paths = tree
    (root / "c0" / "notes.txt").write_text("x")
    assert find_images(str(root)) == (paths, CLASSES)


# ---- 3. only regular files are listed; a FIFO never blocks a tool ------------------------

def test_a_fifo_named_like_an_image_is_skipped_everywhere(tree, tmp_path, caplog, capsys):
    root, paths = tree
    os.mkfifo(root / "c0" / "x.JPEG")
    os.symlink(root / "nowhere.jpg", root / "c1" / "dangling.jpg")
    with caplog.at_level(logging.WARNING, logger="dali_relabel"):
        skipped = []
        assert find_images(str(root), skipped=skipped) == (paths, CLASSES)
    assert skipped == [("c0/x.JPEG", "a FIFO (named pipe), not a regular file"),
                       ("c1/dangling.jpg", "a dangling link")]
    assert "skipped 2 image file(s) that no tool can use" in caplog.text
    assert "'c0/x.JPEG' (a FIFO (named pipe), not a regular file)" in caplog.text
    # verify, in a process of its own: a read of the FIFO would wait for a writer forever.
    verify = ("import sys; from dali_relabel.cli import main; "
              "sys.exit(main(['verify', sys.argv[1], '--out', sys.argv[2], '--num-threads', "
              "'1', '--device', 'cpu']))")
    result = run_code(verify, root, tmp_path / "bad.txt", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"verified {len(paths)} images" in result.stdout
    assert "skipped: c0/x.JPEG: a FIFO (named pipe), not a regular file" in result.stdout
    assert read_path_list(tmp_path / "bad.txt") == []


def test_a_fifo_listed_by_a_store_or_a_list_is_refused_not_waited_on(tree, tmp_path):
    root, paths = tree
    os.mkfifo(root / "c0" / "x.JPEG")
    listed = [*paths, "c0/x.JPEG"]
    with pytest.raises(FileNotFoundError, match=r"c0/x.JPEG \(a FIFO \(named pipe\), not a "
                                                r"regular file\)"):
        check_image_files(str(root), listed, "maps.h5")
    bad = dict(verify_images(str(root), listed, num_threads=1, progress=False))
    assert bad == {"c0/x.JPEG": "a FIFO (named pipe), not an image file"}
    with pytest.raises(ValueError, match=r"'c0/x.JPEG' \(a FIFO \(named pipe\), not an image "
                                         r"file\)"):
        read_image_sizes(str(root), listed, progress=False)
    with pytest.raises(ValueError, match=r"x.JPEG: a FIFO \(named pipe\), not an image file"):
        open_rgb_image(str(root / "c0" / "x.JPEG"))
    os.mkfifo(tmp_path / "list.txt")
    with pytest.raises(ValueError, match=r"exclude: cannot read the path list .*list.txt "
                                         r"\(not a regular file\)"):
        read_path_list(tmp_path / "list.txt")


# ---- 16. names a list cannot hold are left out at the start, by every tool ----------------

def test_names_with_control_characters_are_skipped_at_the_start(tree, caplog):
    root, paths = tree
    for name in ("ta\tb.jpg", "new\nline.jpg", "esc\x1b[31m.jpg"):
        jpeg(root / "c1" / name)
    skipped = []
    with caplog.at_level(logging.WARNING, logger="dali_relabel"):
        assert find_images(str(root), skipped=skipped)[0] == paths
    assert [path for path, _ in skipped] == ["c1/esc\x1b[31m.jpg", "c1/new\nline.jpg",
                                             "c1/ta\tb.jpg"]
    assert all("a name no image list can hold (control character" in why for _, why in skipped)
    assert "'c1/new\\nline.jpg'" in caplog.text and "\n" not in caplog.text.strip()


# ---- 8. folders that cannot be listed, names too long: named -----------------------------

def test_a_folder_without_read_permission_is_named(tree, monkeypatch):
    root, paths = tree
    locked = str(root / "c1")
    if os.geteuid() == 0:  # root reads anything: refuse the listing as the kernel would
        scandir = os.scandir

        def refusing_scandir(path="."):
            if os.fspath(path).rstrip("/") in (locked, f"{locked}/"):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return scandir(path)
        monkeypatch.setattr(os, "scandir", refusing_scandir)
    else:
        os.chmod(locked, 0)
    try:
        with pytest.raises(ValueError, match=rf"image_root: cannot list the folder "
                                             rf"'{locked}' \(Permission denied\)"):
            find_images(str(root))
        with pytest.raises(FileNotFoundError, match=r"c1/a.jpg \(its folder cannot be listed: "
                                                    r"Permission denied\)"):
            check_image_files(str(root), paths, "maps.h5")
    finally:
        os.chmod(locked, 0o755)


def test_a_name_too_long_is_named(tree):
    root, paths = tree
    long = "x" * 300
    with pytest.raises(FileNotFoundError, match=rf"{long}/a.jpg \(its folder cannot be "
                                                rf"listed: File name too long\)"):
        check_image_files(str(root), [paths[0], f"{long}/a.jpg"], "maps.h5")
    with pytest.raises(ValueError, match=r"image_root: cannot list the folder .* \(File name "
                                         r"too long\)"):
        find_images(str(root / long))
    assert verify_images(str(root), [f"c0/{long}.jpg"], num_threads=1, progress=False) == [
        (f"c0/{long}.jpg", "cannot read the image (File name too long)")]
    with pytest.raises(ValueError, match=r"\(cannot read the image \(File name too long\)\)"):
        read_image_sizes(str(root), [f"c0/{long}.jpg"], progress=False)


# ---- 11. one rule of what is decodable, for every tool -----------------------------------

@pytest.fixture
def odd_images(tmp_path):
    """A GIF named .JPEG, a 1 x 1 JPEG and an ordinary JPEG, in a store: (root, store)."""
    root = tmp_path / "train"
    os.makedirs(root / "c0")
    Image.new("RGB", (16, 16), (10, 200, 10)).save(root / "c0" / "gif.JPEG", format="GIF")
    jpeg(root / "c0" / "one.JPEG", size=(1, 1))
    jpeg(root / "c0" / "plain.JPEG")
    paths = ["c0/gif.JPEG", "c0/one.JPEG", "c0/plain.JPEG"]
    store = tmp_path / "maps.h5"
    dali_relabel.write_labelmaps(store, np.zeros((3, 1, 2, 2)), np.zeros((3, 1, 2, 2), np.int64),
                                 np.zeros(3, np.int64), paths, CLASSES)
    return root, store


GIF_REFUSED = "a GIF image (by its content), which the loaders' decoder does not decode"


# show draws a 1 x 1 image too, without a collapsed layout (matplotlib warns of it)
@pytest.mark.filterwarnings("error::UserWarning")
def test_every_tool_applies_the_same_rule(odd_images, tmp_path, capsys):
    root, store = odd_images
    # The loaders' decoder (DALI 2.4, as verify runs it) refuses the GIF and decodes 1 x 1.
    assert verify_images(str(root), ["c0/gif.JPEG", "c0/one.JPEG", "c0/plain.JPEG"],
                         num_threads=1, progress=False) == [("c0/gif.JPEG", GIF_REFUSED +
                                                             "; expected BMP, JPEG, JPEG 2000, "
                                                             "PNG, PNM, TIFF, WebP")]
    for read in (read_image_header, open_rgb_image):
        with pytest.raises(ValueError, match=re.escape(GIF_REFUSED)):
            read(str(root / "c0" / "gif.JPEG"))
        read(str(root / "c0" / "one.JPEG"))
    assert open_rgb_image(str(root / "c0" / "one.JPEG")).size == (1, 1)
    with pytest.raises(ValueError, match=r"1 of 2 images .* 'c0/gif.JPEG' \(a GIF image"):
        read_image_sizes(str(root), ["c0/one.JPEG", "c0/gif.JPEG"], progress=False)
    assert read_image_sizes(str(root), ["c0/one.JPEG"], progress=False).tolist() == [[1, 1]]
    # index and show, the command line's users of the rule
    assert main(["index", str(store), "--images", str(root)]) == 1
    assert GIF_REFUSED in capsys.readouterr().err
    assert main(["show", str(store), "--images", str(root), "--index", "0", "--box", "0", "0",
                 "1", "1", "--out", str(tmp_path / "gif.png")]) == 1
    assert GIF_REFUSED in capsys.readouterr().err
    assert main(["show", str(store), "--images", str(root), "--index", "1", "--box", "0", "0",
                 "1", "1", "--out", str(tmp_path / "one.png")]) == 0


# ---- 5. a declared size is checked against the memory before decoding --------------------

def test_a_huge_declared_size_is_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.JPEG"
    path.write_bytes(claiming_jpeg(30000, 30000))
    assert path.stat().st_size < 2000
    assert read_image_header(str(path)).size() == (30000, 30000)  # headers are fine
    monkeypatch.setattr(system_module, "available_memory", lambda: 1 << 30)
    with pytest.raises(ValueError) as error:
        open_rgb_image(str(path))
    assert str(error.value) == (f"{path}: the image declares 30000 x 30000 pixels; decoding it "
                                f"needs about 7.2 GB of memory, 1.1 GB are available")
    assert dict(verify_images(str(tmp_path), ["bomb.JPEG"], num_threads=1, progress=False)) == {
        "bomb.JPEG": "the image declares 30000 x 30000 pixels; decoding it needs about 7.2 GB "
                     "of memory, 1.1 GB are available"}


DECODE_UNDER_ULIMIT = """
import resource, sys
from dali_relabel.images.files import open_rgb_image
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
limit = size + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    open_rgb_image(sys.argv[1])
except ValueError as e:
    print(e)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_the_memory_check_knows_the_address_space_limit(tmp_path):
    """Under `ulimit -v` the declared size is refused before PIL allocates anything."""
    path = tmp_path / "bomb.JPEG"
    path.write_bytes(claiming_jpeg(30000, 30000))
    result = run_code(DECODE_UNDER_ULIMIT, path)
    assert result.returncode == 0, result.stderr[-2000:]
    message, grown_kib = result.stdout.splitlines()
    assert message.startswith(f"{path}: the image declares 30000 x 30000 pixels; decoding it "
                              f"needs about 7.2 GB of memory, ")
    assert message.endswith(" are available")
    assert int(grown_kib) < 1 << 18  # KiB: nothing near the 3.6 GB PIL would allocate
