"""The one way the tests run a script, a worker, a snippet or the command line: a child
process with this interpreter and the test environment without triton's interpreter switch
(children compile or run the real kernels as users do), the repository importable, output
captured; optionally under `torchrun --standalone`, or under a file-size limit (a full disk:
Python ignores SIGXFSZ, so a write past the limit fails with EFBIG) or an address-space
limit (`ulimit -v`).
"""
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Union

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
WORKERS = TESTS / "workers"
_CLI = "import sys; from dali_relabel.cli import main; sys.exit(main(sys.argv[1:]))"

PathLike = Union[str, Path]


def child_env(extra: Optional[Mapping[str, str]] = None) -> dict:
    """The environment of a child: the tests' own, without TRITON_INTERPRET, with the
    repository (and `extra`'s PYTHONPATH entries first) importable."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    extra = dict(extra or {})
    paths = [extra.pop("PYTHONPATH", None), str(REPO), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    env.update(extra)
    return env


def _limits(file_size: Optional[int], address_space: Optional[int]):
    if file_size is None and address_space is None:
        return None

    def apply() -> None:
        if file_size is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    return apply


def _command(script: Optional[PathLike], code: Optional[str], module: bool, torchrun: int,
             args) -> list:
    if code is not None:
        target = ["-c", code]
    elif module:
        target = ["-m", str(script)]
    else:
        target = [str(script)]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={torchrun}"]
        target = target[1:] if module else target
        launcher += ["-m"] if module else []
    else:
        launcher = [sys.executable]
    return [*launcher, *target, *map(str, args)]


def run_python(script: Optional[PathLike], *args, code: Optional[str] = None,
               module: bool = False, torchrun: int = 0, env: Optional[Mapping[str, str]] = None,
               cwd: Optional[PathLike] = None, timeout: float = 600,
               file_size_limit: Optional[int] = None,
               address_space_limit: Optional[int] = None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (`python -c CODE ARGS` with `code`, `python -m SCRIPT` with
    `module`; with `torchrun`, that many processes under `torchrun --standalone`), waited for
    (text output)."""
    return subprocess.run(_command(script, code, module, torchrun, args), env=child_env(env),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limits(file_size_limit, address_space_limit))


def run_code(code: str, *args, **options) -> subprocess.CompletedProcess:
    """`python -c CODE ARGS` (the options of run_python)."""
    return run_python(None, *args, code=code, **options)


def run_cli(*args, **options) -> subprocess.CompletedProcess:
    """`dali-relabel ARGS` in a fresh interpreter (the options of run_python)."""
    return run_code(_CLI, *args, **options)


def start_python(script: Optional[PathLike], *args, code: Optional[str] = None,
                 module: bool = False, torchrun: int = 0,
                 env: Optional[Mapping[str, str]] = None, cwd: Optional[PathLike] = None,
                 **popen) -> subprocess.Popen:
    """`python SCRIPT ARGS` (`-c CODE`, `-m SCRIPT`, under torchrun: as run_python) started,
    not waited for (a job to signal or kill); `popen` goes to subprocess.Popen."""
    return subprocess.Popen(_command(script, code, module, torchrun, args), env=child_env(env),
                            cwd=cwd, **popen)


def run_worker_script(name: str, *args, timeout: float = 600,
                      torchrun: int = 0) -> subprocess.CompletedProcess:
    """A worker of tests/workers/ (a real module, run as a script) with the tests' own
    utilities (labelmap_data, jpeg_data) importable."""
    return run_python(WORKERS / name, *args, torchrun=torchrun, timeout=timeout,
                      env={"PYTHONPATH": str(TESTS)})
