"""Compile every launch of the project's Triton kernels for a GPU target, without a GPU.

Run as a script (the compile test runs it in a subprocess per target, without
TRITON_INTERPRET): ``python tests/triton_compile.py --arch 90``. A stand-in for Triton's
active driver reports ``GPUTarget("cuda", arch, 32)`` and loads nothing, so the real launcher
(`label_pooling_triton`) goes through Triton's own JIT path, specialization and compilation
to PTX and a cubin (ptxas) included, exactly as on that GPU; only the launch itself is a
no-op. It prints one JSON object: the launches, the distinct compiled variants, every
failure with its error, and what the PTX and the cubin of the S = 1 and S = 14 kernels hold.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import tempfile
import traceback

# Compile in a fresh cache: a kernel compiled before must not hide a failure now.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-compile-")
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers, stack frame, spills

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from dali_relabel.ops.kernels import label_pooling_triton as launcher_module  # noqa: E402
# The launches the project makes (dali_relabel.ops.testing: the grid, real random inputs).
from dali_relabel.ops.testing import launches  # noqa: E402

# Shared memory per block of each target (the opt-in maximum), for Triton's resource check.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


class _Utils:
    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED.get(self.arch, 101376), "multiprocessor_count": 1,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 0,
                "mem_clock_rate": 0, "mem_bus_width": 0}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


class _NoLaunch:
    """Triton's launcher class, minus the launch."""

    def __init__(self, src, metadata) -> None:
        pass

    def __call__(self, *args, **kwargs) -> None:
        pass


class CompileOnlyDriver:
    """Triton's active driver for a GPU that is not there: compiles, never loads or runs."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.utils = _Utils(arch)
        self.launcher_cls = _NoLaunch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch  # one kernel cache per target

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("the compile-only driver builds no launcher")


def _instructions(ptx: str) -> set:
    """PTX opcodes, past any predicate (`@%p1 atom.global...`)."""
    return set(re.findall(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", ptx, re.M))


def _resource_usage(cubin: bytes) -> dict:
    """REG, STACK, LOCAL, SHARED of the kernel, as cuobjdump reports them."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


def _spills(ptxas_log: str) -> dict:
    """Stack frame and spill bytes of the kernel, from ptxas's -v log."""
    found = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", ptxas_log)
    assert found, f"no spill figures in the ptxas log: {ptxas_log!r}"
    return dict(zip(("stack_frame", "spill_stores", "spill_loads"), map(int, found.groups())))


def inspect(kernel, ptxas_log: str) -> dict:
    """What the review checked by hand in a compiled kernel."""
    ptx = kernel.asm["ptx"]
    instructions = _instructions(ptx)
    return dict(
        ptxas=_spills(ptxas_log),
        atomics=sorted(i for i in instructions if i.startswith(("atom", "red."))),
        divisions=sorted(i for i in instructions if i.startswith("div") and ".f32" in i),
        fused_multiply_adds=sorted(i for i in instructions if i.startswith("fma")),
        local_declarations=len(re.findall(r"^\s*\.local\b", ptx, re.M)),
        resources=_resource_usage(kernel.asm["cubin"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, required=True, help="compute capability, e.g. 90")
    args = parser.parse_args()
    driver.set_active(CompileOnlyDriver(args.arch))
    jit = launcher_module._label_pooling_kernel
    used, ptxas_logs = [], {}
    real_run = jit.run

    def run(*run_args, **run_kwargs):  # keep the compiled kernel and its ptxas log
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints ptxas's log when it compiles
            kernel = real_run(*run_args, **run_kwargs)
        used.append(kernel)
        ptxas_logs.setdefault(id(kernel), log.getvalue())
        return kernel

    jit.run = run
    failures, inspected, count = {}, {}, 0
    for name, arguments in launches():
        count += 1
        try:
            launcher_module.label_pooling_triton(**arguments)
        except Exception as error:  # noqa: BLE001 (each failure is reported by name)
            message = "".join(traceback.format_exception_only(error)).strip()
            failures.setdefault(message[-2000:], []).append(name)
            continue
        size, mode = arguments["output_size"], arguments["mode"]
        if (size in (1, 14) and arguments["num_classes"] == 1000 and (size, mode) not in inspected
                and arguments["values"].shape[1:] == (5, 15, 15)):
            inspected[(size, mode)] = inspect(used[-1], ptxas_logs[id(used[-1])])
    print(json.dumps(dict(
        triton=triton.__version__, arch=args.arch, launches=count,
        variants=len(jit.device_caches[args.arch][0]),
        failures=[dict(error=error, launches=len(names), first=names[:5])
                  for error, names in failures.items()],
        inspected={f"S={size} {mode}": facts for (size, mode), facts in inspected.items()})))


if __name__ == "__main__":
    main()
