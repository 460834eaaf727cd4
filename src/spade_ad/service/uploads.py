"""Reading uploads from a request: body size limit, content-type checks, multipart parsing in memory.

Nothing here touches the file system: an upload's file name is cleaned for display and messages only.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .settings import ACCEPTED_CONTENT_TYPES

#: Room for multipart boundaries and part headers on top of the image bytes themselves.
MULTIPART_OVERHEAD = 64 * 1024
#: Parts of any kind one multipart request may have (bounds the parser's work on junk).
MAX_PARTS = 64
#: After refusing an oversized body we keep reading (and dropping) up to this many bytes, so a client
#: that sends the whole body before reading the answer still sees the 413 instead of a reset connection.
DRAIN_LIMIT = 256 * 1024 * 1024

# Aliases browsers and tools use for accepted types.
_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
    "image/tif": "image/tiff",
}


class UploadProblem(Exception):
    """A request the service refuses: HTTP ``status`` and a one-line message naming the upload."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Upload:
    """One uploaded image, still encoded. ``name`` is for display only and never opened."""

    name: str
    data: bytes


def display_name(raw: str | None, default: str = "upload") -> str:
    """A client-given file name made safe to show: last path component, printable, at most 100 characters."""
    if not raw:
        return default
    name = re.split(r"[\\/]", raw)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:100]
    return name or default


def media_type(content_type: str | None) -> str:
    """``"image/PNG; x=1"`` -> ``"image/png"`` (aliases mapped), ``""`` when absent."""
    if not content_type:
        return ""
    mt = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(mt, mt)


def _accepted_list() -> str:
    return ", ".join(ACCEPTED_CONTENT_TYPES)


async def read_body(chunks: AsyncIterator[bytes], content_length: str | None, limit: int) -> bytes:
    """The whole request body, or :class:`UploadProblem` 413 as soon as it is known to exceed ``limit``."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise UploadProblem(400, f"invalid Content-Length header {content_length!r}") from None
        if declared > limit:
            if declared <= DRAIN_LIMIT:
                async for _ in chunks:
                    pass
            raise UploadProblem(413, f"request body of {declared:,} bytes exceeds the limit of {limit:,} bytes")
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            drained = len(buf)
            del buf
            async for rest in chunks:
                drained += len(rest)
                if drained > DRAIN_LIMIT:
                    break
            raise UploadProblem(413, f"request body exceeds the limit of {limit:,} bytes")
    return bytes(buf)


@dataclass
class _Part:
    headers: dict[bytes, bytes]
    data: bytearray
    name: str | None = None
    filename: str | None = None


def parse_multipart(content_type: str, body: bytes) -> list[_Part]:
    """Split a multipart/form-data body into parts (in memory; the body is already size-limited)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadProblem(400, "multipart/form-data request without a boundary parameter")
    parts: list[_Part] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise UploadProblem(413, f"multipart request with more than {MAX_PARTS} parts")
        parts.append(_Part({}, bytearray()))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[bytes(header_name).lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data.extend(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as exc:
        raise UploadProblem(400, f"malformed multipart/form-data body ({exc})") from None
    for part in parts:
        _, opts = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = opts[b"name"].decode("utf-8", "replace") if b"name" in opts else None
        part.filename = opts[b"filename"].decode("utf-8", "replace") if b"filename" in opts else None
    return parts


def uploads_from_body(
    content_type: str | None, body: bytes, raw_name: str | None, max_files: int, max_bytes: int, field: str
) -> list[Upload]:
    """The images a request carries: multipart file parts, or the raw body itself.

    415 for a content type that is not an accepted image type (nor multipart); 413 for an image over
    ``max_bytes`` or more than ``max_files`` images; 422 when there is no image at all.
    """
    mt = media_type(content_type)
    if mt == "multipart/form-data":
        files = [p for p in parse_multipart(content_type or "", body) if p.name == field]
        if not files:
            raise UploadProblem(422, f"multipart upload has no file: send the image in a form field named {field!r}")
        if len(files) > max_files:
            raise UploadProblem(413, f"{len(files)} images in one request; the limit is {max_files}")
        out = []
        for i, part in enumerate(files):
            name = display_name(part.filename, f"upload[{i}]")
            part_type = media_type(part.headers.get(b"content-type", b"").decode("latin-1"))
            if part_type and part_type not in ACCEPTED_CONTENT_TYPES:
                raise UploadProblem(
                    415, f"{name}: unsupported content type {part_type!r}; send one of {_accepted_list()}"
                )
            if len(part.data) > max_bytes:
                raise UploadProblem(
                    413, f"{name}: {len(part.data):,} bytes exceeds the upload limit of {max_bytes:,} bytes"
                )
            out.append(Upload(name, bytes(part.data)))
        return out
    if mt in ACCEPTED_CONTENT_TYPES:
        name = display_name(raw_name)
        if len(body) > max_bytes:
            raise UploadProblem(413, f"{name}: {len(body):,} bytes exceeds the upload limit of {max_bytes:,} bytes")
        return [Upload(name, body)]
    shown = repr(mt) if mt else "none"
    raise UploadProblem(
        415,
        f"unsupported content type {shown}: send the image as multipart/form-data "
        f"(field {field!r}) or as the raw body with Content-Type one of {_accepted_list()}",
    )
