"""MkDocs hook: expand ``<!-- spade-ad --help -->`` in a page into the ``--help`` text of every command.

The command-line page is generated from the click commands themselves, so it cannot drift from them.
(mkdocs-click was tried first: it renders each command's help as Markdown, which swallows ``<stem>``
and turns ``[,segmented]`` into a broken link, and its table style prints click 8.3's unset defaults
as ``Sentinel.UNSET``.)
"""

from __future__ import annotations

from typing import Any

import click

MARKER = "<!-- spade-ad --help -->"
WIDTH = 100  # fixed, so the page does not depend on the terminal of whoever builds it


def _help(cmd: click.Command, name: str, parent: click.Context | None) -> tuple[str, click.Context]:
    # context_settings as click applies them (e.g. ``-h`` as well as ``--help``), then the fixed width.
    settings = {**cmd.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(cmd, info_name=name, parent=parent, **settings)
    return cmd.get_help(ctx), ctx


def cli_reference() -> str:
    """Markdown for ``spade-ad --help`` and then each subcommand's ``--help``, in name order."""
    from spade_ad.cli import main

    text, root = _help(main, "spade-ad", None)
    parts = [f"## `spade-ad`\n\n```text\n{text}\n```\n"]
    for name in sorted(main.list_commands(root)):
        cmd = main.get_command(root, name)
        if cmd is None or cmd.hidden:
            continue
        text, _ = _help(cmd, name, root)
        parts.append(f"## `spade-ad {name}`\n\n```text\n{text}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace the marker; pages without it are returned unchanged."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
