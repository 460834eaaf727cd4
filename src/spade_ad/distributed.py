"""Scale-out on Ray: fit, predict and evaluate across a cluster, resumable and fault tolerant.

An edge module: it uses the estimator like any user (``SPADE.load(mmap=True)``, ``predict``, ``extract``)
and Ray Data for the scheduling, retries and back-pressure. Import it only when you want Ray
(``pip install "spade-ad[ray]"``); ``import spade_ad`` never imports Ray.

Work is cut into *blocks* of ``block_size`` inputs, one Ray Data row each, so a retried block (a worker
or node died) is the same block again: its outputs are rewritten under the same names, each file
atomically, and the block's Parquet part is written last, as its commit record. A re-run reads the
committed parts and scores only the inputs missing from them.

Results of ``predict`` for model file M live in ``DEST/model-<first 16 hex of M's content sha256>/``:
``scores/part-*.parquet`` (one row per scored input), ``failures.parquet`` (inputs that could not be
scored in the last run, with the error), ``maps/<stem>.npy``, ``overlays/<stem>.png``,
``masks/<stem>.png`` (models with a pixel threshold) and ``model.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.fs as pafs  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import ray
import torch
from tqdm.auto import tqdm

from .bank import FeatureBank, StreamingModelFile, atomic_write
from .data import IMAGE_EXTENSIONS, expand_inputs, preprocess, read_image_bytes
from .errors import DatasetError, ImageError, SpadeError
from .model import BANK_DTYPES, SPADE, Prediction
from .output import unique_stems

#: Inputs per block: one backbone batch (16) so that blocks see the same batches as a single-process run.
BLOCK_SIZE = 16
MARKER = "spade-ad-results.json"


# ------------------------------------------------------------------------------------------------
# Files: local paths or any URI pyarrow's filesystems accept (s3://, gs://, hdfs:// ...)
# ------------------------------------------------------------------------------------------------
def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location).absolute())


def expand_sources(sources: Sequence[str | os.PathLike], recursive: bool = False) -> list[str]:
    """Files and folders (local or URIs) -> image names, as ``predict`` lists them (folders sorted;
    sub-folders walked when ``recursive``, hidden ones skipped)."""
    out: list[str] = []
    for src in map(str, sources):
        if "://" not in src:
            out.extend(str(p) for p in expand_inputs([src], recursive=recursive))
            continue
        fs, path = _resolve(src)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
            rel = [(e, e.path[len(path) :].lstrip("/")) for e in entries]
            names = sorted(
                r
                for e, r in rel
                if e.type == pafs.FileType.File
                and not any(part.startswith(".") for part in r.split("/"))
                and Path(e.base_name).suffix.lower() in IMAGE_EXTENSIONS
            )
            if not names:
                raise DatasetError(f"{src}: folder contains no images")
            out.extend(f"{src.rstrip('/')}/{n}" for n in names)
        elif info.type == pafs.FileType.File:
            out.append(src)
        else:
            raise ImageError(f"{src}: no such file or folder")
    if not out:
        raise DatasetError("no input images given")
    return out


def read_input(name: str, max_pixels: int) -> np.ndarray:
    """Read and decode one input image (float32 RGB) through its filesystem; errors name the file."""
    fs, path = _resolve(name)
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot be read ({exc})") from None
    return read_image_bytes(data, name, max_pixels)


def _put(root: str, rel: str, data: bytes) -> None:
    """Write ``root/rel`` atomically: local files by temp file + rename, object stores by one upload."""
    fs, base = _resolve(root)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write(Path(base) / rel, lambda tmp: Path(tmp).write_bytes(data))
        return
    fs.create_dir(os.path.dirname(f"{base}/{rel}"), recursive=True)
    with fs.open_output_stream(f"{base}/{rel}") as f:  # an object appears whole or not at all
        f.write(data)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def model_sha256(model_path: str | os.PathLike) -> str:
    """The model file's content checksum (from its header; :meth:`SPADE.load` verifies it)."""
    from safetensors import safe_open

    with safe_open(str(model_path), framework="pt") as f:
        return (f.metadata() or {}).get("content_sha256", "")


# ------------------------------------------------------------------------------------------------
# Ray
# ------------------------------------------------------------------------------------------------
def connect(address: str | None = None) -> None:
    """Join the cluster at ``address`` ("auto", "ray://...", "host:port"); None starts a local one.

    Does nothing when this process is already connected (users who drive Ray themselves).
    """
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset INFO lines would drown our progress
    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts inputs, not blocks
    ctx.print_on_execution_start = False


def _workers(num_workers: int | None, cpus_per_worker: float) -> int:
    if num_workers is not None:
        return num_workers
    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))


def _unwrap(exc: BaseException) -> BaseException:
    """The SpadeError behind a Ray task failure, if there is one (so the CLI can print it plainly)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SpadeError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else (seen.__cause__ or seen.__context__)
    return exc


def _blocks(names: Sequence[str], stems: Sequence[str], block_size: int) -> list[dict[str, Any]]:
    """One Ray Data row per block; the block id hashes its inputs, so a retry rewrites the same part."""
    rows = []
    for s in range(0, len(names), block_size):
        part = list(names[s : s + block_size])
        rows.append(
            {
                "block": hashlib.sha1("\n".join(part).encode()).hexdigest()[:20],
                "start": s,
                "paths": part,
                "stems": list(stems[s : s + block_size]),
            }
        )
    return rows


def _run(rows: list[dict[str, Any]], worker: type, kwargs: dict[str, Any], workers: int, cpus: float) -> Any:
    """The Ray Data pipeline: the blocks, through an actor pool of ``worker`` (one model per actor)."""
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    return ds.map_batches(
        worker,
        batch_size=1,
        batch_format="pyarrow",
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(workers, len(rows)))),
        num_cpus=cpus,
    ).iter_batches(batch_size=None, batch_format="pyarrow")


def _set_threads(cpus: float) -> None:
    # An actor gets `cpus` cores; torch would otherwise start one thread per core of the machine.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpus)))


# ------------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------------
class Scorer:
    """Ray actor: loads the model file once (memory-mapped bank) and scores blocks of inputs."""

    def __init__(
        self,
        model_path: str,
        sha256: str,
        weights: str | None,
        out: str | None,
        overlays: bool,
        segment_above: float | None,
        return_maps: bool,
        cpus: float,
        runtime: str | None = None,
        export_dir: str | None = None,
    ) -> None:
        _set_threads(cpus)
        self.model = SPADE.load(model_path, weights=weights, mmap=True, runtime=runtime, export_dir=export_dir)
        if model_sha256(model_path) != sha256:
            raise SpadeError(f"{model_path}: the model file changed since the run started")
        self.sha256, self.out, self.overlays = sha256, out, overlays
        self.segment_above, self.return_maps = segment_above, return_maps
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        row = batch.to_pylist()[0]
        paths, stems = row["paths"], row["stems"]
        images: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i, p in enumerate(paths):
            try:
                images[i] = read_input(p, self.model.max_pixels)
            except SpadeError as exc:
                errors[i] = str(exc)
        preds = self._predict(images, errors)
        records = [self._record(i, paths[i], stems[i], images[i], preds[i]) for i in sorted(preds)]
        if self.out is not None:
            keep = [{k: v for k, v in r.items() if k != "map"} for r in records]
            _put(self.out, f"scores/part-{row['block']}.parquet", _parquet_bytes(pa.Table.from_pylist(keep, SCHEMA)))
        for i in sorted(errors):
            records.append({"path": paths[i], "error": errors[i]})
        return pa.Table.from_pylist(records, RESULT_SCHEMA)

    def _predict(self, images: dict[int, np.ndarray], errors: dict[int, str]) -> dict[int, Prediction]:
        """Per input index, its one-image slice of the prediction. A whole block is scored at once;
        when that fails (an image whose features are NaN) each image is scored alone to find it."""
        idx = sorted(images)
        if not idx:
            return {}
        try:
            pred = self.model.predict([images[i] for i in idx], segment_above=self.segment_above)
            return {i: _take(pred, j) for j, i in enumerate(idx)}
        except SpadeError:
            out = {}
            for i in idx:
                try:
                    out[i] = self.model.predict([images[i]], segment_above=self.segment_above)
                except SpadeError as exc:
                    errors[i] = str(exc)
            return out

    def _record(self, i: int, path: str, stem: str, image: np.ndarray, p: Prediction) -> dict[str, Any]:
        m = self.model
        amap = p.anomaly_maps[0]
        segmented = bool(p.segmented[0]) if p.segmented is not None else True
        valid = p.valid[0] if p.valid is not None else np.ones(amap.shape, bool)
        th = m.thresholds_
        rec: dict[str, Any] = {
            "path": path,
            "image_score": float(p.image_scores[0]),
            "is_anomalous": None if p.is_anomalous is None else bool(p.is_anomalous[0]),
            "map_max": float(amap[valid].max()) if segmented else None,
            "model_sha256": self.sha256,
            "segmented": segmented,
            "nearest_train": m.train_paths_[int(p.neighbors[0, 0])],
            "neighbors": p.neighbors[0].tolist(),
            "neighbor_sq_distances": np.asarray(p.neighbor_sq_distances)[0].tolist(),
            "map_file": None,
            "overlay_file": None,
            "mask_file": None,
            "worker": self.worker,
            "scored_at": time.time(),
            "error": None,
        }
        if self.return_maps:
            rec["map"] = amap.astype(np.float32).tobytes()
        if self.out is None or not segmented:
            return rec
        buf = io.BytesIO()
        np.save(buf, amap)
        rec["map_file"] = f"maps/{stem}.npy"
        _put(self.out, rec["map_file"], buf.getvalue())
        if self.overlays:
            from .viz import heatmap_overlay

            img = preprocess(image, m.image_size, m.crop_size, m.geometry)
            # One colour scale for every block of every run (a single-process run scales by its own
            # min/max, which no worker knows): 0 to twice the pixel threshold, else the image's range.
            lo, hi = (0.0, 2 * th.pixel) if th is not None and th.pixel is not None else (amap.min(), amap.max())
            rec["overlay_file"] = f"overlays/{stem}.png"
            _put(self.out, rec["overlay_file"], _png_bytes(heatmap_overlay(img, amap, lo, hi)))
        if th is not None and th.pixel is not None:
            rec["mask_file"] = f"masks/{stem}.png"
            _put(self.out, rec["mask_file"], _png_bytes(((amap >= th.pixel) * 255).astype(np.uint8), "L"))
        return rec


def _take(p: Prediction, j: int) -> Prediction:
    def sl(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[j : j + 1]

    return Prediction(
        p.image_scores[j : j + 1],
        p.anomaly_maps[j : j + 1],
        p.neighbors[j : j + 1],
        p.names[j : j + 1],
        sl(p.is_anomalous),
        sl(p.segmented),
        sl(p.valid),
        sl(p.neighbor_sq_distances),
    )


#: The ``scores`` table (one Parquet dataset per model).
SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("image_score", pa.float64()),
        ("is_anomalous", pa.bool_()),
        ("map_max", pa.float64()),
        ("model_sha256", pa.string()),
        ("segmented", pa.bool_()),
        ("nearest_train", pa.string()),
        ("neighbors", pa.list_(pa.int64())),
        ("neighbor_sq_distances", pa.list_(pa.float64())),
        ("map_file", pa.string()),
        ("overlay_file", pa.string()),
        ("mask_file", pa.string()),
        ("worker", pa.string()),
        ("scored_at", pa.float64()),
    ]
)
#: What a block returns to the driver: the scores row, or only ``path`` and ``error``.
RESULT_SCHEMA = SCHEMA.append(pa.field("error", pa.string())).append(pa.field("map", pa.binary()))
FAILURES_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])


@dataclass
class PredictRun:
    """What a distributed ``predict`` did. ``results``: the folder of this model's results."""

    results: str
    n_inputs: int
    n_scored: int
    n_skipped: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """The final line: images, seconds, images/s, failures."""
        rate = self.n_scored / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {self.n_skipped} already scored (skipped)" if self.n_skipped else ""
        return (
            f"scored {self.n_scored} images in {self.seconds:.1f} s ({rate:.2f} images/s), "
            f"{len(self.failures)} failures{skipped}; results in {self.results}"
        )


def results_dir(dest: str | os.PathLike, sha256: str) -> str:
    """Where the results of the model with this content checksum go under ``dest``."""
    return f"{str(dest).rstrip('/')}/model-{sha256[:16]}"


def scored_paths(results: str) -> list[str]:
    """Inputs with a committed row in ``results/scores`` (in part order; a retried block rewrote its part)."""
    fs, base = _resolve(results)
    if fs.get_file_info(f"{base}/scores").type != pafs.FileType.Directory:
        return []
    return pq.ParquetDataset(f"{base}/scores", filesystem=fs).read(columns=["path"]).column("path").to_pylist()


def read_scores(results: str) -> pa.Table:
    """The scores table of a results folder, sorted by path."""
    fs, base = _resolve(results)
    return pq.ParquetDataset(f"{base}/scores", filesystem=fs, schema=SCHEMA).read().sort_by("path")


def _prepare_dest(dest: str, results: str, overwrite: bool) -> None:
    """``dest`` must be new, empty or a results folder of ours; --overwrite drops this model's results only."""
    fs, base = _resolve(dest)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise SpadeError(f"{dest}: exists and is a file, not a results folder")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(base))
        if entries and not any(e.base_name == MARKER for e in entries):
            raise SpadeError(f"{dest}: folder exists and is not a spade-ad results folder (no {MARKER})")
        if overwrite:
            _, rbase = _resolve(results)
            if fs.get_file_info(rbase).type == pafs.FileType.Directory:
                fs.delete_dir(rbase)
    _put(dest, MARKER, json.dumps({"format": "spade-ad-results", "version": 1}).encode())


def predict(
    model_path: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    dest: str | os.PathLike | None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    weights: str | None = None,
    overlays: bool = True,
    segment_above: float | None = None,
    overwrite: bool = False,
    block_size: int = BLOCK_SIZE,
    progress: bool = True,
    return_maps: bool = False,
    recursive: bool = False,
    runtime: str | None = None,
    export_dir: str | os.PathLike | None = None,
) -> PredictRun:
    """Score ``sources`` with the model file on a Ray cluster; resumable, fault tolerant.

    ``recursive``: walk sub-folders of folder sources, as ``spade-ad predict`` does by default.
    ``runtime`` / ``export_dir``: the backbone runtime each worker uses (None: the model's default), as
    in :meth:`SPADE.load`; the export folder must be readable by every worker.

    With ``dest`` the results are written under :func:`results_dir` and inputs already scored there by
    the same model are skipped. ``dest=None`` writes nothing and returns every row (with the map as
    bytes when ``return_maps``) in :attr:`PredictRun.rows`, as :class:`RaySPADE` uses it.
    """
    model_path = str(model_path)
    export = None if export_dir is None else str(export_dir)
    # Refuse a bad model (or a mismatched export) before any work.
    model = SPADE.load(model_path, weights=weights, mmap=True, runtime=runtime, export_dir=export)
    sha = model_sha256(model_path)
    names = expand_sources(sources, recursive=recursive)
    stems = unique_stems(names)
    results = results_dir(dest, sha) if dest is not None else ""
    done: set[str] = set()
    if dest is not None:
        _prepare_dest(str(dest), results, overwrite)
        _put(results, "model.json", json.dumps({"model": model_path, "config": model.get_config()}).encode())
        done = set(scored_paths(results))
    todo = [(n, s) for n, s in zip(names, stems, strict=True) if n not in done]
    t0 = time.perf_counter()
    run = PredictRun(results, len(names), 0, len(names) - len(todo), 0.0)
    if todo:
        connect(address)
        kwargs = {
            "model_path": model_path,
            "sha256": sha,
            "weights": weights,
            "out": results or None,
            "overlays": overlays,
            "segment_above": segment_above,
            "return_maps": return_maps,
            "cpus": cpus_per_worker,
            "runtime": runtime,
            "export_dir": export,
        }
        rows = _blocks([n for n, _ in todo], [s for _, s in todo], block_size)
        bar = tqdm(total=len(names), initial=run.n_skipped, desc="predict", unit="img", disable=not progress)
        try:
            for out in _run(rows, Scorer, kwargs, _workers(num_workers, cpus_per_worker), cpus_per_worker):
                for rec in out.to_pylist():
                    if rec["error"] is not None:
                        run.failures.append((rec["path"], rec["error"]))
                    else:
                        run.n_scored += 1
                    if dest is None:
                        run.rows.append(rec)
                bar.update(out.num_rows)
        except Exception as exc:  # noqa: BLE001 -- Ray wraps a worker's error in its own types
            raise _unwrap(exc) from None
        finally:
            bar.close()
    run.seconds = time.perf_counter() - t0
    if dest is not None:
        # Every earlier failure was retried in this run, so this run's list is the complete one.
        table = pa.Table.from_pylist([{"path": p, "error": e} for p, e in run.failures], FAILURES_SCHEMA)
        _put(results, "failures.parquet", _parquet_bytes(table))
    return run


# ------------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------------
class Extractor:
    """Ray actor: a model with the fit's settings that extracts the features of blocks of training images."""

    def __init__(self, params: dict[str, Any], cpus: float) -> None:
        _set_threads(cpus)
        self.model = SPADE(**params)
        self.dtype = BANK_DTYPES[self.model.bank_dtype]

    def __call__(self, batch: pa.Table) -> pa.Table:
        row = batch.to_pylist()[0]
        images = [read_input(p, self.model.max_pixels) for p in row["paths"]]  # bad training data stops the fit
        g, levels = self.model.extract(images)
        cols = {"start": [row["start"]], "n": [len(images)], "global": [g.numpy().tobytes()]}
        for i, lv in enumerate(levels):
            cols[f"level{i}"] = [_tensor_bytes(lv.permute(0, 2, 3, 1).to(self.dtype))]
        cols["weights_sha256"] = [self.model._get_backbone().weights_sha256]
        shapes = {
            "global": list(g.shape[1:]),
            **{f"level{i}": list(lv.permute(0, 2, 3, 1).shape[1:]) for i, lv in enumerate(levels)},
        }
        cols["shapes"] = [json.dumps(shapes)]
        return pa.table(cols)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.float16 else t).numpy().tobytes()


def fit(
    train: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    params: dict[str, Any] | None = None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1,
    block_size: int = BLOCK_SIZE,
    progress: bool = True,
) -> SPADE:
    """Fit ``SPADE(**params)`` on ``train`` with feature extraction on Ray workers; write the model file.

    The bank is assembled in training-file order and streamed to ``out`` (the driver never holds the pixel
    features); the file equals what ``SPADE(**params).fit(train).save(out)`` writes, up to floating-point
    noise of different thread counts. Returns the model loaded from ``out`` (memory-mapped).
    """
    params = dict(params or {})
    model = SPADE(**params)
    model._validate()
    if model.gallery != "knn":
        # The gallery of every image (and its coreset) is chosen from the whole bank at once, which the
        # streamed fit never holds.
        raise SpadeError(f"gallery={model.gallery!r} is not available with the Ray engine yet; fit it locally")
    names = expand_sources([train] if isinstance(train, (str, os.PathLike)) else train)
    n, dtype = len(names), BANK_DTYPES[model.bank_dtype]
    connect(address)
    writer: StreamingModelFile | None = None
    global_ = torch.empty(0)
    shas: set[str] = set()
    try:
        rows = _blocks(names, names, block_size)
        kwargs = {"params": params, "cpus": cpus_per_worker}
        with tqdm(total=n, desc="fit", unit="img", disable=not progress) as bar:
            for batch in _run(rows, Extractor, kwargs, _workers(num_workers, cpus_per_worker), cpus_per_worker):
                for rec in batch.to_pylist():
                    start, k = rec["start"], rec["n"]
                    row_shapes = json.loads(rec["shapes"])
                    if writer is None:  # the first block tells the feature sizes
                        shapes = {
                            name: ((n, *shp), torch.float32 if name == "global" else dtype)
                            for name, shp in row_shapes.items()
                        }
                        writer = StreamingModelFile(out, shapes)
                        global_ = torch.empty((n, *row_shapes["global"]))
                    for name, shp in row_shapes.items():
                        dt = torch.float32 if name == "global" else dtype
                        raw = np.frombuffer(rec[name], np.int16 if dt == torch.float16 else np.float32)
                        t = torch.from_numpy(raw.copy()).view(dt).reshape(k, *shp)
                        if name == "global":
                            global_[start : start + k] = t
                        writer.write(name, start, t)
                    shas.add(rec["weights_sha256"])
                    bar.update(k)
        if len(shas) != 1:
            raise SpadeError(f"workers extracted with different {model.backbone} weights (sha256 {sorted(shas)})")
        assert writer is not None
        model.fit_features(FeatureBank(global_, [], names), shas.pop())
        writer.finish(model.get_config(), names)
    except Exception as exc:  # noqa: BLE001 -- Ray wraps a worker's error in its own types
        if writer is not None:
            writer.close()
        raise _unwrap(exc) from None
    return SPADE.load(out, mmap=True)


# ------------------------------------------------------------------------------------------------
# evaluate: a SPADE whose fit and predict run on Ray, for evaluate.evaluate_dataset
# ------------------------------------------------------------------------------------------------
class RaySPADE(SPADE):
    """A :class:`SPADE` whose ``fit`` and ``predict`` run on a Ray cluster (file inputs only).

    ``fit`` writes the model file to a scratch folder (``workdir``, default a new temp folder) and keeps
    the bank memory-mapped from it, so everything that takes a SPADE (``evaluate_dataset``, thresholds,
    reports) works unchanged.
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        workdir: str | os.PathLike | None = None,
        **params: Any,
    ) -> None:
        super().__init__(**params)
        self._address, self._num_workers = address, num_workers
        self._workdir = workdir
        self._params = params

    def fit(self, train: Any, calibrate: float | None = None) -> SPADE:
        if calibrate is not None:
            return super().fit(train, calibrate=calibrate)  # splits, calls self.fit and self.calibrate
        work = Path(self._workdir or tempfile.mkdtemp(prefix="spade-ray-"))
        if self._workdir is None:  # the bank stays memory-mapped from the scratch file while the model lives
            weakref.finalize(self, shutil.rmtree, work, True)
        self._model_file = work / f"model-{time.time_ns()}.spade"
        params = {k: v for k, v in self._params.items() if k != "progress"}
        fitted = fit(
            train,
            self._model_file,
            params,
            address=self._address,
            num_workers=self._num_workers,
            progress=self.progress,
        )
        return self.fit_features(fitted.bank_, fitted.weights_sha256_)

    def predict(self, images: Any, segment_above: float | None = None) -> Prediction:
        self._check_fitted()
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        if any(isinstance(p, np.ndarray) for p in paths):
            raise SpadeError("RaySPADE.predict scores files (paths or URIs), not arrays")
        run = predict(
            self._model_file,
            paths,
            None,
            segment_above=segment_above,
            progress=self.progress,
            return_maps=True,
            weights=None if self.weights is None else str(self.weights),
            address=self._address,
            num_workers=self._num_workers,
        )
        if run.failures:
            raise SpadeError(f"{len(run.failures)} images could not be scored: {run.failures[0][1]}")
        names = expand_sources(paths)
        by_path = {r["path"]: r for r in run.rows}
        rows = [by_path[n] for n in names]
        crop = self.crop_size
        maps = np.stack([np.frombuffer(r["map"], np.float32).reshape(crop, crop) for r in rows])
        scores = np.array([r["image_score"] for r in rows], np.float64)
        flagged = None if self.thresholds_ is None else scores >= self.thresholds_.image
        return Prediction(
            scores,
            maps,
            np.array([r["neighbors"] for r in rows], np.int64),
            names,
            flagged,
            np.array([r["segmented"] for r in rows], bool),
            self.valid_regions(names),
            np.array([r["neighbor_sq_distances"] for r in rows], np.float64),
        )


def evaluate_factory(make_params: Callable[[], dict[str, Any]], **ray_options: Any) -> Callable[[], RaySPADE]:
    """A ``make_model`` for :func:`spade_ad.evaluate.evaluate_dataset` that fits and predicts on Ray."""
    return lambda: RaySPADE(**make_params(), **ray_options)
