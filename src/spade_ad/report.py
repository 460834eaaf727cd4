"""A self-contained HTML evaluation report: results table, ROC / PRO curves and a worst-first gallery.

``write_report`` writes one folder (atomically: it appears only when complete)::

    index.html    one page, inline CSS, no JavaScript, no network; pictures in img/ beside it
    summary.md    the results table in Markdown, plus the configuration
    report.json   the numbers, as ``evaluate.summarise`` returns them
    img/          PNG plots and JPEG/PNG pictures referenced relatively by index.html

Gallery order ("worst first"): with an image threshold, images are sorted by how far their score
lies on the wrong side of it (normal: score - threshold; anomalous: threshold - score; largest
first, so misclassified images come first, the most confidently wrong at the top). Without a
threshold, by rank: with p the percentile rank of the score among the category's test scores
(0 = lowest, 1 = highest), normal images have badness p and anomalous images 1 - p. Ties keep test
order. See :func:`gallery_order`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata
from tqdm.auto import tqdm

from . import __version__
from .data import load_preprocessed
from .errors import SpadeError
from .evaluate import summarise
from .metrics import pro_curve, roc_curve_points
from .output import staged_dir, write_json
from .viz import heatmap_overlay, rebuild_from_matches

if TYPE_CHECKING:
    from .evaluate import CategoryResult
    from .model import Explanation

# Cohen & Hoshen 2020 (arXiv:2005.02357), WRN-50-2 backbone, MVTec AD means over the 15 categories.
PAPER_MEAN: dict[str, float] = {"image_auroc": 0.855, "pixel_auroc": 0.960, "pro": 0.917}
PAPER_LABEL = "paper (MVTec mean, WRN-50-2)"

GALLERY_RULE = (
    "Worst first. With an image threshold: sorted by how far the image score lies on the wrong side of "
    "the threshold (normal image: score &minus; threshold; anomalous image: threshold &minus; score; "
    "largest first), so misclassified images come first, the most confidently wrong at the top. "
    "Without a threshold: by rank, with p the percentile rank of the score among the category's test "
    "scores (0 = lowest, 1 = highest): badness p for normal images, 1 &minus; p for anomalous images, "
    "largest first. Ties keep test order."
)

SHOW = 160  # displayed size (CSS px) of each gallery picture; files keep the model's crop size
THUMB = 80  # displayed size of neighbour thumbnails
PRED_RGB = (255, 0, 0)  # outline of map >= pixel threshold
GT_RGB = (0, 255, 0)  # outline of the ground-truth mask


@dataclass
class GalleryOrder:
    """Test indices worst-first, their badness (same order) and which rule produced them."""

    indices: np.ndarray
    badness: np.ndarray
    rule: str  # "threshold" or "rank"


def gallery_order(scores: np.ndarray, labels: np.ndarray, image_threshold: float | None) -> GalleryOrder:
    """Sort test images worst-first (see the module docstring for the rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    anomalous = np.asarray(labels).astype(bool)
    if image_threshold is not None:
        badness = np.where(anomalous, image_threshold - scores, scores - image_threshold)
        rule = "threshold"
    else:
        n = len(scores)
        p = (rankdata(scores, method="average") - 1.0) / (n - 1) if n > 1 else np.full(n, 0.5)
        badness = np.where(anomalous, 1.0 - p, p)
        rule = "rank"
    order = np.argsort(-badness, kind="stable")  # stable: ties keep test order
    return GalleryOrder(order, badness[order], rule)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _fmt(v: float | None, digits: int = 4) -> str:
    """Numbers as shown in the table and in summary.md (4 decimals, '—' when undefined)."""
    return "—" if v is None else f"{v:.{digits}f}"


def _to_uint8(chw: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (np.clip(np.transpose(chw, (1, 2, 0)), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _save_photo(rgb: np.ndarray, path: Path) -> None:
    # JPEG keeps a full MVTec gallery at a few MB instead of ~100 MB of PNGs; quality 92 is
    # visually lossless at these sizes.
    Image.fromarray(rgb).save(path, quality=92)


def _edges(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Boundary pixels of a boolean mask, thickened so they stay visible when displayed."""
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    if thickness > 1:
        edge = ndimage.binary_dilation(edge, iterations=thickness - 1)
    return edge


def _short_name(name: str) -> str:
    """Last two path parts (defect folder / file): enough to find the image, short enough to read."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else name


def _figure(title: str) -> Any:
    """A matplotlib figure drawn by the Agg canvas directly.

    Binding the Agg canvas to this figure (instead of ``matplotlib.use("Agg")``) renders headless
    without changing the backend of a caller's process (e.g. a notebook's inline backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _thin(x: np.ndarray, y: np.ndarray, n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~n points of a curve for plotting (pixel curves have millions); ends are kept."""
    if len(x) <= n:
        return x, y
    idx = np.unique(np.linspace(0, len(x) - 1, n).astype(np.int64))
    return x[idx], y[idx]


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# --------------------------------------------------------------------------------------------
# curves
# --------------------------------------------------------------------------------------------
def _plot_curves(results: list[CategoryResult], img_dir: Path) -> list[tuple[str, str]]:
    """ROC (image, pixel) and PRO plots -> [(relative file, caption)]."""
    colours = _colours(len(results))
    out: list[tuple[str, str]] = []

    fig, ax = _figure("Image-level ROC")
    for r, c in zip(results, colours, strict=True):
        fpr, tpr = roc_curve_points(r.labels, r.prediction.image_scores)
        ax.plot(fpr, tpr, color=c, lw=1.5, label=f"{r.category} (AUROC {r.image_auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
    ax.set(xlabel="false positive rate (normal images)", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(img_dir / "roc_image.png")
    out.append(("img/roc_image.png", "Image-level ROC, one line per category"))

    with_masks = [
        (r, r.masks, c)
        for r, c in zip(results, colours, strict=True)
        if r.masks is not None and r.pixel_auroc is not None
    ]
    if with_masks:
        fig, ax = _figure("Pixel-level ROC")
        for r, masks, c in with_masks:
            fpr, tpr = roc_curve_points(masks.ravel(), r.prediction.anomaly_maps.ravel())
            fpr, tpr = _thin(fpr, tpr)
            ax.plot(fpr, tpr, color=c, lw=1.5, label=f"{r.category} (AUROC {r.pixel_auroc:.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        ax.set(xlabel="false positive rate (normal pixels)", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(img_dir / "roc_pixel.png")
        out.append(("img/roc_pixel.png", "Pixel-level ROC, one line per category"))

        fig, ax = _figure("PRO curve (FPR 0 to 0.3)")
        for r, masks, c in with_masks:
            fprs, pros = pro_curve(masks, r.prediction.anomaly_maps)
            keep = fprs <= 0.3
            # Close the curve at exactly FPR 0.3, where the integral stops, by interpolating.
            x = np.append(fprs[keep], 0.3)
            y = np.append(pros[keep], np.interp(0.3, fprs, pros))
            x, y = _thin(x, y)
            ax.plot(x, y, color=c, lw=1.5, label=f"{r.category} (AU-PRO {r.pro:.3f})")
        ax.set(xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", xlim=(0, 0.3), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(img_dir / "pro.png")
        out.append(("img/pro.png", "PRO curve up to FPR 0.3 (AU-PRO is its normalised integral)"))
    return out


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _has_thresholds(results: list[CategoryResult]) -> bool:
    return any(r.thresholds is not None for r in results)


def _table_rows(results: list[CategoryResult], summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of plain-text cells, shared by the HTML and Markdown tables.

    Cells are formatted from the JSON document (``summary``) so that page and report.json agree.
    """
    th = _has_thresholds(results)
    header = ["category", "image AUROC", "pixel AUROC", "PRO", "n_train", "n_test", "s / test image"]
    if th:
        header += ["image F1", "pixel F1", "image threshold", "pixel threshold", "thresholds chosen by"]
    rows = []
    for r in results:
        d = summary[r.category]
        row = [
            r.category,
            _fmt(d["image_auroc"]),
            _fmt(d["pixel_auroc"]),
            _fmt(d["pro"]),
            str(d["n_train"]),
            str(d["n_test"]),
            _fmt(d["seconds_per_test_image"]),
        ]
        if th:
            t = d["thresholds"]
            row += [_fmt(d["image_f1"]), _fmt(d["pixel_f1"])]
            row += (
                ["—", "—", "no thresholds"]
                if t is None
                else [f"{t['image']:.6g}", "—" if t["pixel"] is None else f"{t['pixel']:.6g}", t["source"]]
            )
        rows.append(row)
    pad = [""] * (len(header) - 7)
    if len(results) > 1:
        m = summary["mean"]
        rows.append(
            [
                "mean (ours)",
                _fmt(m["image_auroc"]),
                _fmt(m["pixel_auroc"]),
                _fmt(m["pro"]),
                str(m["n_train"]),
                str(m["n_test"]),
                "—",
                *pad,
            ]
        )
    rows.append(
        [
            PAPER_LABEL,
            _fmt(PAPER_MEAN["image_auroc"], 3),
            f"{PAPER_MEAN['pixel_auroc']:.3f} (often quoted 0.965)",
            _fmt(PAPER_MEAN["pro"], 3),
            "—",
            "—",
            "—",
            *pad,
        ]
    )
    return header, rows


def _notes(config: dict[str, Any]) -> list[str]:
    """Plain-text caveats shown under the table (HTML-escaped by the caller)."""
    backbone = config.get("backbone", "unknown")
    return [
        (
            "The paper row is the mean over the 15 MVTec AD categories reported by Cohen & Hoshen (2020) with a "
            "WRN-50-2 backbone. Per-category paper numbers are not shown because they could not be verified "
            "offline."
        ),
        (
            f"Our backbone is {backbone}, which differs from the paper's WRN-50-2, so the comparison is indicative "
            "only; a mean over fewer than the 15 MVTec categories is not comparable with the paper's mean either."
        ),
        (
            "s / test image is prediction time divided by the number of test images (features, k-NN search and "
            "maps; fitting not included)."
        ),
    ]


def _markdown(results: list[CategoryResult], summary: dict[str, Any], config: dict[str, Any]) -> str:
    header, rows = _table_rows(results, summary)

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    align = ["---"] + ["---:"] * 6 + (["---:"] * 4 + ["---"] if len(header) > 7 else [])
    lines = ["# SPADE evaluation report", "", "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    lines += [""] + [f"- {n}" for n in _notes(config)]
    lines += ["", "## Configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# gallery
# --------------------------------------------------------------------------------------------
class _Category:
    """Writes one category's gallery pictures into img/cNN/ and returns their HTML."""

    def __init__(self, r: CategoryResult, ci: int, img_dir: Path, gallery_per_category: int) -> None:
        self.r = r
        self.model = r.model
        self.rel = f"img/c{ci:02d}"
        self.dir = img_dir / f"c{ci:02d}"
        self.dir.mkdir()
        maps = r.prediction.anomaly_maps
        # One colour scale per category so that heatmaps of its images compare.
        self.vmin, self.vmax = float(maps.min()), float(maps.max())
        th = r.thresholds
        self.order = gallery_order(r.prediction.image_scores, r.labels, None if th is None else th.image)
        self.shown = self.order.indices[: max(gallery_per_category, 0)]
        self.thumbs: dict[int, str] = {}
        # Rebuilding reads the same few training images again and again; keep recent ones in memory.
        self.train_image: Callable[[int], np.ndarray] = lru_cache(maxsize=64)(self.model.train_image)
        self.thickness = max(1, self.model.crop_size // 112)

    def colour_scale(self) -> str:
        from matplotlib import colormaps

        strip = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
        Image.fromarray(np.repeat(strip[None], 12, axis=0)).save(self.dir / "scale.png")
        th = self.r.thresholds
        pix = "" if th is None or th.pixel is None else f"; pixel threshold {th.pixel:.4g}"
        return (
            f'<p class="scale">heatmap colour scale for this category: {self.vmin:.4g} '
            f'<img src="{self.rel}/scale.png" width="256" height="12" alt="jet colour scale"> '
            f"{self.vmax:.4g} (min and max of all its test anomaly maps{pix})</p>"
        )

    def _thumb(self, j: int) -> str:
        if j not in self.thumbs:
            rgb = _to_uint8(self.train_image(j))
            size = min(rgb.shape[0], 2 * THUMB)
            _save_photo(
                np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)),
                self.dir / f"train_{j:05d}.jpg",
            )
            self.thumbs[j] = f"{self.rel}/train_{j:05d}.jpg"
        return self.thumbs[j]

    def entry(self, rank: int, i: int, badness: float, e: Explanation) -> str:
        """One gallery card for test image ``i`` (``rank`` 1 = worst)."""
        r, m = self.r, self.model
        name = r.prediction.names[i]
        score = float(r.prediction.image_scores[i])
        amap = r.prediction.anomaly_maps[i]
        anomalous = bool(r.labels[i])
        th = r.thresholds
        stem = f"g{rank:03d}"
        img = load_preprocessed(name, name, m.image_size, m.crop_size, m.max_pixels)
        rgb = _to_uint8(img)
        figs: list[str] = []

        def pic(arr: np.ndarray, suffix: str, caption: str, alt: str, photo: bool = True) -> None:
            path = self.dir / f"{stem}_{suffix}.{'jpg' if photo else 'png'}"
            if photo:
                _save_photo(arr, path)
            else:
                Image.fromarray(arr).save(path)
            w = SHOW * arr.shape[1] // arr.shape[0]
            figs.append(
                f'<figure style="width:{w}px"><img src="{self.rel}/{path.name}" width="{w}" height="{SHOW}" '
                f'alt="{html.escape(alt)}"><figcaption>{caption}</figcaption></figure>'
            )

        def placeholder(text: str, caption: str) -> None:
            figs.append(
                f'<figure style="width:{SHOW}px"><div class="none" style="height:{SHOW}px">{text}</div>'
                f"<figcaption>{caption}</figcaption></figure>"
            )

        pic(rgb, "input", "input (cropped as the model sees it)", "input image")
        gt = None if r.masks is None else r.masks[i]
        if gt is None:
            placeholder("no ground truth masks", "ground truth")
        else:
            pic(
                (gt * 255).astype(np.uint8),
                "gt",
                "ground truth mask" + ("" if gt.any() else " (empty)"),
                "ground truth mask",
                photo=False,
            )
        pic(
            heatmap_overlay(img, amap, self.vmin, self.vmax),
            "heat",
            "anomaly map (category colour scale)",
            "heatmap overlay",
        )
        if th is not None and th.pixel is not None:
            out = rgb.copy()
            if gt is not None:
                out[_edges(gt, self.thickness)] = GT_RGB
            pred = amap >= th.pixel
            out[_edges(pred, self.thickness)] = PRED_RGB
            legend = '<span class="red">red</span>: map &ge; pixel threshold'
            if gt is not None:
                legend += ', <span class="green">green</span>: ground truth'
            pic(
                out,
                "outline",
                f"thresholded outline ({legend}; {100 * pred.mean():.1f}% of pixels)",
                "thresholded outline",
            )
        else:
            placeholder("no threshold", "thresholded outline: no pixel threshold")

        # Explanation: nearest normal images and the picture rebuilt from matched normal patches.
        nbs = []
        for rank_nb, (j, d2) in enumerate(
            zip(e.neighbors[:3].tolist(), e.neighbor_sq_distances[:3], strict=True), start=1
        ):
            train_name = html.escape(_short_name(m.train_paths_[j]))
            nbs.append(
                f'<figure><img src="{self._thumb(j)}" width="{THUMB}" height="{THUMB}" '
                f'alt="nearest normal image {rank_nb}"><figcaption>nearest normal #{rank_nb}<br>'
                f"{train_name}<br>squared distance {float(d2):.4g}</figcaption></figure>"
            )
        rebuilt = rebuild_from_matches(e, self.train_image)
        gap = np.ones((3, img.shape[1], max(2, img.shape[2] // 56)), np.float32)
        pair = _to_uint8(np.concatenate([img, gap, rebuilt], axis=2))
        pic(
            pair,
            "rebuilt",
            "correspondence: test image (left) | rebuilt from its matched normal patches "
            f"(right; level {e.level}, stride {e.stride})",
            "test image and its rebuild from normal patches",
        )

        if th is None:
            verdict = "no image threshold"
        else:
            flagged = score >= th.image
            ok = flagged == anomalous
            outcome = "correct" if ok else '<b class="red">wrong</b>'
            decision = "flagged anomalous" if flagged else "passed as normal"
            verdict = f"threshold {th.image:.4g}: {decision} ({outcome})"
        how = "margin past threshold" if self.order.rule == "threshold" else "rank badness"
        truth = f"anomalous ({html.escape(Path(name).parent.name)})" if anomalous else "normal"
        return (
            f'<div class="entry" data-test-index="{i}" data-badness="{badness:.6g}">'
            f"<h4>#{rank} &middot; {html.escape(_short_name(name))} &middot; {truth} &middot; "
            f"score {score:.4g} &middot; {verdict} &middot; {how} {badness:+.4g}</h4>"
            f'<div class="row">{"".join(figs)}</div>'
            f'<div class="row nb">{"".join(nbs)}</div></div>'
        )


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------
CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:20px;color:#222;max-width:1360px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}h4{font-size:13px;margin:4px 0}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #bbb;padding:3px 7px}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.paper td{background:#f3f3f3;font-style:italic}
tr.mean td{font-weight:bold}.note{font-size:13px;color:#444}
figure{display:inline-block;margin:3px 6px 3px 0;vertical-align:top;text-align:center}
figcaption{font-size:11px}
.row{display:flex;flex-wrap:wrap;align-items:flex-start}.nb figure{max-width:150px}
.entry{border:1px solid #ddd;padding:6px;margin:8px 0}
.entry img{image-rendering:pixelated}
.none{display:flex;align-items:center;justify-content:center;background:#eee;color:#666;font-size:12px;
border:1px dashed #aaa;box-sizing:border-box}
.red{color:#d00}.green{color:#080}pre{font-size:12px;background:#f6f6f6;padding:8px;overflow:auto}
#gallery-start{height:6px;background:#ff00ff;margin:10px 0}
"""


def _html_table(results: list[CategoryResult], summary: dict[str, Any]) -> str:
    header, rows = _table_rows(results, summary)
    out = [
        '<table id="results"><thead><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
    ]
    names = [r.category for r in results]
    for k, row in enumerate(rows):
        if k < len(names):
            attrs = f' class="cat" data-category="{html.escape(names[k])}"'
        else:
            attrs = ' class="paper"' if row[0] == PAPER_LABEL else ' class="mean"'
        cells = [f"<td>{html.escape(row[0])}</td>"]
        cells += [
            f'<td class="num">{html.escape(c)}</td>' if c[:1].isdigit() else f"<td>{html.escape(c)}</td>"
            for c in row[1:]
        ]
        out.append(f"<tr{attrs}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def write_report(
    results: list[CategoryResult],
    out_dir: Path,
    config: dict[str, Any],
    overwrite: bool = False,
    gallery_per_category: int = 24,
    progress: bool = False,
) -> Path:
    """Write the HTML report folder ``out_dir`` (index.html, summary.md, report.json, img/); return it.

    ``results`` come from :func:`spade_ad.evaluate.evaluate_dataset` (each holds its fitted model,
    used to explain the gallery images); ``config`` is the run configuration (as for ``summarise``).
    The folder is built aside and renamed into place, so it exists only when complete; an existing
    non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    if not results:
        raise SpadeError("no evaluation results to report")
    out_dir = Path(out_dir)
    summary = summarise(results, config)
    with staged_dir(out_dir, overwrite) as tmp:
        img_dir = tmp / "img"
        img_dir.mkdir()
        write_json(tmp / "report.json", summary)
        (tmp / "summary.md").write_text(_markdown(results, summary, config))
        curves = _plot_curves(results, img_dir)

        cats = [_Category(r, ci, img_dir, gallery_per_category) for ci, r in enumerate(results)]
        total = sum(len(c.shown) for c in cats)
        sections = []
        with tqdm(total=total, desc="report gallery", unit="img", disable=not progress, leave=False) as bar:
            for c in cats:
                r = c.r
                names = [r.prediction.names[i] for i in c.shown]
                # One explain call per category: features for all shown images in batches.
                explanations = c.model.explain(names) if names else []
                entries = []
                # badness covers every test image (worst first); shown is its first gallery_per_category.
                for rank, (i, bad, e) in enumerate(zip(c.shown, c.order.badness, explanations, strict=False), start=1):
                    entries.append(c.entry(rank, int(i), float(bad), e))
                    bar.update(1)
                n_test = len(r.labels)
                sections.append(
                    f'<h3 id="gallery-{html.escape(r.category)}">{html.escape(r.category)}: '
                    f"{len(c.shown)} of {n_test} test images, worst first "
                    f"({'by threshold margin' if c.order.rule == 'threshold' else 'by rank, no threshold'})</h3>"
                    + c.colour_scale()
                    + "\n".join(entries)
                )

        cat_names = ", ".join(html.escape(r.category) for r in results)
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>SPADE evaluation report: {cat_names}</title>
<style>{CSS}</style></head><body>
<h1>SPADE evaluation report</h1>
<p class="note">SPADE (Cohen &amp; Hoshen 2020, Sub-Image Anomaly Detection with Deep Pyramid Correspondences),
spade-ad {html.escape(__version__)}, backbone {html.escape(str(config.get("backbone", "unknown")))};
categories: {cat_names}; written {when}. Files: <a href="summary.md">summary.md</a>,
<a href="report.json">report.json</a>.</p>
<h2>Results</h2>
{_html_table(results, summary)}
<ul class="note">{"".join(f"<li>{html.escape(n)}</li>" for n in _notes(config))}</ul>
<h2>Curves</h2>
<div class="row">{
            "".join(
                f'<figure><img src="{src}" width="416" height="352" alt="{html.escape(cap)}">'
                f"<figcaption>{html.escape(cap)}</figcaption></figure>"
                for src, cap in curves
            )
        }</div>
{"" if len(curves) == 3 else '<p class="note">No ground truth masks: no pixel-level ROC or PRO curve.</p>'}
<h2>Gallery</h2>
<p class="note">{GALLERY_RULE} At most {int(gallery_per_category)} images per category. Each entry shows the
input image cropped as the model sees it, the ground truth mask, the anomaly map as a heatmap (one colour scale
per category), the outline of the region at or above the pixel threshold, the three nearest normal training
images with their squared feature distances, and the test image rebuilt from the normal patches its pixels
matched at the finest pyramid level: parts that no normal image has show up as differences between the two.</p>
<div id="gallery-start"></div>
{"".join(sections)}
<h2>Configuration</h2>
<pre>{html.escape(json.dumps(config, indent=2, default=str))}</pre>
</body></html>
"""
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out_dir
