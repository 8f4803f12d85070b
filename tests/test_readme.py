"""Every Python block of the README runs as shown, on the CPU, with the small data it makes.

A block whose first line is a `# torchrun ...` comment is a complete distributed script: it
runs under `torchrun --standalone --nproc_per_node=2` (gloo). The others run with `python`.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def block_id(block: str) -> str:
    first = block.strip().splitlines()[0]
    return re.sub(r"[^a-z0-9]+", "-", first.lower()).strip("-")[:40]


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(b) for b in BLOCKS])
def test_readme_block_runs(block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if block.lstrip().startswith("# torchrun"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", str(script)]
    else:
        command = [sys.executable, str(script)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # A block that prints promises output: it must print something.
    if "print(" in block:
        assert result.stdout.strip(), result.stderr[-2000:]
