"""The docs stay true to the code: the quick starts run, the FAQ lists every error, the API page every
name, code on the site fits its column, and the site ships everything it loads."""

from __future__ import annotations

import ast
import configparser
import importlib
import pathlib
import pkgutil
import re
import runpy

import pytest
import torch

import nir_loss
import nir_loss.testing

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# Code wider than this is cut off (scrolls) in the site's column at 1280 px.
SHOWN_CODE_WIDTH = 78
MODULES = sorted(m.name for m in pkgutil.iter_modules(nir_loss.__path__))
# The losses' input checks: exported for the package's own modules, not part of the API.
INTERNAL_MODULES = {"validation", "_fused"}


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
            pieces = (
                [arg.value]
                if isinstance(arg, ast.Constant)
                else [v.value for v in arg.values if isinstance(v, ast.Constant)]
                if isinstance(arg, ast.JoinedStr)
                else []
            )
            pieces = [p for p in pieces if isinstance(p, str) and len(p.strip()) >= 8]
            if pieces:
                found.append((path.name, pieces[0]))
    return found


def test_quickstart_runs(capsys):
    runpy.run_path(str(DOCS / "quickstart.py"), run_name="__main__")
    assert "ProxyAnchor + NIR loss" in capsys.readouterr().out


def test_readme_quick_start_runs():
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["loss"].ndim == 0 and namespace["loss_fn"].nir_weight == nir_loss.default_nir_weight(16)
    assert namespace["loss_fn"].nir.objective == nir_loss.DEFAULT_OBJECTIVE
    assert torch.isfinite(namespace["loss"])


def test_faq_lists_every_error_message():
    faq = (DOCS / "faq.md").read_text()
    messages = _raised_messages()
    assert len(messages) >= 20
    missing = [f"{name}: {text!r}" for name, text in messages if text not in faq]
    assert not missing, "docs/faq.md lacks these error messages:\n" + "\n".join(missing)
    assert "has no class proxies" in faq  # raised through a module constant in proxies.py


@pytest.mark.parametrize("module_name", sorted(set(MODULES) - INTERNAL_MODULES))
def test_api_page_lists_every_public_name(module_name):
    """Names exported at the top are documented there; the rest under their module."""
    api = (DOCS / "api.md").read_text()
    module = importlib.import_module(f"nir_loss.{module_name}")
    expected = [
        f"nir_loss.{name}" if name in nir_loss.__all__ else f"nir_loss.{module_name}.{name}"
        for name in getattr(module, "__all__", [])
    ]
    missing = [path for path in expected if f"::: {path}\n" not in api]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_api_page_lists_the_whole_top_level():
    api = (DOCS / "api.md").read_text()
    missing = [name for name in nir_loss.__all__ if f"::: nir_loss.{name}\n" not in api]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"
    exported = {name for m in MODULES for name in getattr(importlib.import_module(f"nir_loss.{m}"), "__all__", [])}
    assert set(nir_loss.__all__) <= exported, "the top level re-exports names its modules do not export"


@pytest.mark.parametrize("module_name", MODULES)
def test_each_module_declares_all_once(module_name):
    tree = ast.parse((ROOT / "nir_loss" / f"{module_name}.py").read_text())
    targets = [
        t.id
        for node in ast.walk(tree)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
        for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(t, ast.Name)
    ]
    assert targets.count("__all__") == 1, "one __all__ = [...] per module"


def _fenced_code(path: pathlib.Path) -> list[tuple[str, str]]:
    """(where, line) of the code a reader sees in a Markdown page, snippets included."""
    shown = []
    for match in re.finditer(r"^( *)```[^\n]*\n(.*?)^\1```", path.read_text(), re.S | re.M):
        for line in match.group(2).splitlines():
            line = line[len(match.group(1)) :]
            snippet = re.match(r'--8<-- "([^":]+)(?::(\w+))?"', line)
            if not snippet:
                shown.append((str(path.relative_to(ROOT)), line))
                continue
            text = (ROOT / snippet.group(1)).read_text()
            if snippet.group(2):
                text = text.split(f"[start:{snippet.group(2)}]")[1].split(f"[end:{snippet.group(2)}]")[0]
                text = "\n".join(text.splitlines()[1:-1])
            shown += [(snippet.group(1), code) for code in text.splitlines()]
    return shown


def _docstring_examples(path: pathlib.Path) -> list[tuple[str, str]]:
    shown = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            shown += [
                (f"{path.name}:{getattr(node, 'name', '')}", line.strip())
                for line in ast.get_docstring(node).splitlines()
                if line.strip().startswith((">>>", "..."))
            ]
    return shown


def test_code_shown_on_the_site_fits_its_column():
    shown = [row for p in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))] for row in _fenced_code(p)]
    shown += [row for p in sorted((ROOT / "nir_loss").glob("*.py")) for row in _docstring_examples(p)]
    assert len(shown) > 100
    wide = [f"{where}: {line}" for where, line in shown if len(line) > SHOWN_CODE_WIDTH]
    assert not wide, f"code lines wider than {SHOWN_CODE_WIDTH} characters:\n" + "\n".join(wide)


# A table scrolls sideways when its narrowest layout is wider than the column. mkdocs-material
# gives every column at least 5rem (100 px at 1280 px), sets tables at 0.64rem (about 7 px a
# character) with 1.25em padding on each side, and wraps cells only between words; its content
# column at 1280 px, between the two sidebars, is about 704 px (tables of 8 columns scrolled there).
TABLE_COLUMN_PX, TABLE_TH_MIN_PX, TABLE_CHAR_PX, TABLE_PADDING_PX = 704, 100, 7, 32


def _shown_lines(path: pathlib.Path) -> list[str]:
    """The page's Markdown lines with included snippets expanded."""
    lines = []
    for line in path.read_text().splitlines():
        snippet = re.match(r'\s*--8<-- "([^":]+)"\s*$', line)
        lines += (ROOT / snippet.group(1)).read_text().splitlines() if snippet else [line]
    return lines


def _narrowest_table_px(rows: list[str]) -> int:
    """The narrowest width a Markdown table renders at: each column as wide as its longest word."""

    def words(cell: str) -> list[str]:
        cell = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", cell)  # a link shows its text
        cell = re.sub(r"\$([^$]*)\$", lambda m: re.sub(r"\\[a-zA-Z]+|[{}^_]", "", m.group(1)), cell)
        return cell.replace("**", "").replace("`", "").split()

    table = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    widths: dict[int, int] = {}
    for row in table:
        for k, cell in enumerate(row):
            widths[k] = max([widths.get(k, 0), *(len(w) for w in words(cell))])
    return sum(max(TABLE_TH_MIN_PX, TABLE_CHAR_PX * w + TABLE_PADDING_PX) for w in widths.values())


def test_tables_on_the_site_fit_the_column():
    """No table scrolls sideways at 1280 px (an estimate of its rendered width, from the theme's CSS)."""
    wide, tables = [], 0
    for path in [*sorted(DOCS.rglob("*.md"))]:
        lines = _shown_lines(path)
        i = 0
        while i < len(lines):
            header = lines[i].lstrip().startswith("|") and i + 1 < len(lines)
            if header and re.match(r"\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
                j = i + 2
                while j < len(lines) and lines[j].lstrip().startswith("|"):
                    j += 1
                tables += 1
                px = _narrowest_table_px([lines[i], *lines[i + 2 : j]])
                if px > TABLE_COLUMN_PX:
                    wide.append(f"{path.relative_to(ROOT)}: {lines[i].strip()[:60]} ({px} px)")
                i = j
            else:
                i += 1
    assert tables > 20
    assert not wide, f"tables wider than the column ({TABLE_COLUMN_PX} px at 1280 px):\n" + "\n".join(wide)


def test_site_loads_nothing_from_elsewhere():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["theme"].get("font") is False, "mkdocs-material loads Google Fonts unless theme.font is false"
    assets = config.get("extra_javascript", []) + config.get("extra_css", [])
    assert assets and not [a for a in assets if "://" in a], "extra_javascript/extra_css must be files in docs/"
    assert all((DOCS / a).is_file() for a in assets)
    fonts = re.findall(r"url\((fonts/[^)]+\.woff2)\)", (DOCS / "assets" / "katex" / "katex.min.css").read_text())
    assert fonts and all((DOCS / "assets" / "katex" / f).is_file() for f in fonts)


def test_repository_address_is_the_same_everywhere():
    yaml = pytest.importorskip("yaml")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    urls = dict(line.split(" = ") for line in config["metadata"]["project_urls"].strip().splitlines())
    assert yaml.safe_load((ROOT / "mkdocs.yml").read_text())["repo_url"] == urls["Source"]
    assert urls["Changelog"].startswith(urls["Source"] + "/")


def test_changelog_is_in_the_site():
    assert (DOCS / "changelog.md").read_text().strip() == '--8<-- "CHANGELOG.md"'


def test_concept_figure_is_committed():
    assert (DOCS / "img" / "concept.png").stat().st_size > 10_000
