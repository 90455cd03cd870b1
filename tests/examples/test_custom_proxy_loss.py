"""examples/custom_proxy_loss.py: the checks pass on its loss, and a few steps train it."""

from __future__ import annotations

import re

from .helpers import import_example


def test_custom_proxy_loss_example(monkeypatch, capsys):
    example = import_example("custom_proxy_loss")
    monkeypatch.setattr("sys.argv", ["custom_proxy_loss.py", "--steps", "40"])
    example.main()  # runs check_proxy_loss and check_flow on the example's loss, then trains it
    out = capsys.readouterr().out
    assert "check_proxy_loss and check_flow passed" in out
    first, last = map(float, re.search(r"loss (\S+) -> (\S+) after 40 steps", out).groups())
    assert last < first
