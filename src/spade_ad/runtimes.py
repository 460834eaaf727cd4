"""Where the frozen backbone runs: torch (the default), ONNX Runtime or OpenVINO, on the CPU or a GPU.

The runtime is a deployment choice, not part of a model's meaning: every runtime computes the same
features (to float32 rounding, checked by the tests), so a model fitted with one scores with another.
Only feature extraction moves; the search stays in :mod:`spade_ad.search`.

A runtime gets its network in one of two ways:

* exported on the fly from the torch backbone (ONNX, traced once in memory at first use), or
* from an export folder written by :func:`export_backbone` (``spade-ad export``): ``backbone.onnx`` or
  OpenVINO IR ``backbone.xml`` + ``.bin``, and ``spade_export.json`` saying which backbone (weights
  sha256), input size and pyramid levels it computes, with the sha256 of each file. A folder that does
  not match the model, or whose files were changed, is refused with a message naming what differs.

The exported graph takes images in [0, 1], (N, 3, S, S) with a free batch size, and returns the global
vector and the model's pyramid levels (NCHW), exactly what :class:`spade_ad.backbones.Backbone` gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbones import Backbone, BackboneInfo
from .errors import SpadeError

RUNTIMES = ("torch", "onnxruntime", "openvino")
EXPORT_FORMATS = ("onnx", "openvino")
DEVICES = ("cpu", "cuda", "auto")
MANIFEST = "spade_export.json"
_ONNX_OPSET = 17


def _require(module: str, what: str) -> Any:
    """Import an optional package, or say which one is missing and how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpadeError(
            f"{what} needs the package '{module}' (pip install 'spade-ad[runtimes]' installs "
            f"onnx, onnxruntime and openvino)"
        ) from None


class RuntimeBackbone:
    """A backbone run by ONNX Runtime or OpenVINO, called like :class:`Backbone`.

    ``forward(x) -> (global (N, D), [level 1, level 2, level 3])``; levels the graph does not compute are
    None (the feature code only reads the levels the model uses).
    """

    def __init__(
        self,
        info: BackboneInfo,
        run: Callable[[np.ndarray], Sequence[np.ndarray]],
        level_ids: Sequence[int],
        weights_sha256: str,
        source: str,
    ) -> None:
        self.info = info
        self._run = run
        self.level_ids = tuple(level_ids)
        self.weights_sha256 = weights_sha256
        self.weights_source = source

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        outs = self._run(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        levels: list[torch.Tensor | None] = [None, None, None]
        for lid, out in zip(self.level_ids, outs[1:], strict=True):
            levels[lid - 1] = torch.from_numpy(np.asarray(out))
        return torch.from_numpy(np.asarray(outs[0])), levels


class DeviceBackbone:
    """The torch backbone on another device: inputs go there, features come back to the CPU (the bank
    and the model file stay device-independent)."""

    def __init__(self, backbone: Backbone, device: torch.device) -> None:
        self.backbone = backbone.to(device)
        self.device = device
        self.info = backbone.info
        self.weights_sha256 = backbone.weights_sha256
        self.weights_source = backbone.weights_source

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g, levels = self.backbone(x.to(self.device, non_blocking=True))
        return g.cpu(), [lv.cpu() for lv in levels]


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (an error if there is no usable CUDA GPU) or ``"auto"`` (CUDA when there is one)."""
    if device not in DEVICES:
        raise SpadeError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpadeError(
            "device='cuda' but no CUDA GPU is usable here (torch.cuda.is_available() is False); "
            "use device='cpu' or 'auto'"
        )
    return torch.device(device)


class _Graph(nn.Module):
    """What gets exported: normalisation, the backbone, the global pool and only the model's levels."""

    def __init__(self, backbone: Backbone, level_ids: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.level_ids = tuple(level_ids)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, std = self.backbone.mean, self.backbone.std
        x = (x - mean) / std
        g, levels = self.backbone._run(self.backbone.net, x)
        return (g, *(levels[i - 1] for i in self.level_ids))


def onnx_bytes(backbone: Backbone, input_size: int, level_ids: Sequence[int]) -> bytes:
    """The backbone as an ONNX graph (opset 17, free batch size), traced at ``input_size``."""
    names = ["global", *(f"level{i}" for i in level_ids)]
    _require("onnx", "exporting the backbone to ONNX")
    buf = io.BytesIO()
    graph = _Graph(backbone.cpu(), level_ids).eval()
    with warnings.catch_warnings():
        # The embedded network computes its "SAME" padding in Python from the input size; tracing at a
        # fixed size bakes those values in, which is right (the model's input size is fixed).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (torch.rand(2, 3, input_size, input_size),),
            buf,  # type: ignore[arg-type]  # a file-like object is accepted, as the docs say
            dynamo=False,
            input_names=["images"],
            output_names=names,
            dynamic_axes={"images": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=_ONNX_OPSET,
        )
    return buf.getvalue()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_backbone(
    backbone: Backbone, input_size: int, level_ids: Sequence[int], fmt: str, out: str | os.PathLike, overwrite: bool
) -> Path:
    """Write the backbone as ONNX (``fmt="onnx"``) or OpenVINO IR (``"openvino"``) into folder ``out``.

    The folder is built next to ``out`` and renamed into place, so a failed export leaves nothing.
    """
    from .output import staged_dir, write_json

    if fmt not in EXPORT_FORMATS:
        raise SpadeError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    data = onnx_bytes(backbone, input_size, level_ids)
    out = Path(out)
    with staged_dir(out, overwrite) as tmp:
        onnx_path = tmp / "backbone.onnx"
        onnx_path.write_bytes(data)
        if fmt == "openvino":
            ov = _require("openvino", "an OpenVINO export")

            # compress_to_fp16=False: keep the float32 weights (fp16 weights change the features).
            ov.save_model(ov.Core().read_model(str(onnx_path)), str(tmp / "backbone.xml"), compress_to_fp16=False)
            onnx_path.unlink()
        files = sorted(p.name for p in tmp.iterdir())
        write_json(
            tmp / MANIFEST,
            {
                "format": fmt,
                "backbone": backbone.info.name,
                "weights_sha256": backbone.weights_sha256,
                "input_size": int(input_size),
                "levels": [int(i) for i in level_ids],
                "files": {name: _sha256(tmp / name) for name in files},
                "spade_ad_version": __version__,
            },
        )
    return out


def read_export(folder: str | os.PathLike, backbone: str, input_size: int, level_ids: Sequence[int]) -> dict:
    """The manifest of an export folder, checked against what the model needs (and its files' hashes)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise SpadeError(f"{folder}: not a spade-ad backbone export (no {MANIFEST}); write one with spade-ad export")
    try:
        man = json.loads(path.read_text())
        fmt, files = man["format"], dict(man["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpadeError(f"{path}: unreadable export manifest ({exc})") from None
    if man.get("backbone") != backbone:
        raise SpadeError(f"{folder}: exported from backbone {man.get('backbone')!r}, but the model uses {backbone!r}")
    if man.get("input_size") != input_size:
        raise SpadeError(
            f"{folder}: exported for {man.get('input_size')} px inputs, but the model's crop is {input_size} px; "
            f"export again for this model"
        )
    missing = [i for i in level_ids if i not in man.get("levels", [])]
    if missing:
        raise SpadeError(f"{folder}: export computes levels {man.get('levels')}, not the model's level(s) {missing}")
    for name, digest in files.items():
        if not (folder / name).is_file() or _sha256(folder / name) != digest:
            raise SpadeError(f"{folder / name}: missing or changed since it was exported; export again")
    if fmt not in EXPORT_FORMATS:
        raise SpadeError(f"{path}: unknown export format {fmt!r}")
    return man


def _thread_count() -> int:
    return max(1, torch.get_num_threads())


def _onnxruntime_runner(model: bytes | str, n_out: int) -> Callable[[np.ndarray], Sequence[np.ndarray]]:
    ort = _require("onnxruntime", "runtime 'onnxruntime'")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _thread_count()
    opts.inter_op_num_threads = 1
    # Worker threads sleep instead of spinning between operators: next to another busy process, spinning
    # threads steal the very cores the others need (see docs/line-speed.md, "Sharing the CPU").
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})[:n_out]


def _openvino_runner(model_path: str) -> Callable[[np.ndarray], Sequence[np.ndarray]]:
    ov = _require("openvino", "runtime 'openvino'")
    core = ov.Core()
    # f32: OpenVINO would otherwise run in bf16 on CPUs that have it, which moves features by ~5 %.
    compiled = core.compile_model(
        core.read_model(model_path),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": _thread_count(), "PERFORMANCE_HINT": "LATENCY"},
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> Sequence[np.ndarray]:
        request.infer({0: x})
        # Copies: the request's output buffers are reused by the next call.
        return [np.array(request.get_output_tensor(i).data) for i in range(len(compiled.outputs))]

    return run


def runtime_backbone(
    runtime: str,
    build: Callable[[], Backbone],
    info: BackboneInfo,
    input_size: int,
    level_ids: Sequence[int],
    export_dir: str | os.PathLike | None = None,
    device: str = "cpu",
) -> Backbone | RuntimeBackbone | DeviceBackbone:
    """The backbone to extract features with.

    ``runtime="torch"``: ``build()`` on ``device``. Otherwise ONNX Runtime / OpenVINO on the CPU, from
    ``export_dir`` (checked with :func:`read_export`; ``build`` is not called, so the torch weights
    need not be present) or, without one, from an ONNX graph traced from ``build()`` in memory.
    """
    if runtime not in RUNTIMES:
        raise SpadeError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    dev = resolve_device(device)
    if runtime == "torch":
        if export_dir is not None:
            raise SpadeError("an export folder is run by runtime 'onnxruntime' or 'openvino', not 'torch'")
        bb = build()
        return bb if dev.type == "cpu" else DeviceBackbone(bb, dev)
    if dev.type != "cpu" and device != "auto":
        # "auto" leaves this runtime's backbone on the CPU (the search still uses the GPU).
        raise SpadeError(f"runtime {runtime!r} runs on the CPU here; use runtime='torch' for device {device!r}")
    n_out = 1 + len(level_ids)
    if export_dir is not None:
        man = read_export(export_dir, info.name, input_size, level_ids)
        folder = Path(export_dir)
        # Map the model's levels onto the export's outputs (an export may hold more levels).
        pick = [0, *(1 + man["levels"].index(i) for i in level_ids)]
        if man["format"] == "onnx":
            model_file = str(folder / "backbone.onnx")
            if runtime == "onnxruntime":
                full = _onnxruntime_runner(model_file, 1 + len(man["levels"]))
            else:
                full = _openvino_runner(model_file)
        elif runtime == "openvino":
            full = _openvino_runner(str(folder / "backbone.xml"))
        else:
            raise SpadeError(f"{folder}: an OpenVINO export runs with runtime 'openvino', not {runtime!r}")

        def run(x: np.ndarray) -> list[np.ndarray]:
            outs = full(x)
            return [outs[j] for j in pick]

        return RuntimeBackbone(info, run, level_ids, man["weights_sha256"], str(folder))
    bb = build()
    data = onnx_bytes(bb, input_size, level_ids)
    if runtime == "onnxruntime":
        return RuntimeBackbone(info, _onnxruntime_runner(data, n_out), level_ids, bb.weights_sha256, bb.weights_source)
    with tempfile.TemporaryDirectory(prefix="spade-ad-onnx-") as tmp:
        # OpenVINO reads ONNX from a file; the compiled network no longer needs it once built.
        path = Path(tmp) / "backbone.onnx"
        path.write_bytes(data)
        run_ov = _openvino_runner(str(path))
    return RuntimeBackbone(info, run_ov, level_ids, bb.weights_sha256, bb.weights_source)


def device_levels(levels: Sequence[Any], device: torch.device) -> list[torch.Tensor] | None:
    """The bank's pixel features moved to ``device`` when they are in memory and take under half of its
    free memory; None otherwise (then each image's K neighbours are gathered on the CPU and copied)."""
    if device.type != "cuda" or not all(isinstance(lv, torch.Tensor) for lv in levels):
        return None
    need = sum(lv.numel() * lv.element_size() for lv in levels)
    free, _ = torch.cuda.mem_get_info(device)
    return [lv.to(device) for lv in levels] if need < free // 2 else None
