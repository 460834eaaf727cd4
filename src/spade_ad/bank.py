"""The memory bank (fitted features) and the model file that carries it.

A model file is one safetensors file: the bank's tensors, plus in the safetensors header a JSON
configuration (backbone, weights hash, preprocessing, hyper-parameters, package version, training
file list) and a sha256 of the tensors. Writing is atomic (temp file + rename); reading checks the
format, the version and the checksum so a truncated or edited file is refused with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError

FORMAT_NAME = "spade-ad-model"
#: Bump when the file layout changes incompatibly; loading refuses newer versions.
FORMAT_VERSION = 1


@dataclass
class FeatureBank:
    """Features of the training (normal) images.

    ``global_``: (N, D) float32; ``levels``: per pyramid level (N, h, w, C) float32;
    ``paths``: the N training image names, in bank order (neighbour indices refer to it).
    """

    global_: torch.Tensor
    levels: list[torch.Tensor]
    paths: list[str]

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as stored in the model file."""
        out = {"global": self.global_}
        for i, lv in enumerate(self.levels):
            out[f"level{i}"] = lv
        return out


def content_sha256(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """sha256 over the header texts, then names, shapes, dtypes and bytes of the tensors in name order.

    Covering the JSON texts too means an edited configuration is caught, not only edited features.
    """
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.numpy().data)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, fsync it, then rename it into place.

    A crash or error at any point leaves either the old file or nothing: never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp makes 0600 files; give the result the permissions a plainly created file would get.
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model_file(path: str | os.PathLike, bank: FeatureBank, config: dict[str, Any]) -> Path:
    """Write bank + configuration to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in bank.tensors().items()}
    config_json = json.dumps(config, sort_keys=True)
    files_json = json.dumps(bank.paths)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": config_json,
        "train_files": files_json,
        "content_sha256": content_sha256(tensors, config_json, files_json),
    }
    p = Path(path)
    atomic_write(p, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return p


def load_model_file(path: str | os.PathLike) -> tuple[FeatureBank, dict[str, Any]]:
    """Read and verify a model file -> (bank, config). Raises :class:`ModelFileError`."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such model file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT_NAME:
                raise ModelFileError(f"{p}: not a spade-ad model file (no '{FORMAT_NAME}' header)")
            try:
                version = int(meta.get("format_version", ""))
            except ValueError:
                raise ModelFileError(f"{p}: unreadable format version {meta.get('format_version')!r}") from None
            if version > FORMAT_VERSION:
                raise ModelFileError(
                    f"{p}: written in model format {version} by a newer spade-ad; this version reads "
                    f"format {FORMAT_VERSION} and older. Upgrade spade-ad to load it"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ModelFileError(f"{p}: truncated or not a safetensors file ({exc})") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{p}: cannot be read ({exc})") from None
    if content_sha256(tensors, meta.get("config", ""), meta.get("train_files", "")) != meta.get("content_sha256"):
        raise ModelFileError(f"{p}: checksum mismatch: the file was edited or is corrupt")
    try:
        config = json.loads(meta["config"])
        paths = json.loads(meta["train_files"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{p}: configuration header is missing or not valid JSON ({exc})") from None
    n_levels = len(config.get("levels", ()))
    missing = [k for k in ["global", *(f"level{i}" for i in range(n_levels))] if k not in tensors]
    if missing:
        raise ModelFileError(f"{p}: missing tensors {missing}")
    bank = FeatureBank(tensors["global"], [tensors[f"level{i}"] for i in range(n_levels)], paths)
    n = len(bank)
    if len(paths) != n or any(lv.shape[0] != n for lv in bank.levels):
        raise ModelFileError(f"{p}: inconsistent bank: {n} global features, {len(paths)} file names")
    return bank, config
