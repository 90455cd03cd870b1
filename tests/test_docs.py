"""The docs stay true to the code: the quick start runs, the FAQ lists every error, the API page every name."""

from __future__ import annotations

import ast
import pathlib
import runpy

import pytest

import nir_loss
import nir_loss.testing

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _raised_messages() -> list[tuple[str, str]]:
    """(file, first literal piece of 8+ characters) of every `raise X("...")` in the library."""
    found = []
    for path in sorted((ROOT / "nir_loss").glob("*.py")):
        if path.name == "testing.py":  # AssertionErrors, documented in how-to/testing.md
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            arg = node.exc.args[0]
            pieces = ([arg.value] if isinstance(arg, ast.Constant) else
                      [v.value for v in arg.values if isinstance(v, ast.Constant)] if isinstance(arg, ast.JoinedStr)
                      else [])
            pieces = [p for p in pieces if isinstance(p, str) and len(p.strip()) >= 8]
            if pieces:
                found.append((path.name, pieces[0]))
    return found


def test_quickstart_runs(capsys):
    runpy.run_path(str(DOCS / "quickstart.py"), run_name="__main__")
    assert "ProxyAnchor + NIR loss" in capsys.readouterr().out


def test_faq_lists_every_error_message():
    faq = (DOCS / "faq.md").read_text()
    messages = _raised_messages()
    assert len(messages) >= 20
    missing = [f"{name}: {text!r}" for name, text in messages if text not in faq]
    assert not missing, "docs/faq.md lacks these error messages:\n" + "\n".join(missing)
    assert "has no class proxies" in faq  # raised through a module constant in proxies.py


@pytest.mark.parametrize("module, prefix", [(nir_loss, "nir_loss"), (nir_loss.testing, "nir_loss.testing")])
def test_api_page_lists_every_public_name(module, prefix):
    api = (DOCS / "api.md").read_text()
    missing = [name for name in module.__all__ if f"::: {prefix}.{name}\n" not in api]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_concept_figure_is_committed():
    assert (DOCS / "img" / "concept.png").stat().st_size > 10_000


def test_benchmark_figure_in_docs_is_the_benchmark_output():
    """docs/img/quality.png is a copy of what benchmarks/quality.py wrote (the site only serves docs/)."""
    result = DOCS.parent / "benchmarks" / "results" / "quality.png"
    assert (DOCS / "img" / "quality.png").read_bytes() == result.read_bytes(), f"copy {result} to docs/img/"
