"""Running the service with uvicorn (what ``spade-ad serve`` calls)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SpadeError
from ..model import SPADE
from .admin import Operator
from .settings import ServiceSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

# With several worker processes uvicorn imports the app by name in each of them; these carry the
# model file and settings there (set by :func:`run`, read by :func:`app_from_env`).
ENV_MODEL = "SPADE_AD_SERVE_MODEL"
ENV_WEIGHTS = "SPADE_AD_SERVE_WEIGHTS"
ENV_SETTINGS = "SPADE_AD_SERVE_SETTINGS"
ENV_WHERE = "SPADE_AD_SERVE_RUNTIME"  # JSON: runtime, export_dir, device (SPADE.load keywords)


def app_from_env() -> FastAPI:
    """App factory for uvicorn worker processes: each loads its own copy of the model."""
    from .app import create_app

    model_path = os.environ[ENV_MODEL]
    weights = os.environ.get(ENV_WEIGHTS) or None
    settings = ServiceSettings.from_json(os.environ[ENV_SETTINGS])
    where = json.loads(os.environ.get(ENV_WHERE) or "{}")
    return create_app(lambda: SPADE.load(model_path, weights=weights, **where), settings, load_before_serving=True)


def run(
    model_path: Path,
    settings: ServiceSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    weights: str | None = None,
    log_level: str = "info",
    access_log: bool = True,
    operator: Operator | None = None,
    where: dict[str, Any] | None = None,
) -> None:
    """Serve ``model_path`` until interrupted.

    The model is loaded here first, so a bad model file or missing weights fail at once with a
    one-line error rather than inside a server. With ``workers`` > 1 uvicorn starts that many processes
    on one socket, each loading the model before it accepts connections and batching its own requests
    (memory and the queue limit are per process).
    """
    import uvicorn

    from .app import create_app

    if operator is not None and workers > 1:
        # Each worker process holds its own copy of the model, and an add acknowledged by one would not
        # be seen by the others (nor could they all be made to see it before the answer): refuse.
        raise SpadeError(
            f"--admin-token-file needs --workers 1: with {workers} worker processes each holds its own copy of "
            "the model, so an added image could not be in every worker before the add is acknowledged. "
            "Run the operator loop on a one-worker server"
        )
    # where: runtime / export_dir / device for SPADE.load (None: the model's runtime, on the CPU).
    where = {k: (str(v) if isinstance(v, Path) else v) for k, v in (where or {}).items() if v is not None}
    model = SPADE.load(model_path, weights=weights, **where)
    # uvicorn answers 503 itself beyond this many concurrent connections+tasks: a backstop in front of
    # the image queue for clients that open connections without sending anything.
    limit_concurrency = max(64, 4 * settings.queue_size)
    # A partial rather than a dict of keyword arguments, so that the type checker checks each one.
    serve = functools.partial(
        uvicorn.run,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        limit_concurrency=limit_concurrency,
        timeout_keep_alive=5,
    )
    if workers == 1:
        serve(create_app(model, settings, operator=operator))
        return
    del model
    os.environ[ENV_MODEL] = str(Path(model_path).resolve())
    os.environ[ENV_SETTINGS] = settings.to_json()
    os.environ[ENV_WHERE] = json.dumps(where)
    if weights is not None:
        os.environ[ENV_WEIGHTS] = str(weights)
    serve("spade_ad.service.server:app_from_env", factory=True, workers=workers)
