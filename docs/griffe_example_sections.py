"""Griffe extension for the docs build: ``Example:`` sections as ``Examples:``.

The library's docstrings use ``Example:`` (Google style, as zuko does); griffe's Google parser only
treats the plural ``Examples:`` as a doctest section and would render the singular as an
admonition in which ``>>>`` lines become nested block quotes. This changes nothing in the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
