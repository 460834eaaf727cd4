"""Griffe extension for the documentation site: Sphinx roles in docstrings become code spans.

The docstrings are written to be read in a terminal and an editor, so they use ``:meth:`x```-style
roles; mkdocstrings renders Markdown, where the role name would show as literal text.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:meth|func|class|mod|attr|data|exc|obj):`~?([^`]+)`")


class RstRoles(griffe.Extension):
    """Rewrite ``:role:`target``` to ```target``` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
