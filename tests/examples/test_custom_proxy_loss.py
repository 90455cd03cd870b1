"""examples/custom_proxy_loss.py: the checks pass on its loss, and a few steps train it."""

from __future__ import annotations

import importlib.util
import pathlib
import re

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_proxy_loss.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_proxy_loss", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_proxy_loss_example(monkeypatch, capsys):
    example = _load_example()
    monkeypatch.setattr("sys.argv", ["custom_proxy_loss.py", "--steps", "40"])
    example.main()  # runs check_proxy_loss and check_flow on the example's loss, then trains it
    out = capsys.readouterr().out
    assert "check_proxy_loss and check_flow passed" in out
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) after 40 steps", out).groups())
    assert last < first
