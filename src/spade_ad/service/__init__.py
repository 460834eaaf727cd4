"""HTTP scoring service for a fitted SPADE model (``spade-ad serve``): FastAPI app, micro-batcher, page.

Needs only SPADE's public API; see :func:`create_app` and docs/service.md.
"""

from .app import create_app
from .batcher import MicroBatcher, QueueFull
from .settings import ServiceSettings

__all__ = ["MicroBatcher", "QueueFull", "ServiceSettings", "create_app"]
