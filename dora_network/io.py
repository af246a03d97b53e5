"""Read and write adapter files: safetensors with kohya metadata and hashes, atomic saves, clear load errors.

Saves go to a temporary file in the target folder, are flushed and fsynced, then renamed over the target, so a
crash mid-save leaves the previous file intact. ``.ckpt``/``.pt`` files are read with ``weights_only=True``:
tensors only, never pickled code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

logger = logging.getLogger(__name__)

__all__ = ["load_file", "safetensors_hashes", "save_file"]

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def safetensors_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``sshs_model_hash`` and ``sshs_legacy_hash`` exactly as sd-scripts computes them.

    The file is serialised in memory with only the ``ss_*`` metadata; the model hash is the SHA-256 of the bytes
    after the 8-byte length and the JSON header, the legacy hash the first 8 hex digits of the SHA-256 of the
    64 KiB at offset 0x100000.
    """
    from safetensors.torch import save

    blob = save(dict(state_dict), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (Windows); the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> None:
    """Write ``state_dict`` atomically: safetensors (with metadata) or, for .ckpt/.pt, ``torch.save``.

    Args:
        path: destination; its folder must exist.
        state_dict: CPU, contiguous tensors.
        metadata: str -> str (safetensors only).

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save '{target}': folder '{folder}' does not exist; create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if target.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file as st_save

            st_save(dict(state_dict), tmp_name, dict(metadata or {}))
        else:
            torch.save(dict(state_dict), tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(folder)


def load_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file into CPU tensors and its metadata.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, truncated or corrupted, or a pickle file with non-tensor content.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"network weights '{source}' not found; check the path (--network_weights)")
    if source.suffix.lower() in _PICKLE_SUFFIXES:
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many types for bad pickles
            raise ValueError(
                f"'{source}' could not be read as a tensors-only checkpoint ({type(error).__name__}: {error}). "
                f"Only plain tensor dicts are loaded (weights_only=True: pickled code is never run); convert the "
                f"file to .safetensors"
            ) from error
        if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"'{source}' does not hold a dict of tensors; it is not a LoRA/DoRA file")
        return dict(loaded), {}
    from safetensors import safe_open

    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # noqa: BLE001 - safetensors raises SafetensorError/OSError/etc.
        size = source.stat().st_size
        raise ValueError(
            f"'{source}' ({size} bytes) is not a readable safetensors file: {error}. It may be truncated (an "
            f"interrupted download or save) or another format; re-download or re-save it"
        ) from error
    return tensors, metadata


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """The safetensors serialisation of ``state_dict`` (for tests and tools that need the bytes)."""
    from safetensors.torch import save

    return save(dict(state_dict), dict(metadata or {}))

