"""Every Python block of the README and of docs/ runs as shown, on the CPU, with the small
data it makes; every relative link points at a file that exists.

A block whose first line is a `# torchrun ...` comment is a complete distributed script: it
runs under `torchrun --standalone --nproc_per_node=2` (gloo). The others run with `python`.
"""
import re
from pathlib import Path

import pytest

from script_runner import run_python

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCKS = [(page, block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)]


def block_id(page: Path, block: str) -> str:
    first = block.strip().splitlines()[0]
    return f"{page.stem}-" + re.sub(r"[^a-z0-9]+", "-", first.lower()).strip("-")[:40]


def test_the_pages_have_python_blocks():
    assert len(BLOCKS) >= 4
    assert {page.name for page, _ in BLOCKS} >= {"README.md", "training.md"}


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_relative_links_point_at_files(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\((?!https?://)([^)#\s]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("page, block", BLOCKS, ids=[block_id(p, b) for p, b in BLOCKS])
def test_block_runs(page, block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block, encoding="utf-8")
    torchrun = 2 if block.lstrip().startswith("# torchrun") else 0
    result = run_python(script, torchrun=torchrun, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # A block that prints promises output: it must print something.
    if "print(" in block:
        assert result.stdout.strip(), result.stderr[-2000:]
