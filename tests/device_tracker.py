"""The CPU twin of CUDA's sync debug mode: which tensors would live on the GPU, and every
place a step would make the host wait for it.

On the CPU machine every tensor is a host tensor, so a step that would copy from pageable
memory or read GPU data back cannot fail here by itself. ``DeviceTracker`` follows where
data would be: it marks as device data what the GPU would hold (the model's parameters,
buffers, gradients and optimizer state, tensors made with an explicit ``device=``, and what
the one transfer helper ``dali_relabel._transfer.to_device`` returns, which it intercepts)
and everything computed from them (a TorchFunctionMode sees every torch call). It records:

- host reads of device data: ``item``, ``tolist``, ``numpy``, ``cpu``, ``bool()``,
  ``int()``, ``float()``, ``repr``, ``nonzero``, ``unique``, ``masked_select``, ``equal``,
  boolean-mask indexing and the like (each makes the host wait for the GPU);
- host-to-device copies that bypass the helper: ``.to(device)``, ``.cuda()``, ``copy_`` into
  device data and ``torch.tensor(..., device=)`` of host data (from pageable memory, each
  synchronises the stream).

Tensors that DALI and torch allocate themselves with an explicit device are left alone (DALI's
iterator returns the CPU outputs of a GPU pipeline, such as the rows, in host memory, and the
images reach the device through the helper; torch's optimizers keep their step counts on the
host).
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Iterable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import dali_relabel._transfer as transfer

__all__ = ["DeviceTracker", "device_state"]

_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
          "__repr__", "__format__", "__str__", "nonzero", "argwhere", "unique",
          "unique_consecutive", "masked_select", "equal", "allclose", "is_nonzero"}
_FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand",
              "randn", "randint", "linspace", "eye", "zeros_like", "ones_like", "empty_like",
              "full_like", "rand_like", "randn_like", "randint_like", "empty_strided",
              "scalar_tensor"}
_FROM_DATA = {"tensor", "as_tensor"}
_DALI = f"{os.sep}nvidia{os.sep}dali{os.sep}"
_THIS = os.path.abspath(__file__)


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(values: Iterable[Any]) -> list:
    flat, _ = tree_flatten(list(values))
    return [value for value in flat if isinstance(value, torch.Tensor)]


def _caller() -> str:
    """The first frame outside torch and this file: where the call was written."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path != _THIS and f"{os.sep}torch{os.sep}" not in path:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "?"


def _called_from_libraries() -> bool:
    """Whether the call was written in DALI (its iterator returns a GPU pipeline's CPU
    outputs, such as the rows, in host memory) or in torch itself (whose explicit
    ``device="cpu"`` tensors, such as the optimizers' step counts, are host data on a GPU
    machine too)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path == _THIS or f"{os.sep}torch{os.sep}overrides" in path:
            continue
        return _DALI in path or f"{os.sep}site-packages{os.sep}torch{os.sep}" in path
    return False


class DeviceTracker(TorchFunctionMode):
    """Records host syncs and pageable transfers while active (see the module docstring).

    Args:
        device_data: Tensors that the GPU would hold before the step (parameters, buffers,
            optimizer state, a store placed on the device, ...).
    """

    def __init__(self, device_data: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._device = WeakIdKeyDictionary()
        self.problems: list[str] = []
        self.transfers = 0
        self._in_helper = 0
        self._paused = 0
        for tensor in device_data:
            self.mark(tensor)

    def mark(self, tensor: torch.Tensor) -> None:
        self._device[tensor] = True

    def on_device(self, tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor in self._device

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Lets the block read device data (a logging step)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def watch_gradients(self, parameters: Iterable[torch.Tensor]) -> list:
        """Marks each parameter's gradient as device data when autograd writes it."""
        return [p.register_post_accumulate_grad_hook(lambda p: self.mark(p.grad))
                for p in parameters if p.requires_grad]

    @contextlib.contextmanager
    def intercepting_transfers(self) -> Iterator[None]:
        """Replaces the transfer helper for the block: its results are device data."""
        real = transfer.to_device

        def to_device(array, device):
            self._in_helper += 1
            try:
                out = real(array, device)
            finally:
                self._in_helper -= 1
            if out is array:  # on the CPU twin the helper keeps the tensor: a distinct one
                out = out.view(out.shape)
            self.transfers += 1
            self.mark(out)
            return out

        transfer.to_device = to_device
        try:
            yield
        finally:
            transfer.to_device = real

    def _problem(self, kind: str, name: str) -> None:
        self.problems.append(f"{kind}: {name} at {_caller()}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        inputs = _tensors(args) + _tensors(kwargs.values())
        device_inputs = [t for t in inputs if self.on_device(t)]
        if not self._paused and not self._in_helper:
            if name in _READS and device_inputs:
                self._problem("host read of device data", name)
            elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
                    t.dtype == torch.bool and self.on_device(t)
                    for t in _tensors([args[1] if len(args) > 1 else kwargs.get("indices")])):
                self._problem("boolean-mask indexing of device data", name)
            elif name in ("to", "cuda") and not device_inputs and self._moves_device(
                    name, args, kwargs):
                self._problem("host-to-device copy outside the pinned helper", name)
            elif name == "copy_" and self.on_device(args[0]) and not self.on_device(args[1]):
                self._problem("host-to-device copy outside the pinned helper", name)
            elif (name in _FROM_DATA and kwargs.get("device") is not None
                  and not _called_from_libraries()):
                self._problem("host-to-device copy outside the pinned helper", name)
        out = func(*args, **kwargs)
        made_on_device = (name in _FACTORIES and kwargs.get("device") is not None
                          and not _called_from_libraries())
        if device_inputs or made_on_device or (name in ("to", "cuda") and self._in_helper):
            for tensor in _tensors([out]):
                self.mark(tensor)
        return out

    @staticmethod
    def _moves_device(name: str, args: tuple, kwargs: dict) -> bool:
        """Whether a `.to(...)`/`.cuda()` call names a device (not just a dtype)."""
        if name == "cuda":
            return True
        if kwargs.get("device") is not None:
            return True
        return any(isinstance(a, (torch.device, str)) for a in args[1:])


def device_state(*modules: torch.nn.Module, optimizer: Any = None) -> list:
    """The tensors a training process keeps on the GPU: parameters, buffers, optimizer
    state."""
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor)]
    return tensors


