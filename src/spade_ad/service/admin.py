"""The operator endpoints' guard rails: the admin token, a rate limit, the append-only audit log, and
where added uploads are kept.

The token is read once from a file (never from the command line, where ``ps`` would show it), compared
in constant time, and never logged, echoed or put in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..bank import atomic_write
from ..errors import SpadeError

#: Shortest token accepted: 16 characters (e.g. ``openssl rand -hex 32`` gives 64).
MIN_TOKEN_LENGTH = 16
#: File extensions for kept uploads, by the format Pillow detected.
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "PPM": ".ppm"}


def read_token_file(path: str | os.PathLike) -> str:
    """The admin token in ``path`` (surrounding whitespace ignored); SpadeError naming the file otherwise."""
    p = Path(path)
    try:
        token = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SpadeError(f"{p}: cannot read the admin token file ({type(exc).__name__})") from None
    if len(token) < MIN_TOKEN_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in token):
        raise SpadeError(
            f"{p}: the admin token must be one line of at least {MIN_TOKEN_LENGTH} printable characters "
            "without spaces (e.g. made with: openssl rand -hex 32)"
        )
    return token


class AuthProblem(Exception):
    """401 (no token sent) or 403 (wrong token, or the operator endpoints are disabled)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class RateLimit:
    """At most ``per_minute`` changes (images added or removed) in any 60 s window."""

    per_minute: int
    _times: deque[float] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, n: int) -> float:
        """Count ``n`` changes now and return 0, or return the seconds to wait (nothing counted)."""
        with self._lock:
            now = time.monotonic()
            while self._times and now - self._times[0] >= 60.0:
                self._times.popleft()
            if len(self._times) + n > self.per_minute:
                oldest = self._times[0] if self._times else now
                return max(1.0, 60.0 - (now - oldest))
            self._times.extend([now] * n)
            return 0.0


class AuditLog:
    """Append-only JSON lines: one ``os.write`` of a whole line to an ``O_APPEND`` file, then fsync.

    A line is written in one system call, so a killed server leaves whole lines only; a line is never
    rewritten or removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}, sort_keys=True)
        data = (line + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                written = os.write(fd, data)
                if written != len(data):  # only on a full disk; say so rather than leave it unnoticed
                    raise OSError(f"{self.path}: audit line written only in part ({written} of {len(data)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)


@dataclass
class Operator:
    """What ``spade-ad serve --admin-token-file`` switches on: who may change the model, how often,
    where the changed model, the added images and the audit log are written."""

    token: str = field(repr=False)
    model_path: Path
    audit_log: AuditLog
    uploads_dir: Path
    rate: RateLimit

    @classmethod
    def from_files(
        cls,
        token_file: str | os.PathLike,
        model_path: str | os.PathLike,
        audit_log: str | os.PathLike | None = None,
        uploads_dir: str | os.PathLike | None = None,
        max_changes_per_minute: int = 60,
    ) -> Operator:
        """Defaults: ``MODEL.audit.jsonl`` and the folder ``MODEL.normal/`` next to the model file."""
        model_path = Path(model_path).resolve()
        return cls(
            read_token_file(token_file),
            model_path,
            AuditLog(Path(audit_log) if audit_log else model_path.with_name(model_path.name + ".audit.jsonl")),
            Path(uploads_dir).resolve() if uploads_dir else model_path.with_name(model_path.name + ".normal"),
            RateLimit(max_changes_per_minute),
        )

    def authorize(self, authorization: str | None) -> None:
        """Raise :class:`AuthProblem` unless ``authorization`` is ``Bearer <the token>``."""
        if not authorization:
            raise AuthProblem(401, "this endpoint needs the admin token: send 'Authorization: Bearer <token>'")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise AuthProblem(401, "the Authorization header must be 'Bearer <token>'")
        # Constant time: the comparison takes as long whatever prefix of the token a guess gets right.
        if not hmac.compare_digest(given.strip().encode("utf-8"), self.token.encode("utf-8")):
            raise AuthProblem(403, "wrong admin token")

    def keep_upload(self, data: bytes, image_format: str | None) -> Path:
        """Store an added image's bytes as ``<uploads_dir>/<sha256>.<ext>`` (atomically; kept if present)
        and return the path: the model's training list then names a real file, as after ``fit``."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.uploads_dir / f"{digest}{_EXTENSIONS.get(image_format or '', '.img')}"
        if not path.exists():
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        return path
