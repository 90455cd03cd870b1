"""The README's first Python block, its quick start, runs as written and gives a finite loss."""

import re
from pathlib import Path

import torch


def test_readme_quick_start_runs_as_written():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python quick start"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
