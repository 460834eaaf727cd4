"""The ``spade-ad`` command: argument parsing, progress and exit codes; the work is in the library.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input or usage (one-line message).
"""

from __future__ import annotations

import functools
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
from .data import expand_inputs, load_folders, load_mvtec, load_preprocessed
from .errors import SpadeError
from .evaluate import evaluate_dataset, find_categories, summarise
from .model import SPADE
from .output import check_can_write, staged_dir, unique_stems, write_csv, write_json
from .viz import heatmap_overlay


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
        click.option("--backbone", type=click.Choice(available_backbones()), default="efficientnet_lite0",
                     show_default=True, help="Feature extractor (efficientnet_lite0 is embedded)."),
        click.option("--weights", default=None,
                     help="Backbone weights file (default: embedded package / torch hub cache); 'random' for tests."),
        click.option("--k", "k", type=click.IntRange(min=1), default=50, show_default=True,
                     help="Nearest normal images (image score and pixel gallery)."),
        click.option("--kappa", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Nearest gallery features per pixel."),
        click.option("--levels", default="1,2,3", callback=_parse_levels, show_default=True,
                     help="Pyramid levels: 1=stride 4, 2=stride 8, 3=stride 16."),
        click.option("--sigma", type=click.FloatRange(min=0), default=4.0, show_default=True,
                     help="Gaussian smoothing of the anomaly map (0 = none)."),
        click.option("--image-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Resize to this square before cropping."),
        click.option("--crop-size", type=click.IntRange(min=1), default=224, show_default=True,
                     help="Centre crop; anomaly maps have this size."),
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Images per backbone batch."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _make_model(opts: dict[str, Any], progress: bool = True) -> SPADE:
    return SPADE(
        backbone=opts["backbone"], k=opts["k"], kappa=opts["kappa"], levels=opts["levels"],
        sigma=opts["sigma"], image_size=opts["image_size"], crop_size=opts["crop_size"],
        weights=opts["weights"], batch_size=opts["batch_size"], progress=progress,
    )


def _handle_errors(f: Callable) -> Callable:
    """Turn our errors into one line on stderr and exit code 2; show warnings as one line too."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spade-ad")
def main() -> None:
    """SPADE anomaly detection and segmentation (Cohen & Hoshen, 2020).

    Fit on normal images, then score and outline defects on new ones.
    """


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Model file to write.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@model_options
@_handle_errors
def fit(data: Path, out: Path, overwrite: bool, **opts: Any) -> None:
    """Fit on DATA: a folder of normal images, or an MVTec category folder (its train/good is used)."""
    check_can_write(out, overwrite)
    train_dir = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    t0 = time.perf_counter()
    model = _make_model(opts).fit(train_dir)
    model.save(out)
    click.echo(f"fitted on {len(model.train_paths_)} images from {train_dir} in {time.perf_counter() - t0:.1f} s; "
               f"model written to {out}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--weights", default=None, help="Backbone weights file, if not where it was at fit time.")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay PNGs (faster).")
@_handle_errors
def predict(model_path: Path, images: tuple[Path, ...], out: Path, overwrite: bool, weights: str | None,
            no_overlays: bool) -> None:
    """Score IMAGES (files and/or folders) with MODEL.

    Writes OUT/scores.csv (path,image_score), OUT/maps/<stem>.npy (float32 anomaly map) and
    OUT/overlays/<stem>.png (heatmap over the cropped image; one colour scale for the whole run).
    When two inputs share a file stem, every output is named <parent folder>_<stem>.
    """
    check_can_write(out, overwrite)
    model = SPADE.load(model_path, weights=weights, progress=True)
    paths = expand_inputs(images)
    stems = unique_stems([str(p) for p in paths])
    pred = model.predict(paths)
    with staged_dir(out, overwrite) as tmp:
        (tmp / "maps").mkdir()
        if not no_overlays:
            (tmp / "overlays").mkdir()
        vmin, vmax = float(pred.anomaly_maps.min()), float(pred.anomaly_maps.max())
        for path, stem, amap in tqdm(list(zip(paths, stems, pred.anomaly_maps)), desc="writing", unit="img",
                                     leave=False):
            np.save(tmp / "maps" / f"{stem}.npy", amap)
            if not no_overlays:
                img = load_preprocessed(path, str(path), model.image_size, model.crop_size, model.max_pixels)
                Image.fromarray(heatmap_overlay(img, amap, vmin, vmax)).save(tmp / "overlays" / f"{stem}.png")
        write_csv(tmp / "scores.csv", ["path", "image_score"],
                  [[str(p), f"{s:.6g}"] for p, s in zip(paths, pred.image_scores)])
    click.echo(f"scored {len(paths)} images; results in {out}")


def _fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:.4f}"


@main.command()
@click.argument("root", type=click.Path(path_type=Path), required=False)
@click.option("--category", "categories", multiple=True,
              help="Category folder under ROOT (repeatable), or 'all'.")
@click.option("--train", "train_dir", type=click.Path(path_type=Path), default=None,
              help="Plain folders instead of ROOT: folder of normal training images.")
@click.option("--test-good", multiple=True, type=click.Path(path_type=Path),
              help="Plain folders: folder of normal test images (repeatable).")
@click.option("--test-anomalous", multiple=True, type=click.Path(path_type=Path),
              help="Plain folders: folder of anomalous test images (repeatable).")
@click.option("--masks", type=click.Path(path_type=Path), default=None,
              help="Plain folders: masks matched to anomalous images by stem (x.png or x_mask.png).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@model_options
@_handle_errors
def evaluate(root: Path | None, categories: tuple[str, ...], train_dir: Path | None, test_good: tuple[Path, ...],
             test_anomalous: tuple[Path, ...], masks: Path | None, json_path: Path | None, overwrite: bool,
             **opts: Any) -> None:
    """Fit on normal images, score a labelled test set, report image AUROC, pixel AUROC and PRO.

    MVTec layout: ROOT --category C fits on ROOT/C/train/good and scores ROOT/C/test (masks from
    ROOT/C/ground_truth). Plain folders: --train DIR --test-good DIR --test-anomalous DIR [--masks DIR].
    """
    if json_path is not None:
        check_can_write(json_path, overwrite)
    if train_dir is not None:
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
    results = []
    for ds in datasets:
        click.echo(f"{ds.name}: {len(ds.train)} train, {len(ds.test)} test images", err=True)
        results.append(evaluate_dataset(ds, lambda: _make_model(opts), log=lambda s: click.echo(s, err=True)))
    config = {k: v for k, v in results[0].model_config.items() if k != "n_train"}
    config.update(root=str(root) if root is not None else None, torch_version=torch.__version__, python=platform.python_version())
    summary = summarise(results, config)
    header = f"{'category':<16} {'image AUROC':>11} {'pixel AUROC':>11} {'PRO':>7} {'train':>6} {'test':>5} {'s/img':>6}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in results:
        click.echo(f"{r.category:<16} {_fmt(r.image_auroc):>11} {_fmt(r.pixel_auroc):>11} {_fmt(r.pro):>7} "
                   f"{r.n_train:>6} {r.n_test:>5} {r.predict_seconds / r.n_test:>6.2f}")
    if len(results) > 1:
        m = summary["mean"]
        click.echo(f"{'mean':<16} {_fmt(m['image_auroc']):>11} {_fmt(m['pixel_auroc']):>11} {_fmt(m['pro']):>7}")
    if json_path is not None:
        write_json(json_path, summary)
        click.echo(f"results written to {json_path}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
