"""JSON shapes of the service's answers (they also make the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Every error answer: one line naming the upload (when there is one) and what is wrong."""

    detail: str = Field(description="What went wrong, e.g. 'part.png: not an image (...)'.")


class Neighbour(BaseModel):
    """One of the nearest normal training images."""

    index: int = Field(description="Position in the training set (GET /v1/train/{index}.png shows it).")
    path: str = Field(
        description="The training image's name as stored in the model (a server-side path; informational only)."
    )
    distance: float | None = Field(
        description="Squared Euclidean distance between the global feature vectors "
        "(the kNN image score is the mean of these over the k nearest)."
    )


class ScoreResult(BaseModel):
    """The answer for one image."""

    name: str = Field(description="The upload's file name, for display only.")
    image_score: float = Field(description="Image anomaly score, identical to `spade-ad predict`.")
    is_anomalous: bool | None = Field(description="image_score >= threshold; null when the model has no thresholds.")
    threshold: float | None = Field(description="The model's image-score threshold, if any.")
    pixel_threshold: float | None = Field(description="The model's anomaly-map threshold, if any.")
    map_max: float = Field(description="Largest value of the anomaly map (over the image itself, not padding).")
    neighbours: list[Neighbour] = Field(description="Nearest normal training images, nearest first.")
    anomaly_map_png: str | None = Field(
        None, description="map=true: the anomaly map as a grey 8-bit PNG (base64), 0..255 spanning map_range."
    )
    overlay_png: str | None = Field(None, description="map=true: heatmap over the cropped image (base64 PNG).")
    outline_png: str | None = Field(
        None,
        description="map=true and a pixel threshold: transparent PNG with the outline of the pixels at or above it.",
    )
    map_range: list[float] | None = Field(None, description="map=true: [low, high] of the colour scale.")
    anomalous_pixel_fraction: float | None = Field(
        None, description="map=true: share of the image's pixels at or above the pixel threshold."
    )
    correspondence_png: str | None = Field(
        None, description="explain=true: the image rebuilt from the normal patches its pixels matched (base64 PNG)."
    )
    seconds: float = Field(description="Time the server spent on the request (reading, queueing, scoring).")
    model_version: int = Field(0, description="Version of the model that computed this answer (GET /v1/model).")


class BatchResult(BaseModel):
    """The answers for a batch upload, in upload order."""

    results: list[ScoreResult]
    seconds: float


class ModelInfo(BaseModel):
    """The loaded model and the service's limits."""

    backbone: str
    k: int
    kappa: int
    levels: list[int]
    sigma: float
    image_score: str
    image_k: int | None
    patch_size: int | list[int]  # one size for every level, or one per level
    image_size: int
    crop_size: int
    thresholds: dict[str, Any] | None
    n_train: int
    package_version: str
    runtime: str = "torch"  # where the backbone runs in this server (torch, onnxruntime, openvino)
    service: dict[str, Any]
    version: int = Field(description="Changes since fit (0: a model file written before versions existed).")
    bank_sha256: str = Field(description="sha256 of the bank's features and training names.")
    history: list[dict[str, Any]] = Field(description="The latest changes, oldest first.")
    operator: dict[str, Any] = Field(description="Whether POST/DELETE /v1/normal are enabled, and their rate limit.")


class NormalChange(BaseModel):
    """The answer to an operator change: the new version, saved before this answer was sent."""

    action: str = Field(description="'add' or 'remove'.")
    version: int
    bank_sha256: str
    n_train: int
    images: list[dict[str, Any]] = Field(
        description="Per image: name (the upload's), sha256 of its bytes (adds), index in the training set, "
        "and the server-side file it is kept in."
    )


class Stats(BaseModel):
    """Micro-batching counters since start."""

    batches: int
    images: int
    largest_batch: int
    mean_batch: float
    rejected_queue_full: int
    skipped_timed_out: int
    failed: int
    busy_seconds: float = Field(description="Time the model worker spent scoring.")
    slowest_batch_seconds: float
    admitted_now: int
    waiting_now: int
    pid: int = Field(description="The answering server process (with --workers N each has its own counters).")


class Status(BaseModel):
    """Liveness / readiness."""

    status: str
    detail: str | None = None
