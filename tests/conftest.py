"""Shared fixtures. The Triton kernel is tested on CPU tensors through triton's interpreter,
which must be switched on before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from jpeg_data import make_jpeg_dataset  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """An ImageFolder of real JPEGs of varied sizes and a label-map store listing them:
    (image root, store path)."""
    return make_jpeg_dataset(tmp_path_factory.mktemp("train"))


def pytest_generate_tests(metafunc):
    """A LabelPoolingTester subclass's methods run for each of its modes and output sizes."""
    cls = metafunc.cls
    if cls is None or not hasattr(cls, "output_sizes"):
        return
    if "mode" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("modes")
        metafunc.parametrize("mode", [mode for mode in cls.modes
                                      if marker is None or mode in marker.args])
    if "output_size" in metafunc.fixturenames:
        metafunc.parametrize("output_size", cls.output_sizes, ids=lambda s: f"S{s}")
