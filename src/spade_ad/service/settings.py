"""Service limits and batching options (one frozen object, shared by the app, the CLI and the tests)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from ..errors import SpadeError

#: Encoded formats an upload may be in (Pillow names). Others (EPS, PSD, ICO, ...) are refused before
#: decoding: fewer decoders exposed to the network, and none that shells out (EPS needs Ghostscript).
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")

#: Content types a raw-body upload (or a multipart file part) may declare; the bytes decide the format.
ACCEPTED_CONTENT_TYPES = (
    "image/png",
    "image/jpeg",
    "image/bmp",
    "image/tiff",
    "image/webp",
    "image/x-portable-pixmap",
    "application/octet-stream",
)


@dataclass(frozen=True)
class ServiceSettings:
    """What ``spade-ad serve`` options set. Sizes are per image unless stated.

    ``queue_size`` bounds the images admitted at once (being read, decoded, waiting for the model or
    being scored); a request that does not fit gets 503 with Retry-After instead of waiting in an
    unbounded queue. ``batch_wait_ms`` / ``max_batch``: the model worker takes the first waiting image,
    waits up to ``batch_wait_ms`` for more, and scores up to ``max_batch`` of them in one call
    (``batch_wait_ms=0, max_batch=1`` disables micro-batching).
    """

    max_batch: int = 8
    batch_wait_ms: float = 5.0
    queue_size: int = 32
    request_timeout_s: float = 30.0
    max_upload_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 16_000_000  # 4000x4000; decoded float RGB is 12 bytes a pixel
    max_batch_images: int = 16
    torch_threads: int | None = None
    warmup: bool = True

    def __post_init__(self) -> None:
        positive_ints = ("max_batch", "queue_size", "max_upload_bytes", "max_pixels", "max_batch_images")
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpadeError(f"service setting {name} must be a positive integer, got {v!r}")
        if not self.batch_wait_ms >= 0:
            raise SpadeError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if not self.request_timeout_s > 0:
            raise SpadeError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise SpadeError(f"torch_threads must be None or >= 1, got {self.torch_threads!r}")

    @property
    def batch_request_limit(self) -> int:
        """Most images one /v1/score/batch request may carry: a request larger than the whole queue
        could never be admitted, so it is refused (413) rather than answered 503 for ever."""
        return min(self.max_batch_images, self.queue_size)

    def to_json(self) -> str:
        """Serialised form (passed to uvicorn worker processes through an environment variable)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServiceSettings:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))
