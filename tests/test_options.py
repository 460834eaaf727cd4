"""Options beyond the paper: image score variants, a separate image-level k, locally aware features,
other embedded backbones. Each: its shapes, its definition, and its save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spade_ad import SPADE, SpadeError

SMALL = {"image_size": 48, "crop_size": 48, "k": 2}


@pytest.fixture
def fitted(image_dirs):
    train, test = image_dirs
    return SPADE(**SMALL).fit(train), train, test


def test_defaults_are_the_paper_method():
    m = SPADE()
    assert (m.image_score, m.image_k, m.patch_size) == ("knn", None, 1)


def test_map_max_and_combined_scores_follow_their_definitions(fitted, tmp_path):
    base, train, test = fitted
    ref = base.predict(test)
    mm = SPADE(image_score="map_max", **SMALL).fit(train)
    out = mm.predict(test)
    np.testing.assert_array_equal(out.anomaly_maps, ref.anomaly_maps)  # only the image score changes
    np.testing.assert_allclose(out.image_scores, ref.anomaly_maps.reshape(3, -1).max(1), rtol=1e-6)
    combo = SPADE(image_score="knn*map_max", **SMALL).fit(train).predict(test)
    np.testing.assert_allclose(combo.image_scores, np.sqrt(ref.image_scores) * out.image_scores, rtol=1e-6)
    again = SPADE.load(mm.save(tmp_path / "m.safetensors"))
    assert again.image_score == "map_max"
    np.testing.assert_array_equal(again.predict(test).image_scores, out.image_scores)


def test_image_k_is_separate_from_the_gallery_k(image_dirs, tmp_path):
    train, test = image_dirs
    m = SPADE(image_k=5, **SMALL).fit(train)
    out = m.predict(test)
    assert out.neighbors.shape == (3, 2)  # gallery: k = 2
    g_tr, _ = m.extract(train)
    g_te, _ = m.extract(test)
    d2 = ((g_te.double()[:, None] - g_tr.double()[None]) ** 2).sum(-1).numpy()
    np.testing.assert_allclose(out.image_scores, np.sort(d2, axis=1)[:, :5].mean(1), rtol=1e-5)
    # the maps are those of the k = 2 gallery
    np.testing.assert_array_equal(out.anomaly_maps, SPADE(**SMALL).fit(train).predict(test).anomaly_maps)
    again = SPADE.load(m.save(tmp_path / "m.safetensors"))
    assert (again.image_k, again.image_k_) == (5, 5)
    np.testing.assert_array_equal(again.predict(test).image_scores, out.image_scores)


def test_patch_size_averages_neighbourhoods_and_is_what_predict_uses(fitted, tmp_path):
    base, train, test = fitted
    _, plain = base.extract(test)
    m = SPADE(patch_size=3, **SMALL).fit(train)
    _, pooled = m.extract(test)
    for p, q in zip(plain, pooled, strict=True):
        want = F.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=False)
        assert q.shape == p.shape
        torch.testing.assert_close(q, want, rtol=1e-5, atol=1e-5)
    # An interior pixel is the plain mean of its 3x3 neighbourhood; a corner averages only 4 pixels.
    torch.testing.assert_close(pooled[0][0, :, 5, 5], plain[0][0, :, 4:7, 4:7].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[0][0, :, 0, 0], plain[0][0, :, 0:2, 0:2].mean(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    out = m.predict(test)
    assert out.anomaly_maps.shape == (3, 48, 48)
    assert not np.allclose(out.anomaly_maps, base.predict(test).anomaly_maps)
    again = SPADE.load(m.save(tmp_path / "m.safetensors"))
    assert again.patch_size == 3
    np.testing.assert_array_equal(again.predict(test).anomaly_maps, out.anomaly_maps)


@pytest.mark.parametrize(
    "name,channels", [("efficientnet_lite1", (24, 40, 112)), ("efficientnet_lite2", (24, 48, 120))]
)
def test_other_embedded_backbones_fit_predict_and_reload(image_dirs, tmp_path, name, channels):
    train, test = image_dirs
    m = SPADE(backbone=name, **SMALL).fit(train)
    g, levels = m.extract(test)
    assert g.shape == (3, 1280) and [lv.shape[1] for lv in levels] == list(channels)
    out = m.predict(test)
    again = SPADE.load(m.save(tmp_path / "m.safetensors"))
    assert again.backbone == name
    np.testing.assert_array_equal(again.predict(test).anomaly_maps, out.anomaly_maps)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"image_score": "max"}, "image_score must be one of"),
        ({"image_k": 0}, "image_k must be"),
        ({"patch_size": 2}, "patch_size must be an odd"),
    ],
)
def test_bad_options_are_refused(image_dirs, kwargs, message):
    train, _ = image_dirs
    with pytest.raises(SpadeError, match=message):
        SPADE(**SMALL, **kwargs).fit(train)


def test_presets_and_overrides():
    from spade_ad.presets import PRESETS

    assert PRESETS["paper"] == {}
    m = SPADE.from_preset("accurate")
    for key, value in PRESETS["accurate"].items():
        assert getattr(m, key) == value
    assert SPADE.from_preset("accurate", k=7).k == 7
    p = SPADE.from_preset("paper")
    assert (p.k, tuple(p.levels), p.image_score, p.patch_size) == (50, (1, 2, 3), "knn", 1)
    with pytest.raises(SpadeError, match="unknown preset"):
        SPADE.from_preset("fastest")


def test_the_accurate_preset_of_2026_11_29_stays_reproducible():
    """``accurate`` changed on 2026-11-30 (docs/patchcore.md); its figures published before then name
    the settings below (docs/accuracy.md), which ``accurate-v1`` must keep giving."""
    m = SPADE.from_preset("accurate-v1")
    assert (m.image_size, m.crop_size, m.sigma, m.patch_size, tuple(m.levels)) == (320, 280, 5.0, 5, (2, 3))
    assert (m.image_score, m.image_k, m.joint_levels, m.gallery, m.precision) == (
        "knn*map_max",
        5,
        False,
        "knn",
        "fp32",
    )
    new = SPADE.from_preset("accurate")
    assert (new.joint_levels, new.patch_size, new.sigma, new.precision) == (True, (3, 5), 8.0, "bf16")


def test_cli_preset_with_an_explicit_override(image_dirs, tmp_path):
    from click.testing import CliRunner

    from spade_ad.cli import main
    from spade_ad.presets import PRESETS

    train, _ = image_dirs
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(
        main,
        [
            "fit",
            str(train),
            "--out",
            str(out),
            "--preset",
            "accurate",
            "--image-size",
            "48",
            "--crop-size",
            "48",
            "--k",
            "2",
            "--patch-size",
            "7",
        ],
    )
    assert r.exit_code == 0, r.output
    m = SPADE.load(out)
    assert m.patch_size == 7  # given explicitly: overrides the preset's (3, 5)
    assert tuple(m.levels) == tuple(PRESETS["accurate"]["levels"]) and m.image_score == "knn*map_max"
    assert m.k == 2
    assert m.sigma == PRESETS["accurate"]["sigma"]  # not given: the preset's value


def test_cli_preset_crop_larger_than_a_given_image_size_names_the_preset(image_dirs, tmp_path):
    from click.testing import CliRunner

    from spade_ad.cli import main

    train, _ = image_dirs
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(main, ["fit", str(train), "--out", str(out), "--preset", "accurate", "--image-size", "48"])
    assert r.exit_code == 2
    assert "preset 'accurate' crops 280 px" in r.output and "crop_size" in r.output
    assert not out.exists()
    # The same error from the Python API; with crop_size given as well it is accepted.
    with pytest.raises(SpadeError, match="preset 'accurate' crops 280 px, larger than image_size 256"):
        SPADE.from_preset("accurate", image_size=256)
    assert SPADE.from_preset("accurate", image_size=256, crop_size=224).crop_size == 224
