"""Writing results without ever leaving half a result or clobbering a user's files."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .bank import atomic_write, current_umask
from .errors import SpadeError


def check_can_write(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file or non-empty folder unless ``overwrite`` was asked for."""
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SpadeError(f"{path}: output folder exists and is not empty (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir() and not overwrite:
        raise SpadeError(f"{path}: exists (pass --overwrite to replace it)")


@contextmanager
def staged_dir(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` is untouched, so an interrupted or
    failed run never leaves a half-written output folder.
    """
    final = Path(final)
    check_can_write(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    # mkdtemp makes 0700 folders; results are meant to be shared, so use what mkdir would have given.
    tmp.chmod(0o777 & ~current_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        # Move the old result aside first so that there is never a moment with neither.
        old = final.with_name(f".{final.name}.old-{tmp.name}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Write a CSV file atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)

    atomic_write(Path(path), write)


def unique_stems(paths: Sequence[str]) -> list[str]:
    """Output file stems for input paths: the file stem, or, when two inputs share a stem, ``<parent>_<stem>``
    for every input (e.g. MVTec's test/good/000.png and test/crack/000.png -> good_000, crack_000); when
    that still collides (``day1/cam/000.png``, ``day2/cam/000.png``), as many parent folders as it takes."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    parts = [Path(p).parent.parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        stems = ["_".join([*pp[-depth:], Path(p).stem]) for p, pp in zip(paths, parts, strict=True)]
        if len(set(stems)) == len(stems):
            return stems
    # Same folder and stem (x.png and x.jpg), or the same file twice: no folder name tells them apart.
    dup = min({s for s in stems if stems.count(s) > 1})
    raise SpadeError(f"two inputs would both write outputs named {dup!r}; predict them in separate runs")
