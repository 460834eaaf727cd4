"""Backbones: real ImageNet weights, their own normalisation, pyramid shapes, weight sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ad.backbones import available_backbones, backbone_info, build_backbone
from spade_ad.data import preprocess


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_embedded_weights_are_imagenet_trained(name):
    """scikit-image's chelsea (a tabby cat) must get an ImageNet cat class (281-285) in its top-5."""
    from skimage import data as skdata

    bb = build_backbone(name)
    x = torch.from_numpy(preprocess(skdata.chelsea().astype(np.float32) / 255.0, 256, 224))[None]
    g, _ = bb(x)
    logits = bb.net._fc(g)  # the classifier head on the same global feature SPADE uses
    top5 = set(torch.topk(logits, 5).indices[0].tolist())
    assert top5 & {281, 282, 283, 284, 285}, top5
    # Top-1 is a cat too (281 tabby / 282 tiger cat / 285 Egyptian cat), and confidently so.
    assert int(logits.argmax()) in {281, 282, 285}
    assert float(torch.softmax(logits, 1).max()) > 0.3


def test_random_weights_fail_the_cat_test():
    """The cat test can fail: with random weights the cat classes are not confidently on top."""
    from skimage import data as skdata

    bb = build_backbone("efficientnet_lite0", weights="random")
    x = torch.from_numpy(preprocess(skdata.chelsea().astype(np.float32) / 255.0, 256, 224))[None]
    g, _ = bb(x)
    assert float(torch.softmax(bb.net._fc(g), 1).max()) < 0.05


def test_each_backbone_carries_its_normalisation():
    assert backbone_info("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    assert backbone_info("efficientnet_lite0").std == (0.5, 0.5, 0.5)
    assert backbone_info("wide_resnet50_2").mean == (0.485, 0.456, 0.406)
    assert backbone_info("resnet18").std == (0.229, 0.224, 0.225)
    bb = build_backbone("efficientnet_lite0", weights="random")
    # [0, 1] inputs become [-1, 1] inside the backbone.
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    assert ((x - bb.mean) / bb.std).flatten().tolist() == [-1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "name,channels,global_dim",
    [
        ("efficientnet_lite0", (24, 40, 112), 1280),
        ("efficientnet_lite1", (24, 40, 112), 1280),
        ("efficientnet_lite2", (24, 48, 120), 1280),
        ("resnet18", (64, 128, 256), 512),
        ("wide_resnet50_2", (256, 512, 1024), 2048),
    ],
)
def test_pyramid_strides_and_channels(name, channels, global_dim):
    bb = build_backbone(name, weights="random")
    g, levels = bb(torch.rand(1, 3, 224, 224))
    assert g.shape == (1, global_dim)
    assert [tuple(lv.shape[1:]) for lv in levels] == [
        (channels[0], 56, 56),
        (channels[1], 28, 28),
        (channels[2], 14, 14),
    ]


def test_random_is_explicit_and_deterministic():
    a = build_backbone("efficientnet_lite0", weights="random")
    b = build_backbone("efficientnet_lite0", weights="random")
    real = build_backbone("efficientnet_lite0")
    assert a.weights_sha256 == b.weights_sha256 != real.weights_sha256
    assert real.weights_source.endswith(".pth")


def test_weights_from_a_path_and_from_the_hub_cache(tmp_path, monkeypatch):
    real = build_backbone("efficientnet_lite0")
    path = tmp_path / "lite0.pth"
    torch.save(real.net.state_dict(), path)
    assert build_backbone("efficientnet_lite0", weights=path).weights_sha256 == real.weights_sha256
    # torchvision models read <TORCH_HOME>/hub/checkpoints/<official file name>, never the network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    rn = build_backbone("resnet18", weights="random")
    torch.save(rn.net.state_dict(), ckpt / "resnet18-f37072fd.pth")
    loaded = build_backbone("resnet18")
    assert loaded.weights_sha256 == rn.weights_sha256
    assert loaded.weights_source == str(ckpt / "resnet18-f37072fd.pth")


def test_registry_lists_the_three():
    assert available_backbones() == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet18",
        "wide_resnet50_2",
    ]
