"""safetensors files read and rewritten one tensor at a time with plain file reads, so memory stays at one tensor.

``safe_open`` maps the file; the pages a reader touches stay resident, which for a whole checkpoint is about one
model copy of RSS. Here the header is parsed directly, each tensor is read into a fresh buffer, and a rewritten
file is produced by a streaming writer (8-byte aligned data, little-endian, as safetensors writes it).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch

__all__ = ["DTYPES", "read_header", "read_tensor", "read_tensor_at", "stream_copy"]

#: safetensors dtype codes -> torch dtypes this torch has (float8 needs torch >= 2.1).
DTYPES = {code: getattr(torch, name) for code, name in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, name)}
_CODES = {v: k for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (``__metadata__`` included) and the offset of its data.

    Raises:
        ValueError: not a readable safetensors file.
    """
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        if not isinstance(header, dict) or size > Path(path).stat().st_size:
            raise ValueError("bad header")
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"'{path}' is not a readable safetensors file ({error}); re-download or re-save it") from error
    return header, 8 + size


def read_tensor(handle: BinaryIO, info: Mapping[str, Any], start: int) -> torch.Tensor:
    """One tensor (header entry ``info``) read into a fresh buffer (no mmap pages left resident afterwards)."""
    begin, end = info["data_offsets"]
    handle.seek(start + begin)
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    if handle.readinto(memoryview(buffer.numpy())) != end - begin:
        raise ValueError(f"'{handle.name}' is truncated; re-download or re-save it")
    return buffer.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def read_tensor_at(path: Path, key: str, header: tuple[dict, int] | None = None) -> torch.Tensor:
    """Tensor ``key`` of a safetensors file, read alone (``header``: :func:`read_header`'s answer, if at hand)."""
    header, start = read_header(path) if header is None else header
    with open(path, "rb") as handle:
        return read_tensor(handle, header[key], start)


def stream_copy(source: Path, dest: Path, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
                save_dtype: torch.dtype | None, bar: Any = None) -> int:
    """Copy ``source`` to ``dest`` tensor by tensor, passing the tensors named in ``edits`` through their function.

    Args:
        source: the safetensors file to read.
        dest: the file to write (synced to disk before returning).
        edits: key -> function of the stored tensor returning the new one (same shape).
        save_dtype: cast every floating tensor to it; None keeps each tensor's dtype.
        bar: a progress bar updated once per tensor, or None.

    Returns:
        How many tensors were edited.

    Raises:
        ValueError: a tensor's dtype is one this torch cannot hold, or the file is unreadable.
    """
    header, start = read_header(source)
    metadata = header.pop("__metadata__", None)
    keys = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    out_header: dict = {"__metadata__": metadata} if metadata else {}
    offset, dtypes = 0, {}
    for key in keys:
        dtype = DTYPES.get(header[key]["dtype"])
        if dtype is None:
            raise ValueError(f"'{source}': tensor '{key}' has dtype {header[key]['dtype']}, which this torch cannot "
                             f"hold; upgrade torch or convert the checkpoint")
        if save_dtype is not None and dtype.is_floating_point:
            dtype = save_dtype
        nbytes = math.prod(header[key]["shape"]) * torch.empty((), dtype=dtype).element_size()
        out_header[key] = {"dtype": _CODES[dtype], "shape": header[key]["shape"], "data_offsets": [offset, offset + nbytes]}
        dtypes[key], offset = dtype, offset + nbytes
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
    modified = 0
    with open(source, "rb") as handle, open(dest, "wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for key in keys:
            tensor = read_tensor(handle, header[key], start)
            if key in edits:
                tensor = edits[key](tensor)
                modified += 1
            data = tensor.to(dtypes[key]).contiguous().reshape(-1).view(torch.uint8)  # safetensors: little-endian
            out.write(memoryview(data.numpy()))
            del tensor, data  # before the next read: the peak stays at one tensor
            if bar is not None:
                bar.update(1)
        out.flush()
        os.fsync(out.fileno())
    return modified
