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
from typing import Any

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
from .evaluate import evaluate_dataset, find_categories, set_thresholds_from_validation, summarise
from .model import IMAGE_SCORES, SPADE, Explanation
from .output import check_can_write, staged_dir, unique_stems, write_csv, write_json
from .presets import PRESETS
from .viz import heatmap_overlay, rebuild_from_matches


def _parse_levels(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected a comma-separated list such as 1,2,3") from None
    if not levels or any(x not in (1, 2, 3) for x in levels):
        raise click.BadParameter(f"{value!r}: levels are 1 (stride 4), 2 (stride 8), 3 (stride 16)")
    return levels


def model_options(f: Callable) -> Callable:
    """The hyper-parameters shared by ``fit`` and ``evaluate`` (paper defaults)."""
    opts = [
        click.option(
            "--preset",
            type=click.Choice(list(PRESETS)),
            default="paper",
            show_default=True,
            help="Named settings (see README); options given explicitly override it.",
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
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Average pixel features over odd PxP neighbourhoods before matching (1 = paper).",
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
    for opt in reversed(opts):
        f = opt(f)
    return f


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
    "joint_levels",
    "gallery",
    "coreset",
    "coreset_seed",
)


#: SPADE parameters whose command-line option has another name (``--gallery`` is the report's).
_CLI_NAMES = {"gallery": "pixel_gallery"}


def _make_model(opts: dict[str, Any], progress: bool = True) -> SPADE:
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
    return SPADE.from_preset(opts["preset"], progress=progress, **overrides)


def _handle_errors(f: Callable) -> Callable:
    """Turn our errors into one line on stderr and exit code 2; show warnings as one line too."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(message, category, filename, lineno, file=None, line=None):
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
@_handle_errors
def fit(
    data: Path, out: Path, overwrite: bool, calibrate: float | None, threshold_from: Path | None, **opts: Any
) -> None:
    """Fit on DATA: a folder of normal images, or an MVTec category folder (its train/good is used)."""
    check_can_write(out, overwrite)
    if calibrate is not None and threshold_from is not None:
        raise click.UsageError("use either --calibrate or --threshold-from, not both")
    validation = load_labelled(threshold_from) if threshold_from is not None else None
    train_dir = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    t0 = time.perf_counter()
    model = _make_model(opts).fit(train_dir, calibrate=calibrate)
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
    "--mmap/--no-mmap",
    default=True,
    show_default=True,
    help="Leave the pixel features in the model file and read only each image's K neighbours.",
)
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
    mmap: bool,
) -> None:
    """Score IMAGES (files and/or folders) with MODEL.

    Writes OUT/scores.csv (path,image_score[,is_anomalous][,segmented]), OUT/maps/<stem>.npy (float32
    anomaly map), OUT/overlays/<stem>.png (heatmap over the cropped image; one colour scale for the
    whole run) and, when the model has thresholds, OUT/masks/<stem>.png (pixels at or above the pixel
    threshold). With --segment-above, maps, overlays and masks exist only for segmented images.
    When two inputs share a file stem, every output is named <parent folder>_<stem>.
    """
    check_can_write(out, overwrite)
    model = SPADE.load(model_path, weights=weights, progress=True, mmap=mmap)
    paths = expand_inputs(images)
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
            tqdm(list(zip(paths, stems, pred.anomaly_maps)), desc="writing", unit="img", leave=False)
        ):
            if not segmented[i]:
                continue
            np.save(tmp / "maps" / f"{stem}.npy", amap)
            img = None
            if not no_overlays or explain:
                img = load_preprocessed(path, str(path), model.image_size, model.crop_size, model.max_pixels)
            if not no_overlays:
                Image.fromarray(heatmap_overlay(img, amap, vmin, vmax)).save(tmp / "overlays" / f"{stem}.png")
            if th is not None and th.pixel is not None:
                Image.fromarray(((amap >= th.pixel) * 255).astype(np.uint8), "L").save(tmp / "masks" / f"{stem}.png")
            if explanations is not None:
                _write_explanation(tmp / "explain", stem, explanations[i], img, model)
        header = ["path", "image_score"] + (["is_anomalous"] if th is not None else [])
        header += ["segmented"] if segment_above is not None else []
        rows = []
        for i, (p, s) in enumerate(zip(paths, pred.image_scores)):
            # 10 significant digits: enough to compare scores to 1e-9 relative across tools.
            row = [str(p), f"{s:.10g}"]
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
            for r, (j, d) in enumerate(zip(e.neighbors, e.neighbor_sq_distances))
        ],
    )
    rebuilt = rebuild_from_matches(e, model.train_image)
    pair = np.concatenate([img, np.ones((3, img.shape[1], 4), np.float32), rebuilt], axis=2)
    Image.fromarray((pair.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)).save(folder / f"{stem}.png")


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:.4f}"


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
    json_path: Path | None,
    report_dir: Path | None,
    gallery: int,
    overwrite: bool,
    calibrate: float | None,
    threshold_from: Path | None,
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
        datasets = [load_folders(train_dir, test_good, test_anomalous, masks, name=train_dir.name or "folders")]
    else:
        if root is None or not categories:
            raise click.UsageError("give ROOT and --category (or --train/--test-good/--test-anomalous)")
        cats = list(categories)
        if "all" in cats:
            cats = find_categories(root)
            if not cats:
                raise SpadeError(f"{root}: no category folders (with train/good) found")
        datasets = [load_mvtec(root, c) for c in cats]  # validate every layout before any heavy work
    if calibrate is not None and threshold_from is not None:
        raise click.UsageError("use either --calibrate or --threshold-from, not both")
    validation = load_labelled(threshold_from) if threshold_from is not None else None
    results = []
    for ds in datasets:
        click.echo(f"{ds.name}: {len(ds.train)} train, {len(ds.test)} test images", err=True)
        results.append(
            evaluate_dataset(
                ds,
                lambda: _make_model(opts),
                log=lambda s: click.echo(s, err=True),
                calibrate=calibrate,
                validation=validation,
            )
        )
    config = {k: v for k, v in results[0].model_config.items() if k != "n_train"}
    config.update(
        root=str(root) if root is not None else None, torch_version=torch.__version__, python=platform.python_version()
    )
    summary = summarise(results, config)
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
    if json_path is not None:
        write_json(json_path, summary)
        click.echo(f"results written to {json_path}", err=True)
    if report_dir is not None:
        from .report import write_report  # matplotlib is imported only when a report is asked for

        write_report(results, report_dir, config, overwrite=overwrite, gallery_per_category=gallery, progress=True)
        click.echo(f"report written to {report_dir / 'index.html'}", err=True)


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
@_handle_errors
def serve(
    model_path: Path, host: str, port: int, workers: int, weights: str | None, log_level: str, **settings: Any
) -> None:
    """Serve MODEL over HTTP: POST /v1/score, /v1/score/batch; GET /v1/model, /healthz, /readyz, and an
    inspection page at / (see README, "Service")."""
    from .service.server import run
    from .service.settings import ServiceSettings

    run(
        model_path,
        ServiceSettings(**settings),
        host=host,
        port=port,
        workers=workers,
        weights=weights,
        log_level=log_level,
    )


if __name__ == "__main__":  # pragma: no cover
    main()
