"""The ``spade-ad`` command: argument parsing, progress and exit codes; the work is in the library.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input or usage (one-line message).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .backbones import available_backbones
from .bank import atomic_write
from .data import expand_inputs, load_folders, load_labelled, load_mvtec, load_preprocessed
from .errors import SpadeError
from .evaluate import CategoryResult, evaluate_dataset, find_categories, set_thresholds_from_validation, summarise
from .model import IMAGE_SCORES, SPADE, Explanation
from .output import check_can_write, staged_dir, unique_stems, write_csv, write_json
from .presets import PRESETS
from .runtimes import DEVICES, EXPORT_FORMATS, RUNTIMES
from .viz import heatmap_overlay, rebuild_from_matches


def _comma_ints(value: str, expected: str) -> tuple[int, ...]:
    """``"3,5"`` -> (3, 5); anything else is a usage error saying what was expected."""
    try:
        return tuple(int(x) for x in str(value).split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected {expected}") from None


def _parse_levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    levels = _comma_ints(value, "a comma-separated list such as 1,2,3")
    if not levels or any(x not in (1, 2, 3) for x in levels):
        raise click.BadParameter(f"{value!r}: levels are 1 (stride 4), 2 (stride 8), 3 (stride 16)")
    return levels


def _parse_patch_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | tuple[int, ...] | None:
    """``5`` (every level) or ``3,5`` (one odd size per level, in --levels' order)."""
    if value is None:
        return None
    sizes = _comma_ints(value, "an odd size such as 5, or one per level such as 3,5")
    if not sizes or any(p < 1 or p % 2 == 0 for p in sizes):
        raise click.BadParameter(f"{value!r}: sizes must be odd positive integers")
    return sizes[0] if len(sizes) == 1 else sizes


def runtime_options(model_default: bool) -> list[Callable]:
    """Where the backbone and search run (a deployment choice: results are the same to float32 rounding).

    ``model_default``: loading a saved model, where no --runtime means the runtime saved with it.
    """
    return [
        click.option(
            "--runtime",
            type=click.Choice(list(RUNTIMES)),
            default=None if model_default else "torch",
            show_default=not model_default,
            help="Backbone runtime" + (" (default: the one saved with the model)." if model_default else "."),
        ),
        click.option(
            "--export-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder from 'spade-ad export' for --runtime onnxruntime/openvino (default: traced at start).",
        ),
        click.option(
            "--device",
            type=click.Choice(list(DEVICES)),
            default="cpu",
            show_default=True,
            help="cpu, cuda, or auto (a GPU when there is one) for extraction and the pixel search.",
        ),
    ]


def model_options(f: Callable) -> Callable:
    """The hyper-parameters shared by ``fit`` and ``evaluate`` (paper defaults)."""
    opts = [
        click.option(
            "--preset",
            type=click.Choice(list(PRESETS)),
            default="paper",
            show_default=True,
            help="Named settings (see docs/accuracy.md); options given explicitly override it.",
        ),
        click.option(
            "--backbone",
            type=click.Choice(available_backbones()),
            default="efficientnet_lite0",
            show_default=True,
            help="Feature extractor (efficientnet_lite0 is embedded).",
        ),
        click.option(
            "--weights",
            default=None,
            help="Backbone weights file (default: embedded package / torch hub cache); 'random' for tests.",
        ),
        click.option(
            "--k",
            "k",
            type=click.IntRange(min=1),
            default=50,
            show_default=True,
            help="Nearest normal images (image score and pixel gallery).",
        ),
        click.option(
            "--kappa",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Nearest gallery features per pixel.",
        ),
        click.option(
            "--levels",
            default="1,2,3",
            callback=_parse_levels,
            show_default=True,
            help="Pyramid levels: 1=stride 4, 2=stride 8, 3=stride 16.",
        ),
        click.option(
            "--sigma",
            type=click.FloatRange(min=0),
            default=4.0,
            show_default=True,
            help="Gaussian smoothing of the anomaly map (0 = none).",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=256,
            show_default=True,
            help="Resize to this square before cropping.",
        ),
        click.option(
            "--crop-size",
            type=click.IntRange(min=1),
            default=224,
            show_default=True,
            help="Centre crop; anomaly maps have this size.",
        ),
        click.option(
            "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per backbone batch."
        ),
        click.option(
            "--image-score",
            type=click.Choice(list(IMAGE_SCORES)),
            default="knn",
            show_default=True,
            help="knn (paper), map_max (maximum of the anomaly map), or knn*map_max.",
        ),
        click.option(
            "--image-k",
            type=click.IntRange(min=1),
            default=None,
            help="Nearest normal images for the kNN image score (default: --k).",
        ),
        click.option(
            "--patch-size",
            default="1",
            show_default=True,
            callback=_parse_patch_size,
            help="Average pixel features over odd PxP neighbourhoods before matching (1 = paper); "
            "one size per level as 3,5.",
        ),
        click.option(
            "--precision",
            type=click.Choice(["fp32", "bf16"]),
            default="fp32",
            show_default=True,
            help="Pixel search products: fp32 (exact) or bf16 (opt-in, faster on wide features).",
        ),
        click.option(
            "--window",
            type=click.IntRange(min=0),
            default=None,
            help="Match each pixel only within +-R gallery positions (opt-in; aligned objects only).",
        ),
        click.option(
            "--geometry",
            type=click.Choice(["squash", "pad"]),
            default="squash",
            show_default=True,
            help="squash to a square (paper) or keep the aspect ratio and pad (metrics on the image only).",
        ),
        *runtime_options(model_default=False),
        click.option(
            "--bank-dtype",
            type=click.Choice(["float32", "float16"]),
            default="float32",
            show_default=True,
            help="Storage of the pixel features in the model (float16 halves it).",
        ),
        click.option(
            "--joint-levels/--separate-levels",
            default=False,
            show_default=True,
            help="Concatenate the levels on the finest grid and match them together (opt-in, as PatchCore).",
        ),
        click.option(
            "--pixel-gallery",
            type=click.Choice(["knn", "all"]),
            default="knn",
            show_default=True,
            help="Pixel gallery: the k nearest images (paper) or every training image (opt-in, as PatchCore).",
        ),
        click.option(
            "--coreset",
            type=click.FloatRange(0, 1, min_open=True),
            default=None,
            help="With --gallery all: keep this fraction of the positions (greedy k-center, seeded).",
        ),
        click.option(
            "--coreset-seed", type=int, default=0, show_default=True, help="Seed of the coreset's first position."
        ),
    ]
    return _with_options(opts)(f)


def _with_options(opts: list[Callable]) -> Callable[[Callable], Callable]:
    """Apply click options in the order listed (as if written above the function top to bottom)."""

    def apply(f: Callable) -> Callable:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return apply


def threshold_options(f: Callable) -> Callable:
    """How to choose decision thresholds, never from test data (shared by fit and evaluate)."""
    f = click.option(
        "--threshold-from",
        "threshold_from",
        type=click.Path(path_type=Path),
        default=None,
        help="Labelled validation folder (good/, <defect>/, ground_truth/<defect>/): F1-optimal thresholds.",
    )(f)
    f = click.option(
        "--calibrate",
        type=click.FloatRange(0, 1, min_open=True, max_open=True),
        default=None,
        help="Hold out this fraction of the normal training images and set thresholds from their "
        "scores (0.99 / 0.999 quantiles of image / pixel scores).",
    )(f)
    return f


def engine_options(f: Callable) -> Callable:
    """Where the work runs: this process (default) or a Ray cluster (``pip install "spade-ad[ray]"``)."""
    f = click.option(
        "--num-workers",
        type=click.IntRange(min=1),
        default=None,
        help="With --engine ray: model replicas (default: one per CPU of the cluster).",
    )(f)
    f = click.option(
        "--address",
        default=None,
        help="With --engine ray: the cluster to join (e.g. 'auto' or host:6379; default: start a local one).",
    )(f)
    return click.option(
        "--engine",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="Run in this process, or across a Ray cluster (resumable; see docs/scale-out.md).",
    )(f)


_MODEL_KEYS = (
    "backbone",
    "weights",
    "k",
    "kappa",
    "levels",
    "sigma",
    "image_size",
    "crop_size",
    "batch_size",
    "image_score",
    "image_k",
    "patch_size",
    "precision",
    "window",
    "bank_dtype",
    "geometry",
    "runtime",
    "export_dir",
    "device",
    "joint_levels",
    "gallery",
    "coreset",
    "coreset_seed",
)


#: SPADE parameters whose command-line option has another name (``--gallery`` is the report's).
_CLI_NAMES = {"gallery": "pixel_gallery"}


def _make_model(opts: dict[str, Any], progress: bool = True, cls: type[SPADE] = SPADE, **extra: Any) -> SPADE:
    """The model the options describe: the --preset's settings, overridden by options given explicitly."""
    preset = PRESETS[opts["preset"]]
    ctx = click.get_current_context(silent=True)

    def given(key: str) -> bool:
        return ctx is None or ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT

    overrides = {
        key: opts[_CLI_NAMES.get(key, key)]
        for key in _MODEL_KEYS
        if key not in preset or given(_CLI_NAMES.get(key, key))
    }
    return cls.from_preset(opts["preset"], progress=progress, **overrides, **extra)


def _handle_errors(f: Callable) -> Callable:
    """Turn our errors into one line on stderr and exit code 2; show warnings as one line too."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            click.echo(f"warning: {message}", err=True)

        old = warnings.showwarning
        warnings.showwarning = show
        try:
            return f(*args, **kwargs)
        except SpadeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            warnings.showwarning = old

    return wrapper


def _set_threads() -> None:
    """Use every core this process may run on (torch's default counts physical cores of the whole
    machine, which is wrong in containers and under taskset), unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spade-ad")
def main() -> None:
    """SPADE anomaly detection and segmentation (Cohen & Hoshen, 2020).

    Fit on normal images, then score and outline defects on new ones.
    """
    _set_threads()


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@model_options
@threshold_options
@engine_options
@_handle_errors
def fit(
    data: Path,
    out: Path,
    overwrite: bool,
    calibrate: float | None,
    threshold_from: Path | None,
    engine: str,
    address: str | None,
    num_workers: int | None,
    **opts: Any,
) -> None:
    """Fit on DATA: a folder of normal images, or an MVTec category folder (its train/good is used)."""
    check_can_write(out, overwrite)
    if calibrate is not None and threshold_from is not None:
        raise click.UsageError("use either --calibrate or --threshold-from, not both")
    validation = load_labelled(threshold_from) if threshold_from is not None else None
    train_dir = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    t0 = time.perf_counter()
    if engine == "ray":
        from . import distributed

        if calibrate is None and validation is None:  # stream the bank straight into the model file
            params = {k: v for k, v in vars(_make_model(opts, progress=False)).items() if not k.startswith("_")}
            model = distributed.fit(train_dir, out, params, address=address, num_workers=num_workers)
            click.echo(
                f"fitted on {len(model.train_paths_)} images from {train_dir} in {time.perf_counter() - t0:.1f} s "
                f"on Ray; model written to {out}"
            )
            return
        model = _make_model(opts, cls=distributed.RaySPADE, address=address, num_workers=num_workers)
    else:
        model = _make_model(opts)
    model = model.fit(train_dir, calibrate=calibrate)
    if validation is not None:
        set_thresholds_from_validation(model, validation)
    model.save(out)
    click.echo(
        f"fitted on {len(model.train_paths_)} images from {train_dir} in {time.perf_counter() - t0:.1f} s; "
        f"model written to {out}"
    )
    if model.thresholds_ is not None:
        th = model.thresholds_
        pixel = "none" if th.pixel is None else f"{th.pixel:.6g}"
        click.echo(f"thresholds: image {th.image:.6g}, pixel {pixel} ({th.source})")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--weights", default=None, help="Backbone weights file, if not where it was at fit time.")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay PNGs (faster).")
@click.option(
    "--explain",
    is_flag=True,
    help="Also write explain/<stem>_neighbors.csv and explain/<stem>.png (image | rebuilt from matches).",
)
@click.option(
    "--segment-above",
    type=float,
    default=None,
    help="Run the pixel stage only for images whose kNN image score exceeds this value.",
)
@click.option(
    "--recursive/--no-recursive",
    default=True,
    show_default=True,
    help="Walk sub-folders of folder inputs (a folder per day, an MVTec test/ folder).",
)
@click.option(
    "--mmap/--no-mmap",
    default=True,
    show_default=True,
    help="Leave the pixel features in the model file and read only each image's K neighbours.",
)
@engine_options
@_with_options(runtime_options(model_default=True))
@_handle_errors
def predict(
    model_path: Path,
    images: tuple[Path, ...],
    out: Path,
    overwrite: bool,
    weights: str | None,
    no_overlays: bool,
    explain: bool,
    segment_above: float | None,
    recursive: bool,
    mmap: bool,
    engine: str,
    address: str | None,
    num_workers: int | None,
    **where: Any,
) -> None:
    """Score IMAGES (files and/or folders) with MODEL.

    Writes OUT/scores.csv (path,image_score[,is_anomalous][,segmented]), OUT/maps/<stem>.npy (float32
    anomaly map), OUT/overlays/<stem>.png (heatmap over the cropped image; one colour scale for the
    whole run) and, when the model has thresholds, OUT/masks/<stem>.png (pixels at or above the pixel
    threshold). With --segment-above, maps, overlays and masks exist only for segmented images.
    Folders are walked with their sub-folders (--no-recursive: only the files directly inside).
    When two inputs share a file stem, every output is named <parent folder>_<stem> (more parent
    folders when those still collide).

    With --engine ray: IMAGES may also be URIs (s3://...), OUT/model-<sha>/scores is a Parquet dataset,
    a re-run skips inputs already scored by the same model, unreadable inputs are listed in
    OUT/model-<sha>/failures.parquet (exit code 2), see docs/scale-out.md.
    """
    if engine == "ray":
        from . import distributed

        if explain or not mmap:
            raise click.UsageError("--explain and --no-mmap are not available with --engine ray")
        if where.get("device") not in (None, "cpu"):
            raise click.UsageError("--device is not available with --engine ray: its workers run on the CPU")
        run = distributed.predict(
            model_path,
            [str(p) for p in images],
            str(out),
            address=address,
            num_workers=num_workers,
            weights=weights,
            overlays=not no_overlays,
            segment_above=segment_above,
            overwrite=overwrite,
            recursive=recursive,
            runtime=where.get("runtime"),
            export_dir=where.get("export_dir"),
        )
        for _, error in run.failures:
            click.echo(f"failed: {error}", err=True)
        click.echo(run.summary())
        sys.exit(2 if run.failures else 0)
    check_can_write(out, overwrite)
    model = SPADE.load(model_path, weights=weights, progress=True, mmap=mmap, **where)
    paths = expand_inputs(images, recursive=recursive)
    stems = unique_stems([str(p) for p in paths])
    t0 = time.perf_counter()
    pred = model.predict(paths, segment_above=segment_above)
    seconds = time.perf_counter() - t0
    segmented = pred.segmented if pred.segmented is not None else np.ones(len(paths), bool)
    th = model.thresholds_
    explanations = model.explain(paths) if explain else None
    with staged_dir(out, overwrite) as tmp:
        (tmp / "maps").mkdir()
        if not no_overlays:
            (tmp / "overlays").mkdir()
        if th is not None and th.pixel is not None:
            (tmp / "masks").mkdir()
        if explain:
            (tmp / "explain").mkdir()
        seg_maps = pred.anomaly_maps[segmented]
        vmin, vmax = (float(seg_maps.min()), float(seg_maps.max())) if len(seg_maps) else (0.0, 1.0)
        for i, (path, stem, amap) in enumerate(
            tqdm(list(zip(paths, stems, pred.anomaly_maps, strict=True)), desc="writing", unit="img", leave=False)
        ):
            if not segmented[i]:
                continue
            np.save(tmp / "maps" / f"{stem}.npy", amap)
            img = None  # loaded only when an overlay or an explanation needs it
            if not no_overlays:
                img = _write_overlay(tmp / "overlays" / f"{stem}.png", path, amap, model, vmin, vmax)
            elif explain:
                img = load_preprocessed(
                    path, str(path), model.image_size, model.crop_size, model.max_pixels, model.geometry
                )
            if th is not None and th.pixel is not None:
                Image.fromarray(((amap >= th.pixel) * 255).astype(np.uint8), "L").save(tmp / "masks" / f"{stem}.png")
            if img is not None and explanations is not None:
                _write_explanation(tmp / "explain", stem, explanations[i], img, model)
        header = ["path", "image_score"] + (["is_anomalous"] if th is not None else [])
        header += ["segmented"] if segment_above is not None else []
        rows = []
        for i, (p, s) in enumerate(zip(paths, pred.image_scores, strict=True)):
            # 10 significant digits: enough to compare scores to 1e-9 relative across tools.
            row: list[str | int] = [str(p), f"{s:.10g}"]
            if pred.is_anomalous is not None:
                row.append(int(pred.is_anomalous[i]))
            if segment_above is not None:
                row.append(int(segmented[i]))
            rows.append(row)
        write_csv(tmp / "scores.csv", header, rows)
    n_seg = int(segmented.sum())
    seg_note = f", {n_seg} segmented (score > {segment_above:g})" if segment_above is not None else ""
    click.echo(
        f"scored {len(paths)} images in {seconds:.1f} s ({seconds / max(1, len(paths)):.3f} s per image)"
        f"{seg_note}; results in {out}"
    )


def _write_explanation(folder: Path, stem: str, e: Explanation, img: np.ndarray, model: SPADE) -> None:
    """Neighbours CSV and the correspondence picture (image | rebuilt from matched normal patches)."""
    write_csv(
        folder / f"{stem}_neighbors.csv",
        ["rank", "train_index", "train_path", "squared_distance"],
        [
            [r + 1, int(j), model.train_paths_[j], f"{d:.6g}"]
            for r, (j, d) in enumerate(zip(e.neighbors, e.neighbor_sq_distances, strict=True))
        ],
    )
    rebuilt = rebuild_from_matches(e, model.train_image)
    pair = np.concatenate([img, np.ones((3, img.shape[1], 4), np.float32), rebuilt], axis=2)
    Image.fromarray((pair.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(folder / f"{stem}.png")


#: Folder names that say what a folder holds rather than which product it is.
_GENERIC_FOLDERS = frozenset({"train", "good", "normal", "ok", "images", "test", "data"})


def _folders_name(train_dir: Path) -> str:
    """A run's name from its training folder: ``parts/screw/train/good`` -> ``screw``."""
    for part in reversed(train_dir.resolve().parts[1:]):
        if part.lower() not in _GENERIC_FOLDERS:
            return part
    return "folders"


def _write_overlay(path: Path, item: Path, amap: np.ndarray, model: SPADE, vmin: float, vmax: float) -> np.ndarray:
    """Heat map of ``amap`` over ``item`` as the model saw it (resized, cropped/padded) -> PNG ``path``;
    returns the preprocessed image (3, crop, crop)."""
    img = load_preprocessed(item, str(item), model.image_size, model.crop_size, model.max_pixels, model.geometry)
    Image.fromarray(heatmap_overlay(img, amap, vmin, vmax)).save(path)
    return img


def _fmt(v: float | None) -> str:
    # None: the metric is not defined here (pixel metrics of an image-level dataset without masks).
    return "n/a" if v is None else f"{v:.4f}"


def _run_config(results: list[CategoryResult], root: Path | None) -> dict[str, Any]:
    """The configuration recorded with a run's results: the model's settings and the software versions."""
    config = {k: v for k, v in results[0].model_config.items() if k != "n_train"}
    config.update(
        root=str(root) if root is not None else None, torch_version=torch.__version__, python=platform.python_version()
    )
    return config


def _print_results(results: list[CategoryResult], summary: dict[str, Any]) -> None:
    """The metrics table of ``evaluate`` and ``demo`` on stdout."""
    header = (
        f"{'category':<16} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'train':>6} {'test':>5} {'s/img':>6}"
    )
    click.echo(header)
    click.echo("-" * len(header))
    for r in results:
        click.echo(
            f"{r.category:<16} {_fmt(r.image_auroc):>11} {_fmt(r.pixel_auroc):>11} {_fmt(r.pro):>7} "
            f"{r.n_train:>6} {r.n_test:>5} {r.predict_seconds / r.n_test:>6.2f}"
        )
    for r in results:
        if r.thresholds is not None:
            click.echo(
                f"{r.category}: image F1 {_fmt(r.image_f1)}, pixel F1 {_fmt(r.pixel_f1)} at thresholds "
                f"chosen by {r.thresholds.source}"
            )
    if len(results) > 1:
        m = summary["mean"]
        click.echo(f"{'mean':<16} {_fmt(m['image_auroc']):>11} {_fmt(m['pixel_auroc']):>11} {_fmt(m['pro']):>7}")
    if any(r.pixel_auroc is None for r in results):
        click.echo("pixel AUROC and PRO are n/a where the test set has no ground-truth masks (image-level labels only)")


@main.command()
@click.argument("root", type=click.Path(path_type=Path), required=False)
@click.option("--category", "categories", multiple=True, help="Category folder under ROOT (repeatable), or 'all'.")
@click.option(
    "--train",
    "train_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Plain folders instead of ROOT: folder of normal training images.",
)
@click.option(
    "--test-good",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Plain folders: folder of normal test images (repeatable).",
)
@click.option(
    "--test-anomalous",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Plain folders: folder of anomalous test images (repeatable).",
)
@click.option(
    "--masks",
    type=click.Path(path_type=Path),
    default=None,
    help="Plain folders: masks matched to anomalous images by stem (x.png or x_mask.png).",
)
@click.option(
    "--video",
    type=click.Path(path_type=Path),
    default=None,
    help="Video frames instead of ROOT: DIR/train/<video>/, DIR/test/<video>/, DIR/test_masks/ "
    "(the paper's setting: k=1 unless --k is given).",
)
@click.option(
    "--train-frames",
    type=click.IntRange(min=1),
    default=None,
    help="With --video: subsample the training frames evenly to this many.",
)
@click.option(
    "--name",
    default=None,
    help="Plain folders: the result's name (default: the first folder above --train that is not "
    "named train/good/normal/ok).",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write an HTML report folder (index.html, summary.md, report.json, img/).",
)
@click.option(
    "--gallery",
    type=click.IntRange(min=0),
    default=24,
    show_default=True,
    help="Gallery images per category in the --report.",
)
@click.option("--overwrite", is_flag=True, help="Replace the --json file / --report folder if they exist.")
@model_options
@threshold_options
@engine_options
@_handle_errors
def evaluate(
    root: Path | None,
    categories: tuple[str, ...],
    train_dir: Path | None,
    test_good: tuple[Path, ...],
    test_anomalous: tuple[Path, ...],
    masks: Path | None,
    video: Path | None,
    train_frames: int | None,
    name: str | None,
    json_path: Path | None,
    report_dir: Path | None,
    gallery: int,
    overwrite: bool,
    calibrate: float | None,
    threshold_from: Path | None,
    engine: str,
    address: str | None,
    num_workers: int | None,
    **opts: Any,
) -> None:
    """Fit on normal images, score a labelled test set, report image AUROC, pixel AUROC and PRO.

    MVTec layout: ROOT --category C fits on ROOT/C/train/good and scores ROOT/C/test (masks from
    ROOT/C/ground_truth). Plain folders: --train DIR --test-good DIR --test-anomalous DIR [--masks DIR].
    Video frames: --video DIR [--train-frames N].
    """
    if json_path is not None:
        check_can_write(json_path, overwrite)
    if report_dir is not None:
        check_can_write(report_dir, overwrite)
    if video is not None:
        if root is not None or categories or train_dir is not None:
            raise click.UsageError("--video replaces ROOT/--category and --train")
        from .video import VIDEO_PRESET, load_video_frames

        ctx = click.get_current_context()
        for key, value in VIDEO_PRESET.items():
            if ctx.get_parameter_source(key) is click.core.ParameterSource.DEFAULT:
                opts[key] = value
        datasets = [load_video_frames(video, train_frames=train_frames)]
    elif train_dir is not None:
        if root is not None or categories:
            raise click.UsageError("give either ROOT --category C, or --train with --test-good/--test-anomalous")
        if not test_good or not test_anomalous:
            raise click.UsageError("--train needs at least one --test-good and one --test-anomalous folder")
        datasets = [load_folders(train_dir, test_good, test_anomalous, masks, name=name or _folders_name(train_dir))]
    else:
        if root is None or not categories:
            raise click.UsageError("give ROOT and --category (or --train/--test-good/--test-anomalous)")
        if name is not None:
            raise click.UsageError("--name names a plain-folders run; an MVTec run is named by its --category")
        cats = list(categories)
        if "all" in cats:
            cats = find_categories(root)
            if not cats:
                raise SpadeError(f"{root}: no category folders (with train/good) found")
        datasets = [load_mvtec(root, c) for c in cats]  # validate every layout before any heavy work
    if calibrate is not None and threshold_from is not None:
        raise click.UsageError("use either --calibrate or --threshold-from, not both")
    validation = load_labelled(threshold_from) if threshold_from is not None else None
    make_model = functools.partial(_make_model, opts)
    if engine == "ray":
        from .distributed import RaySPADE

        make_model = functools.partial(make_model, cls=RaySPADE, address=address, num_workers=num_workers)
    results = []
    for ds in datasets:
        click.echo(f"{ds.name}: {len(ds.train)} train, {len(ds.test)} test images", err=True)
        results.append(
            evaluate_dataset(
                ds,
                make_model,
                log=lambda s: click.echo(s, err=True),
                calibrate=calibrate,
                validation=validation,
            )
        )
    config = _run_config(results, root)
    summary = summarise(results, config)
    _print_results(results, summary)
    if json_path is not None:
        write_json(json_path, summary)
        click.echo(f"results written to {json_path}", err=True)
    if report_dir is not None:
        from .report import write_report  # matplotlib is imported only when a report is asked for

        write_report(results, report_dir, config, overwrite=overwrite, gallery_per_category=gallery, progress=True)
        click.echo(f"report written to {report_dir / 'index.html'}", err=True)


@main.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("spade_ad_demo"),
    show_default=True,
    help="Folder for the report, overlays, results and model.",
)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@model_options
@_handle_errors
def demo(out: Path, overwrite: bool, **opts: Any) -> None:
    """Fit on the bundled sample, score its test images, print the metrics and write a report.

    The sample (inside the package) is a subset of MVTec AD transistor at 256x256: 60 normal training
    images, 10 normal and 20 defective test images with masks (licence CC BY-NC-SA 4.0, not the code's).
    Writes OUT/report/index.html, OUT/overlays/<defect>_<stem>.png (one colour scale), OUT/results.json
    and OUT/model.spade (usable with `spade-ad predict`). Model options (--preset ...) apply as in `evaluate`.
    """
    from .datasets import load_sample, sample_path
    from .report import write_report  # matplotlib is imported only here

    check_can_write(out, overwrite)
    ds = load_sample()
    click.echo(
        f"bundled sample {sample_path() / ds.name} (MVTec AD, CC BY-NC-SA 4.0): "
        f"{len(ds.train)} train, {len(ds.test)} test images",
        err=True,
    )
    result = evaluate_dataset(ds, lambda: _make_model(opts), log=lambda s: click.echo(s, err=True))
    config = _run_config([result], sample_path())
    summary = summarise([result], config)
    _print_results([result], summary)
    pred, model = result.prediction, result.model
    paths = [t.path for t in ds.test]
    with staged_dir(out, overwrite) as tmp:
        model.save(tmp / "model.spade")
        write_json(tmp / "results.json", summary)
        (tmp / "overlays").mkdir()
        vmin, vmax = float(pred.anomaly_maps.min()), float(pred.anomaly_maps.max())
        for t, stem, amap in zip(ds.test, unique_stems([str(p) for p in paths]), pred.anomaly_maps, strict=True):
            _write_overlay(tmp / "overlays" / f"{stem}.png", t.path, amap, model, vmin, vmax)
        # 12 gallery entries (not evaluate's 24): each one runs an explanation, and the demo should stay quick.
        write_report([result], tmp / "report", config, gallery_per_category=12, progress=True)
    click.echo(f"report: {out / 'report' / 'index.html'}")


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--category", required=True, help="Category folder under ROOT (MVTec layout).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the rows as JSON.")
@click.option(
    "--markdown", "markdown_path", type=click.Path(path_type=Path), default=None, help="Write the tables as Markdown."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random galleries (K random row).")
@click.option("--overwrite", is_flag=True, help="Replace the --json / --markdown files if they exist.")
@model_options
@_handle_errors
def ablate(
    root: Path,
    category: str,
    json_path: Path | None,
    markdown_path: Path | None,
    seed: int,
    overwrite: bool,
    **opts: Any,
) -> None:
    """Ablations of the kind in paper tables 6 and 7 on one category: pyramid levels, K nearest vs K random
    gallery, k (1, 5, 10, 50) and sigma (0, 2, 4, 8) around the model options (paper defaults).

    The backbone runs once over the training and once over the test images; every row reuses those features.
    """
    from .ablate import run_ablation

    for path in (json_path, markdown_path):
        if path is not None:
            check_can_write(path, overwrite)
    ds = load_mvtec(root, category)  # validates the layout before any heavy work
    click.echo(f"{ds.name}: {len(ds.train)} train, {len(ds.test)} test images", err=True)
    result = run_ablation(ds, _make_model(opts), seed=seed, progress=True)
    click.echo(result.as_table(), nl=False)
    if json_path is not None:
        write_json(json_path, result.as_dict())
        click.echo(f"results written to {json_path}", err=True)
    if markdown_path is not None:
        text = result.as_markdown()
        atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(text))
        click.echo(f"tables written to {markdown_path}", err=True)


def _edit_options(f: Callable) -> Callable:
    """Where ``add`` / ``remove`` write the changed model, who asked, and optional re-calibration."""
    opts = [
        click.option("--out", "out", type=click.Path(path_type=Path), default=None, help="New model file to write."),
        click.option("--in-place", is_flag=True, help="Replace MODEL itself (atomically: old or new, never a mix)."),
        click.option("--overwrite", is_flag=True, help="Replace --out if it exists."),
        click.option("--by", default=None, help="Who made the change, for the history (default: your user name)."),
        click.option(
            "--recalibrate",
            "recalibrate",
            type=click.Path(path_type=Path),
            default=None,
            help="Folder of held-out normal images (not in the bank): re-set the thresholds from them afterwards.",
        ),
        click.option("--weights", default=None, help="Backbone weights file, if not where it was at fit time."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _edit_model(model_path: Path, opts: dict[str, Any], change: Callable[[SPADE, str], Any], what: str) -> None:
    """Load MODEL, apply ``change(model, by)``, optionally re-calibrate, write it to --out or in place."""
    import getpass

    out, in_place = opts["out"], opts["in_place"]
    if (out is None) == (not in_place):
        raise click.UsageError("give either --out NEW_MODEL or --in-place")
    target = model_path if in_place else out
    if not in_place:
        check_can_write(out, opts["overwrite"])
    by = opts["by"] or f"{getpass.getuser()} (cli)"
    model = SPADE.load(model_path, weights=opts["weights"], progress=True)
    before = model.version_info()["version"]
    change(model, by)
    if opts["recalibrate"] is not None:
        model.recalibrate(expand_inputs([opts["recalibrate"]]), by=by)
    model.save(target)
    info = model.version_info()
    click.echo(
        f"{what}; version {before} -> {info['version']}, {len(model.train_paths_)} training images, "
        f"bank sha256 {info['bank_sha256'][:16]}...; model written to {target}"
    )


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@_edit_options
@_handle_errors
def add(model_path: Path, images: tuple[Path, ...], **opts: Any) -> None:
    """Add normal IMAGES (files and/or folders) to MODEL's bank, as if it had been fitted with them
    last. Thresholds are kept unless --recalibrate is given."""
    paths = expand_inputs(images)
    _edit_model(model_path, opts, lambda m, by: m.add_normal(paths, by=by), f"added {len(paths)} image(s)")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--index", "indices", type=int, multiple=True, required=True, help="Training image index (repeatable).")
@_edit_options
@_handle_errors
def remove(model_path: Path, indices: tuple[int, ...], **opts: Any) -> None:
    """Remove training images from MODEL's bank by index (see `spade-ad info`; later ones move down)."""
    _edit_model(
        model_path, opts, lambda m, by: m.remove_normal(list(indices), by=by), f"removed {len(indices)} image(s)"
    )


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print configuration, version and history as JSON.")
@click.option("--files", is_flag=True, help="Also list the training images with their indices.")
@_handle_errors
def info(model_path: Path, as_json: bool, files: bool) -> None:
    """Show MODEL's settings, version, bank hash and change history (the file's checksum is verified)."""
    import json

    model = SPADE.load(model_path, mmap=True)
    cfg, ver = model.get_config(), model.version_info()
    if as_json:
        click.echo(json.dumps({**cfg, **ver, **({"train_files": model.train_paths_} if files else {})}, indent=2))
        return
    th = cfg["thresholds"]
    click.echo(f"{model_path}: {cfg['backbone']}, k={cfg['k']}, levels {cfg['levels']}, sigma {cfg['sigma']}")
    click.echo(f"training images: {cfg['n_train']}")
    pixel = "none" if th is None or th["pixel"] is None else f"{th['pixel']:.6g}"
    click.echo("thresholds: " + ("none" if th is None else f"image {th['image']:.6g}, pixel {pixel} ({th['source']})"))
    click.echo(f"version: {ver['version']}")
    click.echo(f"bank sha256: {ver['bank_sha256']}")
    click.echo("history:" if ver["history"] else "history: none recorded (written before versions existed)")
    for h in ver["history"]:
        counts = ", ".join(f"{k} {h[k]}" for k in ("n_added", "n_removed", "n_images") if k in h)
        by = f" by {h['by']}" if "by" in h else ""
        click.echo(f"  v{h['version']}  {h['time']}  {h['action']:<11} {counts}; {h['n_train']} images{by}")
    if files:
        for i, path in enumerate(model.train_paths_):
            click.echo(f"{i:>6}  {path}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (loopback by default; 0.0.0.0 exposes the service to the network).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Server processes; each loads the model and batches its own requests.",
)
@click.option("--weights", default=None, help="Backbone weights file, if not where it was at fit time.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Most images scored in one model call.",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long the model worker waits for more images before scoring a batch "
    "(0 with --max-batch 1 disables micro-batching).",
)
@click.option(
    "--queue-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Most images admitted at once; beyond that requests get 503 with Retry-After.",
)
@click.option(
    "--timeout",
    "request_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds before a request is answered 504.",
)
@click.option(
    "--max-upload-bytes",
    type=click.IntRange(min=1),
    default=16 * 1024 * 1024,
    show_default=True,
    help="Largest encoded image accepted (413 above).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=16_000_000,
    show_default=True,
    help="Largest image in pixels, checked before decoding (413 above).",
)
@click.option(
    "--max-batch-images",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Most images in one /v1/score/batch request.",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads torch may use (default: torch's choice, usually one per core).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@click.option(
    "--admin-token-file",
    type=click.Path(path_type=Path),
    default=None,
    help="File holding the admin token: enables POST /v1/normal and DELETE /v1/normal/{index}, which change "
    "MODEL in place (needs --workers 1).",
)
@click.option(
    "--audit-log",
    type=click.Path(path_type=Path),
    default=None,
    help="Append-only JSON-lines log of operator changes and refused attempts (default: MODEL.audit.jsonl).",
)
@click.option(
    "--normal-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where images added over HTTP are kept, named by sha256 (default: the folder MODEL.normal).",
)
@click.option(
    "--admin-max-per-minute",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Most images added or removed per minute; beyond that 429 with Retry-After.",
)
@_with_options(runtime_options(model_default=True))
@_handle_errors
def serve(
    model_path: Path,
    host: str,
    port: int,
    workers: int,
    weights: str | None,
    log_level: str,
    admin_token_file: Path | None,
    audit_log: Path | None,
    normal_dir: Path | None,
    admin_max_per_minute: int,
    runtime: str | None,
    export_dir: Path | None,
    device: str,
    **settings: Any,
) -> None:
    """Serve MODEL over HTTP: POST /v1/score, /v1/score/batch; GET /v1/model, /healthz, /readyz, and an
    inspection page at / (see docs/service.md). With --admin-token-file, also the operator loop
    (docs/operator-loop.md)."""
    from .service.admin import Operator
    from .service.server import run
    from .service.settings import ServiceSettings

    operator = None
    if admin_token_file is not None:
        operator = Operator.from_files(admin_token_file, model_path, audit_log, normal_dir, admin_max_per_minute)
    elif audit_log is not None or normal_dir is not None:
        raise click.UsageError("--audit-log and --normal-dir need --admin-token-file")
    run(
        model_path,
        ServiceSettings(**settings),
        host=host,
        port=port,
        workers=workers,
        weights=weights,
        log_level=log_level,
        operator=operator,
        where={"runtime": runtime, "export_dir": export_dir, "device": device},
    )


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_FORMATS)), required=True, help="onnx or openvino (IR).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--weights", default=None, help="Backbone weights file, if not where it was at fit time.")
@_handle_errors
def export(model_path: Path, fmt: str, out: Path, overwrite: bool, weights: str | None) -> None:
    """Write MODEL's frozen backbone (its pyramid levels and global pool, at its crop size) as ONNX or OpenVINO IR
    into OUT, for predict/serve --runtime onnxruntime|openvino --export-dir OUT."""
    check_can_write(out, overwrite)
    model = SPADE.load(model_path, weights=weights, runtime="torch")
    model.export(out, fmt, overwrite=overwrite)
    click.echo(f"{fmt} backbone of {model_path} ({model.backbone}, {model.crop_size} px) written to {out}")


if __name__ == "__main__":  # pragma: no cover
    main()
