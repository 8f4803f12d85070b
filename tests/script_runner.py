"""The one way the tests run a script, a worker or a command line: a child process with this
interpreter, the test environment without triton's interpreter switch (children compile or
run the real kernels as users do), optionally under `torchrun --standalone`, output captured.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(extra or {})
    return env


def run_python(script: Union[str, Path], *args, module: bool = False, torchrun: int = 0,
               env: Optional[Mapping[str, str]] = None, cwd: Optional[Union[str, Path]] = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (`python -m SCRIPT` with `module`; with `torchrun`, that many
    processes under `torchrun --standalone`), waited for."""
    target = ["-m", str(script)] if module else [str(script)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={torchrun}"] if torchrun else [sys.executable])
    if torchrun and module:
        launcher.append("-m")
        target = [str(script)]
    return subprocess.run([*launcher, *target, *map(str, args)], env=child_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_command(command: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
                cwd: Optional[Union[str, Path]] = None,
                timeout: float = 600) -> subprocess.CompletedProcess:
    """A command line (e.g. the `dali-relabel` console script), waited for."""
    return subprocess.run(list(map(str, command)), env=child_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_worker_script(name: str, *args, timeout: float = 600,
                      torchrun: int = 0) -> subprocess.CompletedProcess:
    """A worker of tests/workers/ (a real module, run as a script) with the tests' own
    utilities (labelmap_data, jpeg_data) importable."""
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    return run_python(WORKERS / name, *args, torchrun=torchrun, timeout=timeout,
                      env={"PYTHONPATH": path})
