"""The FastAPI application: scoring endpoints, model information, health checks and the inspection page.

``create_app(model, settings)`` builds it around one model (or a function that loads one). The model is
loaded and warmed up in a background thread, so ``/healthz`` answers at once and ``/readyz`` turns 200
when scoring can start; one :class:`~spade_ad.service.batcher.MicroBatcher` worker owns the model.
"""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..data import read_image_bytes
from ..errors import ImageError, ImageTooLargeError, SpadeError
from ..model import SPADE
from .admin import AuthProblem, Operator
from .batcher import BatcherClosed, MicroBatcher, QueueFull
from .schemas import BatchResult, ModelInfo, Neighbour, NormalChange, Problem, ScoreResult, Stats, Status
from .scoring import Job, Scored, render_correspondence, render_pictures, score_jobs, train_image_png
from .settings import ACCEPTED_CONTENT_TYPES, ACCEPTED_FORMATS, ServiceSettings
from .uploads import MULTIPART_OVERHEAD, Upload, UploadProblem, read_body, uploads_from_body

# uvicorn configures this logger, so messages show next to its own.
log = logging.getLogger("uvicorn.error")

ModelSource = SPADE | Callable[[], SPADE]

#: The inspection page may talk to this server only: no CDN, no other origin, pictures from data: URLs.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


Pinned = tuple[SPADE, Job]


def score_pinned(items: list[Pinned]) -> list[Scored]:
    """Score a micro-batch, each job with the model its request was admitted under: a request is scored
    entirely by one version even when the operator swaps in a new one meanwhile."""
    out: list[Scored | None] = [None] * len(items)
    for model in {id(m): m for m, _ in items}.values():
        idx = [i for i, (m, _) in enumerate(items) if m is model]
        for i, scored in zip(idx, score_jobs(model, [items[i][1] for i in idx]), strict=True):
            out[i] = scored
    return out  # type: ignore[return-value]


class _Service:
    """The model, its batcher and readiness, shared by every request of one process."""

    def __init__(self, source: ModelSource, settings: ServiceSettings) -> None:
        self.source = source
        self.settings = settings
        self.model: SPADE | None = None
        self.batcher: MicroBatcher[Pinned, Scored] | None = None
        self.error: str | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        """Load (if given a loader) and warm up the model, then start the batcher. Runs in a thread."""
        try:
            if self.settings.torch_threads is not None:
                import torch

                torch.set_num_threads(self.settings.torch_threads)
            model = self.source if isinstance(self.source, SPADE) else self.source()
            model.progress = False
            if self.settings.warmup:
                # First calls build the backbone and allocate; do that before saying "ready".
                warm = Job(np.full((model.image_size, model.image_size, 3), 128, np.uint8), "warm-up")
                render_pictures(model, warm, score_jobs(model, [warm])[0])
            self.model = model
            self.batcher = MicroBatcher(
                score_pinned,
                max_batch=self.settings.max_batch,
                wait_s=self.settings.batch_wait_ms / 1000.0,
                capacity=self.settings.queue_size,
            )
            self.ready.set()
            log.info("model ready: %s, %d training images", model.backbone, len(model.train_paths_))
        except BaseException as exc:  # noqa: BLE001 - reported by /readyz and the log, not lost in a thread
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("model failed to load: %s", self.error)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def require(self) -> tuple[SPADE, MicroBatcher[Pinned, Scored]]:
        if not self.ready.is_set() or self.model is None or self.batcher is None:
            detail = f"model failed to load: {self.error}" if self.error else "model is still loading"
            raise HTTPException(503, detail, headers={"Retry-After": "5"})
        return self.model, self.batcher


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "Malformed request (e.g. broken multipart body)."},
    413: {
        "model": Problem,
        "description": "Upload over the byte limit, image over the pixel limit, or too many images.",
    },
    415: {"model": Problem, "description": "Content type is not an accepted image type nor multipart/form-data."},
    422: {"model": Problem, "description": "Not a decodable image of an accepted format, or invalid parameters."},
    503: {"model": Problem, "description": "Queue full or model not ready; retry after Retry-After seconds."},
    504: {"model": Problem, "description": "Not answered within the request timeout."},
}

_IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}


def _format(data: bytes) -> str | None:
    """Pillow's name for an already validated upload's format (header only, nothing decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.format


def _request_body(field: str, many: bool) -> dict[str, Any]:
    file_schema: dict[str, Any] = {"type": "string", "format": "binary"}
    if many:
        file_schema = {"type": "array", "items": file_schema, "minItems": 1}
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": {"type": "object", "properties": {field: file_schema}, "required": [field]}},
    }
    if not many:
        content.update(dict.fromkeys(ACCEPTED_CONTENT_TYPES, _IMAGE_BODY))
    return {"requestBody": {"required": True, "content": content}}


def create_app(
    model: ModelSource,
    settings: ServiceSettings | None = None,
    load_before_serving: bool = False,
    operator: Operator | None = None,
) -> FastAPI:
    """The scoring service around ``model``: a fitted :class:`SPADE`, or a function returning one.

    ``operator``: switches on ``POST /v1/normal`` and ``DELETE /v1/normal/{index}`` (admin token, rate
    limit, audit log; each change is saved to ``operator.model_path`` before it is acknowledged).
    Without it they answer 403.

    Loading and warm-up run in a background thread, so the server answers /healthz (and /readyz with
    503) meanwhile. ``load_before_serving``: finish them before the server accepts connections instead;
    used for ``--workers N``, where the processes share one socket and a worker must not take requests
    while another one's readiness was what /readyz reported.
    """
    settings = settings or ServiceSettings()
    svc = _Service(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_before_serving:
            await asyncio.to_thread(svc.start)
            if svc.error:
                raise RuntimeError(svc.error)
        else:
            threading.Thread(target=svc.start, name="spade-model-loader", daemon=True).start()
        yield
        svc.close()

    app = FastAPI(
        title="spade-ad scoring service",
        version=__version__,
        description="SPADE anomaly scores, maps and nearest normal images for uploaded images.",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN; the schema stays at /openapi.json
        redoc_url=None,
    )
    app.state.service = svc

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, status_code=422)

    # -- health and information -----------------------------------------------------------------
    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz() -> Status:
        return Status(status="alive")

    @app.get(
        "/readyz",
        response_model=Status,
        summary="The model is loaded and warm",
        responses={503: {"model": Status, "description": "Still loading, or failed to load."}},
    )
    async def readyz() -> Any:
        if svc.ready.is_set():
            return Status(status="ready")
        status = "failed" if svc.error else "loading"
        return JSONResponse(Status(status=status, detail=svc.error).model_dump(), status_code=503)

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        summary="The loaded model and the service limits",
        responses={503: _ERRORS[503]},
    )
    async def model_info() -> ModelInfo:
        m, _ = svc.require()
        cfg = m.get_config()
        prep = cfg["preprocessing"]
        return ModelInfo(
            backbone=cfg["backbone"],
            k=cfg["k"],
            kappa=cfg["kappa"],
            levels=cfg["levels"],
            sigma=cfg["sigma"],
            image_score=cfg["image_score"],
            image_k=cfg["image_k"],
            patch_size=cfg["patch_size"],
            image_size=prep["image_size"],
            crop_size=prep["crop_size"],
            thresholds=cfg["thresholds"],
            n_train=cfg["n_train"],
            package_version=cfg["package_version"],
            **m.version_info(),
            operator={
                "enabled": operator is not None,
                "max_changes_per_minute": None if operator is None else operator.rate.per_minute,
            },
            runtime=m.runtime,
            service={
                "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": min(settings.max_pixels, m.max_pixels),
                "max_batch_images": settings.batch_request_limit,
                "max_batch": settings.max_batch,
                "batch_wait_ms": settings.batch_wait_ms,
                "queue_size": settings.queue_size,
                "request_timeout_s": settings.request_timeout_s,
                "accepted_content_types": list(ACCEPTED_CONTENT_TYPES),
                "accepted_formats": list(ACCEPTED_FORMATS),
            },
        )

    @app.get("/v1/stats", response_model=Stats, summary="Micro-batching counters", responses={503: _ERRORS[503]})
    async def stats() -> Stats:
        _, b = svc.require()
        s = b.stats
        return Stats(
            batches=s.batches,
            images=s.images,
            largest_batch=s.largest_batch,
            mean_batch=s.images / s.batches if s.batches else 0.0,
            rejected_queue_full=s.rejected,
            skipped_timed_out=s.skipped_cancelled,
            failed=s.failed,
            busy_seconds=s.busy_seconds,
            slowest_batch_seconds=s.slowest_batch_seconds,
            admitted_now=b.admitted,
            waiting_now=b.waiting,
            pid=os.getpid(),
        )

    # Keyed by (model version, index): a removal renumbers the training images. Cleared on each swap.
    train_pngs: dict[tuple[int, int], bytes] = {}

    def _train_png(m: SPADE, index: int) -> bytes:
        key = (m.version_, index)
        if key not in train_pngs:
            if len(train_pngs) >= 128:
                train_pngs.clear()
            train_pngs[key] = train_image_png(m, index)
        return train_pngs[key]

    @app.get(
        "/v1/train/{index}.png",
        summary="A training image as the model sees it (cropped)",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": Problem}, 422: _ERRORS[422], 503: _ERRORS[503]},
    )
    async def train_image(index: int) -> Response:
        m, _ = svc.require()
        n = len(m.train_paths_)
        if not 0 <= index < n:
            raise HTTPException(404, f"no training image {index}: the model has {n} (0..{n - 1})")
        try:
            png = await run_in_threadpool(_train_png, m, index)
        except SpadeError:
            raise HTTPException(404, f"training image {index} is not readable on this server") from None
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # -- scoring --------------------------------------------------------------------------------
    def _decode(uploads: list[Upload], max_pixels: int, explain: bool) -> list[Job]:
        jobs = []
        for up in uploads:
            try:
                img = read_image_bytes(up.data, up.name, max_pixels=max_pixels, formats=ACCEPTED_FORMATS)
            except ImageTooLargeError as exc:
                raise UploadProblem(413, str(exc)) from None
            except ImageError as exc:
                raise UploadProblem(422, str(exc)) from None
            jobs.append(Job(img, up.name, explain))
        return jobs

    def _answer(m: SPADE, job: Job, scored: Scored, want_map: bool, n_neighbours: int, t0: float) -> ScoreResult:
        names = m.train_paths_
        e = scored.explanation
        neighbours = [
            Neighbour(
                index=int(j),
                path=names[int(j)],
                distance=float(scored.neighbor_sq_distances[r])
                if scored.neighbor_sq_distances is not None
                else None
                if e is None
                else float(e.neighbor_sq_distances[r]),
            )
            for r, j in enumerate(scored.neighbors[:n_neighbours])
        ]
        th = m.thresholds_
        res = ScoreResult(
            name=job.name,
            image_score=scored.image_score,
            is_anomalous=scored.is_anomalous,
            threshold=None if th is None else th.image,
            pixel_threshold=None if th is None else th.pixel,
            map_max=scored.map_max,
            neighbours=neighbours,
            seconds=0.0,
            model_version=m.version_,
        )
        if want_map:
            pics = render_pictures(m, job, scored)
            res.anomaly_map_png, res.overlay_png, res.outline_png = (
                pics.anomaly_map_png,
                pics.overlay_png,
                pics.outline_png,
            )
            res.map_range, res.anomalous_pixel_fraction = list(pics.map_range), pics.anomalous_pixel_fraction
        if e is not None:
            res.correspondence_png = render_correspondence(m, e)
        res.seconds = time.perf_counter() - t0
        return res

    async def _read_uploads(request: Request, field: str, limit_files: int) -> list[Upload]:
        """The request's images, still encoded (body size, content type and multipart checks)."""
        body = await read_body(
            request.stream(),
            request.headers.get("content-length"),
            limit_files * settings.max_upload_bytes + MULTIPART_OVERHEAD,
        )
        return uploads_from_body(
            request.headers.get("content-type"),
            body,
            request.headers.get("x-filename"),
            settings.batch_request_limit,
            settings.max_upload_bytes,
            field,
        )

    async def _score(
        request: Request, many: bool, want_map: bool, explain: bool, n_neighbours: int
    ) -> list[ScoreResult]:
        t0 = time.perf_counter()
        m, batcher = svc.require()
        limit_files = settings.batch_request_limit if many else 1
        futures: list[Any] = []
        try:
            admission = batcher.admit(1)
        except (QueueFull, BatcherClosed) as exc:
            raise HTTPException(503, f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
        try:
            async with asyncio.timeout(settings.request_timeout_s):
                uploads = await _read_uploads(request, "files" if many else "file", limit_files)
                if not many and len(uploads) > 1:
                    raise UploadProblem(
                        422, f"{len(uploads)} images sent to /v1/score; send one, or use /v1/score/batch"
                    )
                admission.grow(len(uploads) - 1)
                jobs = await run_in_threadpool(_decode, uploads, min(settings.max_pixels, m.max_pixels), explain)
                del uploads
                futures = batcher.submit([(m, j) for j in jobs])
                try:
                    scored = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
                except SpadeError as exc:
                    failed = next(
                        (
                            j.name
                            for j, f in zip(jobs, futures, strict=True)
                            if f.done() and not f.cancelled() and f.exception() is exc
                        ),
                        "upload",
                    )
                    raise UploadProblem(422, f"{failed}: {exc}") from None
                return await run_in_threadpool(
                    lambda: [_answer(m, j, s, want_map, n_neighbours, t0) for j, s in zip(jobs, scored, strict=True)]
                )
        except UploadProblem as exc:
            raise HTTPException(exc.status, exc.message) from None
        except QueueFull as exc:
            raise HTTPException(503, f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
        except TimeoutError:
            raise HTTPException(
                504, f"no answer within the request timeout of {settings.request_timeout_s:g} s (server busy)"
            ) from None
        finally:
            for f in futures:
                f.cancel()  # no-op for finished ones; a timed-out image is not scored later for nobody
            admission.release()

    score_params = {
        "want_map": Query(
            False, alias="map", description="Include the anomaly map, heatmap overlay and outline PNGs (base64)."
        ),
        "explain": Query(
            False,
            description="Also run SPADE.explain: neighbour distances and the correspondence "
            "picture (about half a prediction more work).",
        ),
        "neighbours": Query(5, ge=0, le=1000, description="How many nearest normal images to list (at most k)."),
    }

    @app.post(
        "/v1/score",
        response_model=ScoreResult,
        summary="Score one image",
        description="Send one image as multipart/form-data (field `file`) or as the raw body with an image "
        "Content-Type (optional `X-Filename` header names it in answers and messages).",
        responses=_ERRORS,
        openapi_extra=_request_body("file", many=False),
    )
    async def score(
        request: Request,
        want_map: bool = score_params["want_map"],
        explain: bool = score_params["explain"],
        neighbours: int = score_params["neighbours"],
    ) -> Any:
        return (await _score(request, False, want_map, explain, neighbours))[0]

    @app.post(
        "/v1/score/batch",
        response_model=BatchResult,
        summary="Score several images",
        description="Send the images as multipart/form-data, each in a field named `files`.",
        responses=_ERRORS,
        openapi_extra=_request_body("files", many=True),
    )
    async def score_batch(
        request: Request,
        want_map: bool = score_params["want_map"],
        explain: bool = score_params["explain"],
        neighbours: int = score_params["neighbours"],
    ) -> Any:
        t0 = time.perf_counter()
        results = await _score(request, True, want_map, explain, neighbours)
        return BatchResult(results=results, seconds=time.perf_counter() - t0)

    # -- the operator loop: add / remove normal images ------------------------------------------
    # One change at a time; scoring goes on with the model it pinned while a change is prepared.
    change_lock = asyncio.Lock()
    admin_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": Problem, "description": "No admin token sent (Authorization: Bearer <token>)."},
        403: {"model": Problem, "description": "Wrong admin token, or the operator endpoints are disabled."},
        429: {"model": Problem, "description": "Too many changes this minute; retry after Retry-After seconds."},
    }

    def _client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def _authorize(request: Request) -> Operator:
        """The operator settings if the request carries the admin token; otherwise 401/403 (audited)."""
        if operator is None:
            raise HTTPException(
                403, "the operator endpoints are disabled on this server (start it with --admin-token-file)"
            )
        try:
            operator.authorize(request.headers.get("authorization"))
        except AuthProblem as exc:
            # What was sent is never logged or echoed, not even in part.
            # The fsync'd audit line is written off the event loop, so refusals do not stall scoring.
            record = {"client": _client(request), "action": "denied", "status": exc.status, "path": request.url.path}
            await run_in_threadpool(operator.audit_log.append, record)
            log.warning("operator request refused (%d) from %s", exc.status, _client(request))
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            raise HTTPException(exc.status, exc.message, headers=headers) from None
        return operator

    def _rate(op: Operator, n: int) -> None:
        wait = op.rate.take(n)
        if wait:
            raise HTTPException(
                429,
                f"more than {op.rate.per_minute} changes in a minute; retry in {wait:.0f} s",
                headers={"Retry-After": str(int(wait + 0.999))},
            )

    def _commit(op: Operator, new: SPADE, request: Request, action: str, images: list[dict[str, Any]]) -> None:
        """Persist ``new`` (atomic rename), write the audit line, then make it the live model."""
        try:
            new.save(op.model_path)
        except (OSError, SpadeError) as exc:
            log.error("could not save the new model version: %s", exc)
            raise HTTPException(
                500, f"could not save the new model version ({exc}); the live model is unchanged"
            ) from None
        info = new.version_info()
        op.audit_log.append(
            {
                "client": _client(request),
                "action": action,
                "images": images,
                "version": info["version"],
                "bank_sha256": info["bank_sha256"],
                "n_train": len(new.train_paths_),
            }
        )
        svc.model = new  # one reference swap: a request sees the old model or the new one, never a mix
        train_pngs.clear()

    def _change_answer(m: SPADE, action: str, images: list[dict[str, Any]]) -> NormalChange:
        info = m.version_info()
        return NormalChange(
            action=action,
            version=info["version"],
            bank_sha256=info["bank_sha256"],
            n_train=len(m.train_paths_),
            images=images,
        )

    @app.post(
        "/v1/normal",
        response_model=NormalChange,
        summary="Add normal images to the live model (admin token)",
        description="Send one or several images as multipart/form-data (field `file`, repeatable) or one as "
        "the raw body. They join the bank as if the model had been fitted with them last; the new version is "
        "saved to the model file before the answer. Needs `Authorization: Bearer <admin token>`.",
        responses={**_ERRORS, **admin_errors},
        openapi_extra=_request_body("file", many=False),
        include_in_schema=operator is not None,
    )
    async def add_normal(request: Request) -> Any:
        op = await _authorize(request)
        m0, _ = svc.require()
        try:
            uploads = await _read_uploads(request, "file", settings.batch_request_limit)
            # Decoded here only to refuse bad uploads before anything is kept or counted.
            await run_in_threadpool(_decode, uploads, min(settings.max_pixels, m0.max_pixels), False)
        except UploadProblem as exc:
            raise HTTPException(exc.status, exc.message) from None
        _rate(op, len(uploads))
        client = _client(request)

        def change() -> NormalChange:
            m, _ = svc.require()
            kept = [op.keep_upload(up.data, _format(up.data)) for up in uploads]
            images = [
                {"name": up.name, "sha256": k.stem, "index": len(m.train_paths_) + i, "path": str(k)}
                for i, (up, k) in enumerate(zip(uploads, kept, strict=True))
            ]
            # Copy-on-write: add_normal builds a new bank; the live model is untouched until the swap.
            new = copy.copy(m).add_normal([str(k) for k in kept], by=f"service admin at {client}")
            _commit(op, new, request, "add", images)
            return _change_answer(new, "add", images)

        async with change_lock:
            return await run_in_threadpool(change)

    @app.delete(
        "/v1/normal/{index}",
        response_model=NormalChange,
        summary="Remove one training image from the live model (admin token)",
        description="Later training images move down by one. The new version is saved to the model file "
        "before the answer. Needs `Authorization: Bearer <admin token>`.",
        responses={404: {"model": Problem}, 422: _ERRORS[422], 503: _ERRORS[503], **admin_errors},
        include_in_schema=operator is not None,
    )
    async def remove_normal(index: int, request: Request) -> Any:
        op = await _authorize(request)
        svc.require()
        client = _client(request)

        def change() -> NormalChange:
            m, _ = svc.require()
            n = len(m.train_paths_)
            if not 0 <= index < n:
                raise HTTPException(404, f"no training image {index}: the model has {n} (0..{n - 1})")
            if n == 1:
                raise HTTPException(422, "the model's last training image cannot be removed")
            path = m.train_paths_[index]
            images = [{"name": Path(path).name, "index": index, "path": path}]
            new = copy.copy(m).remove_normal([index], by=f"service admin at {client}")
            _commit(op, new, request, "remove", images)
            return _change_answer(new, "remove", images)

        async with change_lock:
            _rate(op, 1)
            return await run_in_threadpool(change)

    # -- the inspection page --------------------------------------------------------------------
    page = resources.files("spade_ad.service").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": PAGE_CSP,
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    return app
