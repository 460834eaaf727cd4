"""The memory bank (fitted features) and the model file that carries it.

A model file is one safetensors file: the bank's tensors, plus in the safetensors header a JSON
configuration (backbone, weights hash, preprocessing, hyper-parameters, package version, training
file list) and a sha256 of the tensors. Writing is atomic (temp file + rename); reading checks the
format, the version and the checksum so a truncated or edited file is refused with a clear message.

The per-level pixel features are most of a bank (~0.5 MB per image with the embedded backbone in
float32). Loaded with ``mmap=True`` they stay in the file: each :class:`MappedLevel` read maps the
file, copies out only the requested images' rows and unmaps it again, so resident memory holds the K
neighbours' maps of the image being scored, never the whole training set.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .errors import ModelFileError

FORMAT_NAME = "spade-ad-model"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Bump when the file layout changes incompatibly; loading refuses newer versions.
FORMAT_VERSION = 1


#: Rows read per mapping while hashing a memory-mapped level (bounds resident memory while verifying).
_HASH_CHUNK_BYTES = 16 << 20


class MappedLevel:
    """One pyramid level of a bank that stays in its model file: (N, h, w, C) rows read on demand.

    Indexing with image indices returns a float32 tensor (K, h, w, C), as indexing the in-memory
    tensor would. The file is re-opened for each read (so nothing stays mapped) and its identity
    (inode, size, mtime) is checked first: a model file replaced while in use is refused rather than
    silently read.
    """

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype, stamp: tuple) -> None:
        self.path, self.name, self.shape, self.dtype, self._stamp = path, name, torch.Size(shape), dtype, stamp

    def _open(self) -> Any:
        from safetensors import safe_open

        if _file_stamp(self.path) != self._stamp:
            raise ModelFileError(f"{self.path}: the model file changed on disk after it was loaded; load it again")
        return safe_open(str(self.path), framework="pt")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` in the stored dtype."""
        with self._open() as f:
            return f.get_slice(self.name)[start:stop]

    def __getitem__(self, index: torch.Tensor | list[int]) -> torch.Tensor:
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        out = torch.empty((len(idx), *self.shape[1:]), dtype=torch.float32)
        with self._open() as f:
            sl = f.get_slice(self.name)
            # Sorted runs of consecutive indices are read as one slice each.
            order = torch.argsort(idx)
            srt = idx[order].tolist()
            pos = 0
            while pos < len(srt):
                end = pos + 1
                while end < len(srt) and srt[end] in (srt[end - 1], srt[end - 1] + 1):
                    end += 1
                block = sl[srt[pos] : srt[end - 1] + 1].to(torch.float32)
                out[order[pos:end]] = block[torch.tensor(srt[pos:end]) - srt[pos]]
                pos = end
        return out

    def materialize(self) -> torch.Tensor:
        """The whole level in memory (stored dtype)."""
        return self.rows(0, self.shape[0])


def _file_stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


Level = torch.Tensor | MappedLevel


@dataclass
class FeatureBank:
    """Features of the training (normal) images.

    ``global_``: (N, D) float32; ``levels``: per pyramid level (N, h, w, C), float32 or float16
    (``bank_dtype``), in memory or a :class:`MappedLevel`; ``paths``: the N training image names, in
    bank order (neighbour indices refer to it). ``coresets``: per level, None or the (M,) int64 flat
    positions ``(image * h + y) * w + x`` kept in the ``gallery="all"`` memory (see :meth:`memory`).
    """

    global_: torch.Tensor
    levels: list[Level]
    paths: list[str]
    coresets: list[torch.Tensor] | None = None

    def memory(self, level: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``gallery="all"`` memory of one level: (every kept pixel feature as float32 (M, C), their
        flat positions (M,), or None when every position is kept). Gathered once and cached."""
        cache = self.__dict__.setdefault("_memory", {})
        if level not in cache:
            lv = self.levels[level]
            full = lv.materialize() if isinstance(lv, MappedLevel) else lv
            flat = full.reshape(-1, full.shape[-1])
            keep = None if self.coresets is None else self.coresets[level]
            cache[level] = ((flat if keep is None else flat[keep]).to(torch.float32), keep)
        return cache[level]

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def global_sq_norms(self) -> torch.Tensor:
        """|global feature|^2 of every bank row, computed once (the image-level search reuses it)."""
        cached = self.__dict__.get("_global_sq")
        if cached is None or cached.shape[0] != self.global_.shape[0]:
            cached = torch.linalg.vector_norm(self.global_.to(torch.float32), dim=1).square_()
            self.__dict__["_global_sq"] = cached
        return cached

    def gallery(self, level: int, neighbors: torch.Tensor) -> torch.Tensor:
        """The pixel features of the images ``neighbors`` at one level, float32 (K, h, w, C)."""
        return self.levels[level][neighbors].to(torch.float32)

    @property
    def mapped(self) -> bool:
        return any(isinstance(lv, MappedLevel) for lv in self.levels)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as stored in the model file (mapped levels are read in)."""
        out = {"global": self.global_}
        for i, lv in enumerate(self.levels):
            out[f"level{i}"] = lv.materialize() if isinstance(lv, MappedLevel) else lv
        for i, keep in enumerate(self.coresets or []):
            out[f"coreset{i}"] = keep
        return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    # numpy has no bfloat16; hash the raw bytes through a same-size integer view.
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    return t.numpy().data


def content_sha256(tensors: Mapping[str, Level], *texts: str) -> str:
    """sha256 over the header texts, then names, shapes, dtypes and bytes of the tensors in name order.

    Covering the JSON texts too means an edited configuration is caught, not only edited features.
    Mapped levels are hashed in chunks of rows, each read through its own short-lived mapping.
    """
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if isinstance(t, MappedLevel):
            row_bytes = max(1, t.shape[1:].numel() * t.dtype.itemsize)
            step = max(1, _HASH_CHUNK_BYTES // row_bytes)
            for start in range(0, t.shape[0], step):
                h.update(_tensor_bytes(t.rows(start, min(start + step, t.shape[0]))))
        else:
            h.update(_tensor_bytes(t))
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


def load_model_file(path: str | os.PathLike, mmap: bool = False) -> tuple[FeatureBank, dict[str, Any]]:
    """Read and verify a model file -> (bank, config). Raises :class:`ModelFileError`.

    ``mmap``: leave the per-level pixel features in the file (:class:`MappedLevel`); only the global
    features are read into memory. The checksum is verified either way.
    """
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
            stamp = _file_stamp(p)
            tensors: dict[str, Level] = {}
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict and has no __iter__
                if mmap and k.startswith("level"):
                    sl = f.get_slice(k)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise ModelFileError(f"{p}: tensor {k} has unsupported dtype {sl.get_dtype()}")
                    tensors[k] = MappedLevel(p, k, tuple(sl.get_shape()), dtype, stamp)
                else:
                    tensors[k] = f.get_tensor(k)
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
    # Joint features are one concatenated level; a coreset is one index tensor per level.
    n_levels = 1 if config.get("joint_levels") else len(config.get("levels", ()))
    names = ["global", *(f"level{i}" for i in range(n_levels))]
    if config.get("coreset") is not None:
        names += [f"coreset{i}" for i in range(n_levels)]
    missing = [k for k in names if k not in tensors]
    if missing:
        raise ModelFileError(f"{p}: missing tensors {missing}")
    coresets = None
    if config.get("coreset") is not None:  # never mapped: only "level*" tensors stay in the file
        coresets = [cast(torch.Tensor, tensors[f"coreset{i}"]) for i in range(n_levels)]
    bank = FeatureBank(
        cast(torch.Tensor, tensors["global"]), [tensors[f"level{i}"] for i in range(n_levels)], paths, coresets
    )
    n = len(bank)
    if len(paths) != n or any(lv.shape[0] != n for lv in bank.levels):
        raise ModelFileError(f"{p}: inconsistent bank: {n} global features, {len(paths)} file names")
    for i, keep in enumerate(coresets or []):
        size = bank.levels[i].shape[:3].numel()
        if (
            keep.dtype != torch.int64
            or keep.ndim != 1
            or (len(keep) and not 0 <= int(keep.min()) <= int(keep.max()) < size)
        ):
            raise ModelFileError(f"{p}: coreset{i} is not a list of positions of level {i}")
    return bank, config


_SAFETENSORS_DTYPES = {v: k for k, v in _DTYPES.items()}


class StreamingModelFile:
    """Write a model file whose features arrive in pieces, without the whole bank in memory.

    Rows go into a temp data file next to ``path`` at their final offsets (any order); :meth:`finish`
    then hashes that file in chunks and writes the same format-1 safetensors file as
    :func:`save_model_file` (same tensors, same checksum), atomically. ``shapes``: tensor name ->
    (N, ...) in the stored dtype, named as in a model file (``global``, ``level0`` ...).
    """

    def __init__(self, path: str | os.PathLike, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.layout: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        offset = 0
        for name in sorted(shapes):  # the order content_sha256 hashes in, so hashing reads the file once
            shape, dtype = shapes[name]
            row = torch.Size(shape[1:]).numel() * dtype.itemsize
            self.layout[name] = (tuple(shape), dtype, offset, row)
            offset += shape[0] * row
        self.size = offset
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data", dir=self.path.parent)
        self.data_path = Path(tmp)
        self._f = os.fdopen(fd, "wb+")
        self._f.truncate(self.size)

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (n, ...) of tensor ``name`` from row ``start`` on."""
        shape, dtype, offset, row = self.layout[name]
        if rows.dtype != dtype or tuple(rows.shape[1:]) != shape[1:] or start + len(rows) > shape[0]:
            raise ValueError(f"{name}: rows {tuple(rows.shape)} {rows.dtype} do not fit {shape} {dtype} at {start}")
        self._f.seek(offset + start * row)
        self._f.write(_tensor_bytes(rows))

    def finish(self, config: dict[str, Any], paths: list[str]) -> Path:
        """Hash, write header + data to ``path`` atomically, remove the temp data file; returns the path."""
        self._f.flush()
        config_json, files_json = json.dumps(config, sort_keys=True), json.dumps(paths)
        h = hashlib.sha256()
        for text in (config_json, files_json):
            h.update(text.encode())
            h.update(b"\0")
        header: dict[str, Any] = {}
        for name, (shape, dtype, offset, row) in self.layout.items():
            h.update(f"{name}|{shape}|{dtype}|".encode())
            self._f.seek(offset)
            left = shape[0] * row
            while left:
                block = self._f.read(min(left, _HASH_CHUNK_BYTES))
                h.update(block)
                left -= len(block)
            end = offset + shape[0] * row
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        header["__metadata__"] = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "config": config_json,
            "train_files": files_json,
            "content_sha256": h.hexdigest(),
        }
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)  # safetensors pads the header with spaces to 8-byte alignment

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                out.write(len(head).to_bytes(8, "little"))
                out.write(head)
                self._f.seek(0)
                while block := self._f.read(_HASH_CHUNK_BYTES):
                    out.write(block)

        try:
            atomic_write(self.path, write)
        finally:
            self.close()
        return self.path

    def close(self) -> None:
        """Drop the temp data file (also on failure; the model file is then never written)."""
        self._f.close()
        self.data_path.unlink(missing_ok=True)
