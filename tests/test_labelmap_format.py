"""A label-map file is input from elsewhere (dali_relabel.labelmaps.format): what opening
one refuses before reading any data, and that a damaged file is one LabelMapError naming it,
never a raw HDF5 error."""
import os
import select
import signal
import warnings

import h5py
import numpy as np
import pytest

from dali_relabel.cli import main
from dali_relabel.labelmaps import (
    LabelMapError,
    LabelMapStore,
    read_header,
    scan_file,
    write_labelmaps,
)

N, K, H, W, C = 6, 2, 3, 3, 4
CLASSES = ["a", "b", "c", "d"]


def write(path, seed=0, **kwargs):
    rng = np.random.default_rng(seed)
    write_labelmaps(path, rng.normal(size=(N, K, H, W)), rng.integers(0, C, (N, K, H, W)),
                    rng.integers(0, C, N), [f"c{i % 2}/{i}.jpg" for i in range(N)], CLASSES,
                    sizes=np.full((N, 2), 5), annotator="test", **kwargs)
    return path


@pytest.fixture
def files(tmp_path):
    """A good label-map file and another one (different maps) beside it."""
    return write(tmp_path / "maps.h5"), write(tmp_path / "other.h5", seed=1)


def external_link(path, other, name):
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = h5py.ExternalLink(str(other), f"/{name}")


def soft_link(path, other, name):
    with h5py.File(path, "r+") as f:
        f.move(name, f"{name}_moved")
        f[name] = h5py.SoftLink(f"/{name}_moved")


def external_storage(path, other, name):
    with h5py.File(path, "r+") as f:
        data = f[name][()]
        del f[name]
        raw = os.path.join(os.path.dirname(path), f"{name}.bin")
        data.tofile(raw)
        f.create_dataset(name, shape=data.shape, dtype=data.dtype,
                         external=[(raw, 0, data.nbytes)])


def virtual(path, other, name):
    with h5py.File(other) as f:
        shape, dtype = f[name].shape, f[name].dtype
    with h5py.File(path, "r+") as f:
        del f[name]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(str(other), name, shape=shape)
        f.create_virtual_dataset(name, layout)


def scale_offset(path, other, name):
    """The lossy scale-offset filter (on float32 values: float16 has none)."""
    with h5py.File(path, "r+") as f:
        data = f[name][()]
        del f[name]
        floats = data.dtype.kind == "f"
        f.create_dataset(name, data=data.astype(np.float32) if floats else data,
                         chunks=data.shape, scaleoffset=3 if floats else 0)


ELSEWHERE = [
    pytest.param(external_link, "is an external link to '.*other.h5':/{name}",
                 id="external-link"),
    pytest.param(soft_link, "/{name} is a soft link; expected a dataset", id="soft-link"),
    pytest.param(external_storage, "dataset /{name}: keeps its data in external file",
                 id="external-storage"),
    pytest.param(virtual, "dataset /{name}: is a virtual dataset", id="virtual-dataset"),
    pytest.param(scale_offset, "dataset /{name}: uses the HDF5 filter 'scaleoffset'",
                 id="scale-offset-filter"),
]


@pytest.mark.parametrize("name", ["values", "indices", "labels", "sizes"])
@pytest.mark.parametrize("make, message", ELSEWHERE)
def test_data_stored_elsewhere_is_refused(files, capsys, make, message, name):
    path, other = files
    make(path, other, name)
    message = message.format(name=name)
    opens = [read_header, scan_file, lambda p: LabelMapStore.open(p, placement="memory"),
             lambda p: LabelMapStore.open(p, placement="mmap")]
    for read in opens:
        with pytest.raises(LabelMapError, match=message) as error:
            read(path)
        assert str(error.value).startswith(f"{path}: ")
    for extra in ([], ["--full"]):
        assert main(["info", str(path), *extra]) == 1
        out = capsys.readouterr().out
        assert "validation: ok" not in out and "validation: FAILED" in out


@pytest.mark.parametrize("name", ["paths", "classes"])
def test_string_datasets_are_not_followed_either(files, name):
    path, other = files
    external_link(path, other, name)
    with pytest.raises(LabelMapError, match=f"/{name} is an external link"):
        LabelMapStore.open(path, placement="memory")


def test_compressed_files_are_still_read(tmp_path):
    for compression in ("gzip", "lzf"):
        path = write(tmp_path / f"{compression}.h5", compression=compression)
        with LabelMapStore.open(path, placement="memory") as store:
            assert len(store) == N
        scan_file(path, progress=False)


# ---- 6. a damaged file is a LabelMapError, whatever HDF5 says ----------------------------

def _outcome(path):
    """What each way of reading `path` ends with: "ok", "LabelMapError" or another
    exception's type and message."""
    results = []
    for read in (read_header, lambda p: scan_file(p, progress=False),
                 lambda p: LabelMapStore.open(p, placement="memory"),
                 lambda p: float(LabelMapStore.open(p).values.float().sum())):
        try:
            read(path)
            results.append("ok")
        except LabelMapError as e:
            assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
            results.append("LabelMapError")
        except Exception as e:  # noqa: BLE001  (what the test looks for)
            results.append(f"{type(e).__name__}: {str(e)[:200]}")
    return results


def _in_child(path, timeout):
    """_outcome(path) in a forked process: HDF5 itself may crash or loop forever on some
    damage (library bugs no caller can catch), which then shows as "signal N" or "hang"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the reads
        os.close(read_end)
        try:
            message = "\x00".join(_outcome(path))
        except BaseException as e:  # noqa: BLE001
            message = f"{type(e).__name__}: {e}"
        os.write(write_end, message.encode("utf-8", "replace")[:60000])
        os._exit(0)
    os.close(write_end)
    try:
        if not select.select([read_end], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return ["hang"]
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return [f"signal {os.WTERMSIG(status)}"]
    return data.decode("utf-8", "replace").split("\x00")


def test_flipped_bytes_give_label_map_errors_only(tmp_path):
    """Bits flipped at every 53rd byte of the first 10 kB of a real store (its superblock,
    object headers, attributes, heaps and B-trees): reading it either works or raises a
    LabelMapError that names the file and says what is wrong; never a raw h5py/HDF5 error
    (RuntimeError, KeyError, OSError, ...)."""
    good = write(tmp_path / "good.h5")
    data = good.read_bytes()
    damaged = tmp_path / "damaged.h5"
    raw, library_bugs, refused = [], [], 0
    for offset in range(0, min(len(data), 10240), 53):
        for flip in (0x01, 0xff):
            changed = bytearray(data)
            changed[offset] ^= flip
            damaged.write_bytes(changed)
            results = _in_child(str(damaged), timeout=10)
            refused += results.count("LabelMapError")
            if results[0] in ("hang",) or results[0].startswith("signal"):
                library_bugs.append((offset, flip, results[0]))
                continue
            raw.extend((offset, flip, result) for result in results
                       if result not in ("ok", "LabelMapError"))
    assert not raw, raw[:10]
    assert refused > 100  # the damage was seen, not read past
    if library_bugs:  # HDF5 crashes or loops on these: nothing above it can turn them
        warnings.warn(f"HDF5 crashed or hung reading {len(library_bugs)} damaged files: "
                      f"{library_bugs[:5]}")


def test_damage_messages_say_corrupt(files, capsys):
    path, _ = files
    data = bytearray(path.read_bytes())
    data[8:40] = bytes(32)  # the superblock's addresses
    path.write_bytes(bytes(data))
    with pytest.raises(LabelMapError, match=f"^{path}: corrupt or not a label-map file "):
        read_header(path)
    assert main(["info", str(path)]) == 1
    assert f"validation: FAILED: {path}: corrupt or not a label-map file" in (
        capsys.readouterr().out)
