"""The README stays a short front door, and every relative link in it and in docs/ resolves.

(`mkdocs build --strict` in CI checks the site itself: pages in the nav, anchors between pages. This
test covers what the site build does not see: the README, and links as GitHub renders them.)
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
MAX_README_LINES = 200

# CommonMark plus GitHub's tables, so that links inside table cells are found too; code spans and
# fenced blocks are not links, which a regular expression would get wrong.
_md = MarkdownIt("commonmark").enable("table")


def links(path: Path) -> list[str]:
    """Every link and image target in a Markdown file, in order."""
    found = []
    for token in _md.parse(path.read_text(encoding="utf-8")):
        for t in token.children or []:
            if t.type == "link_open":
                found.append(str(t.attrs["href"]))
            elif t.type == "image":
                found.append(str(t.attrs["src"]))
    return found


def slug(heading: str) -> str:
    """The anchor GitHub and MkDocs give a plain heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


@cache
def _cli_hook():
    """scripts/mkdocs_cli_help.py, the hook that expands the command-line page when the site is built."""
    spec = importlib.util.spec_from_file_location("mkdocs_cli_help", ROOT / "scripts" / "mkdocs_cli_help.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def anchors(path: Path) -> set[str]:
    """Heading anchors of a page as the site builds it (docs/cli.md's headings come from the hook)."""
    text = path.read_text(encoding="utf-8")
    if "<!-- spade-ad --help -->" in text:
        text = _cli_hook().on_page_markdown(text, page=None)
    tokens = _md.parse(text)
    return {slug(tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"}


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative targets of ``path`` that do not exist, leave ``root``, or name a heading the target lacks."""
    bad = []
    for href in links(path):
        parts = urlsplit(href)
        if parts.scheme or parts.netloc or href.startswith("mailto:"):
            continue  # external: not checked offline
        target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
        if not target.exists():
            bad.append(f"{href} (no file {target})")
        elif not target.is_relative_to(root):
            bad.append(f"{href} (outside the repository)")
        elif parts.fragment and target.suffix == ".md" and parts.fragment not in anchors(target):
            bad.append(f"{href} (no heading #{parts.fragment} in {target.name})")
    return bad


def test_readme_is_short() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (at most {MAX_README_LINES})"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert links(path) or path != README, "README.md should link into docs/"
    assert broken_links(path) == [], f"{path.relative_to(ROOT)}: broken links"


def test_checker_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing heading and a link in a table are all caught."""
    (tmp_path / "there.md").write_text("# Some Title\n\n## A `code` heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#some-title) [ok](there.md#a-code-heading) [web](https://example.org/x)\n"
        "`[not a link](nowhere.md)`\n\n"
        "| a | b |\n|---|---|\n| [gone](gone.md) | ![img](img/missing.png) |\n\n"
        "[bad anchor](there.md#nope) [escapes](../../etc/hostname)\n"
    )
    bad = broken_links(page, root=tmp_path)
    assert [b.split(" ")[0] for b in bad] == ["gone.md", "img/missing.png", "there.md#nope", "../../etc/hostname"]


def test_cli_page_is_each_commands_help() -> None:
    """docs/cli.md shows, for every command, exactly what ``spade-ad COMMAND --help`` prints."""
    from click.testing import CliRunner

    from spade_ad.cli import main

    hook = _cli_hook()
    page = hook.cli_reference()
    for args in [[], *[[name] for name in main.commands]]:
        out = CliRunner().invoke(main, [*args, "--help"], prog_name="spade-ad", terminal_width=hook.WIDTH).output
        assert out.startswith("Usage: spade-ad"), out
        assert f"```text\n{out.rstrip()}\n```" in page, f"spade-ad {' '.join(args)} --help differs from docs/cli.md"
