"""Tensor files read and written without holding a model in memory.

Reading: `.bin`/`.pt` files are opened with `torch.load(mmap=True, weights_only=True)` and
safetensors files by parsing their header and reading each tensor's byte range with plain reads
(no mmap, so resident memory stays one tensor), so shapes and dtypes are known before any data is
read, and a tensor's bytes are read only when it is copied.

Writing: `SafetensorsWriter` lays out a whole safetensors file from a plan (name -> shape, dtype),
writes the header first and then memory-maps one tensor's byte range at a time (`region`). A
tensor can therefore be filled piece by piece from several source shards (a tensor-parallel
checkpoint holds a slice of every tensor in every shard) while only one source shard and one
output tensor are resident. `TorchFileWriter` does the same for a `torch.save` file (SAT shards).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from openglm.io.checkpoint import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class ConvertError(CheckpointError):
    """A checkpoint to convert is not what its format promises; the message names the file and tensor."""


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor memory-mapped from a file (read-only, or shared and
    already written: the page cache keeps the data): the kernel re-reads them from the file if they
    are touched again, so this is always safe, and it keeps a finished tensor's pages from counting
    against this process until the whole file is closed."""
    if _LIBC is None or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    low = -(-tensor.data_ptr() // page) * page  # only pages wholly inside the tensor
    high = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if high > low:
        _LIBC.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED)


_CONVERT_BLOCK_BYTES = 16 << 20  # rows of a tensor converted to another dtype at a time (`copy_into`)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


class TensorFile:
    """One weights file: names, shapes and dtypes without reading tensor data, then tensors one at
    a time. A torch file (`.bin`/`.pt`) is memory-mapped and each tensor's pages are released
    after use (`release`); a safetensors file is read with plain reads from its header's offsets,
    so only the tensor (or rows) asked for are ever resident."""

    def __init__(self, path: Path, key: str | None = None) -> None:
        """`key`: the entry of a torch file that holds the state dict ("module" in SAT shards)."""
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}
        self._header: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)
        if not path.is_file():
            raise ConvertError(f"{path}: missing")
        if path.suffix == ".safetensors":
            self._read_header()
            self._names = list(self._header)
            return
        try:
            loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad or unsafe file
            raise ConvertError(f"{path}: cannot be read as a torch weights file with weights_only=True ({err})") from None
        if key is not None:
            if not isinstance(loaded, dict) or key not in loaded:
                raise ConvertError(f"{path}: expected a dict with a {key!r} entry")
            loaded = loaded[key]
        if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
            raise ConvertError(f"{path}: expected a state dict of tensors")
        self._tensors = loaded
        self._names = list(loaded)

    def _read_header(self) -> None:
        size = self.path.stat().st_size
        try:
            with self.path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8:
                    raise ValueError(f"header length {length} exceeds the file")
                header = json.loads(handle.read(length))
            start = 8 + length
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                dtype, shape = TORCH_DTYPES[info["dtype"]], tuple(info["shape"])
                if end - begin != math.prod(shape) * dtype.itemsize or start + end > size:
                    raise ValueError(f"tensor {name} has bad data offsets")
                self._header[name] = (dtype, shape, start + begin)
        except (ValueError, KeyError, TypeError, struct.error) as err:
            raise ConvertError(f"{self.path}: damaged or not a safetensors file ({err})") from None

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._header[name][1] if self._header else tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._header[name][0] if self._header else self._tensors[name].dtype

    def tensor(self, name: str, index: tuple[slice, ...] = ()) -> torch.Tensor:
        """The tensor, or the part `index` of it (a view of the mapping for torch files; for
        safetensors a fresh tensor)."""
        if not self._header:
            return self._tensors[name][index]
        dtype, shape, _ = self._header[name]
        out = torch.empty(torch.empty(shape, device="meta")[index].shape, dtype=dtype)
        self.read_into(name, index, out)
        return out

    def read_into(self, name: str, index: tuple[slice, ...], out: torch.Tensor) -> None:
        """Copy the part `index` of tensor `name` into `out`. From safetensors, rows go straight from
        the file into a contiguous `out`; other slices pass through one scratch buffer reused for
        every tensor, so reading leaves no garbage behind in the allocator."""
        if not self._header:  # memory-mapped: copied in row blocks, each block's pages let go after
            source = self._tensors[name][index]
            if source.dim() == 0 or not source.is_contiguous():
                out.copy_(source)
                return
            step = max(1, _CONVERT_BLOCK_BYTES // max(1, source[0].numel() * source.element_size()))
            for start in range(0, source.shape[0], step):
                block = source[start : start + step]
                out[start : start + step].copy_(block)
                _release_pages(block)
            return
        dtype, shape, offset = self._header[name]
        rows = range(shape[0])[index[0]] if index and shape else range(shape[0] if shape else 1)
        if rows.step != 1:
            raise ValueError("only unit-step row slices are read")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        rest = index[1:]
        direct = not rest and out.is_contiguous() and out.dtype == dtype
        if direct:
            target = out.reshape(-1).view(torch.uint8)
        else:
            if self._scratch.numel() < len(rows) * row_bytes:
                self._scratch = torch.empty(len(rows) * row_bytes, dtype=torch.uint8)
            target = self._scratch[: len(rows) * row_bytes]
        with self.path.open("rb") as handle:
            handle.seek(offset + rows.start * row_bytes)
            handle.readinto(target.numpy())
        if not direct:
            out.copy_(target.view(dtype).view(len(rows), *shape[1:])[(slice(None), *rest)])

    def copy_into(self, name: str, out: torch.Tensor) -> None:
        """Copy the whole tensor `name` into `out` (its shape), converting to `out`'s dtype: read
        straight into `out` where the dtypes agree, else through one tensor of the file's dtype."""
        if not self._header or self._header[name][0] == out.dtype or out.dim() == 0:
            self.read_into(name, (), out)
        else:  # converted in blocks of rows through the scratch buffer: no whole-tensor temporary
            dtype, shape, _ = self._header[name]
            step = max(1, _CONVERT_BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
            for start in range(0, shape[0], step):
                self.read_into(name, (slice(start, start + step),), out[start : start + step])
        self.release(name)

    def release(self, name: str) -> None:
        """Done with `name`: let its memory-mapped pages go."""
        if name in self._tensors:
            _release_pages(self._tensors[name])

    def close(self) -> None:
        """Drop the mapping (and the scratch buffer) so that their pages leave this process."""
        self._tensors = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)


@contextmanager
def open_tensors(path: Path, key: str | None = None) -> Iterator[TensorFile]:
    handle = TensorFile(path, key)
    try:
        yield handle
    finally:
        handle.close()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    return data


Plan = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Sink(Protocol):
    """Where converted tensors go: `region(name)` is a writable tensor of the planned shape."""

    def region(self, name: str) -> Any: ...


class SafetensorsWriter:
    """A safetensors file laid out from a plan and filled one tensor region at a time."""

    def __init__(self, path: Path, plan: Plan, metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self.plan = plan
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        self._offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in plan.items():
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._offsets[name] = offset
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._data_start = 8 + len(encoded)
        with path.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            handle.truncate(self._data_start + offset)  # sparse until filled

    @contextmanager
    def region(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor `name` as a writable view of the file; unmapped (and so no longer resident)
        when the block ends."""
        shape, dtype = self.plan[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            yield torch.empty(shape, dtype=dtype)
            return
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=self._data_start + self._offsets[name], shape=(nbytes,))
        view = torch.frombuffer(mapped, dtype=torch.uint8).view(dtype).view(shape)
        try:
            yield view
        finally:
            del view
            mapped.flush()
            del mapped

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with self.region(name) as target:
            target.copy_(tensor)


class TorchFileWriter:
    """A file as `torch.save({key: tensors})` (or `torch.save(tensors)`) writes it, laid out from a
    plan and filled one tensor region at a time, so writing never holds more than one tensor:
    `torch.serialization.skip_data` writes the pickle and reserves each tensor's bytes (the
    placeholders are never touched, so they take no memory), then the file is memory-mapped shared
    and each region is written in place and its pages released. Use it as a context manager."""

    def __init__(self, path: Path, plan: Plan, key: str | None = None) -> None:
        self.path = path
        placeholders = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in plan.items()}
        with torch.serialization.skip_data():
            torch.save(placeholders if key is None else {key: placeholders}, path)
        del placeholders
        previous = torch.serialization.get_default_mmap_options()
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)
        try:
            loaded = torch.load(path, mmap=True, weights_only=True)
        finally:
            torch.serialization.set_default_mmap_options(previous)
        self._tensors: dict[str, torch.Tensor] | None = loaded if key is None else loaded[key]

    def __enter__(self) -> TorchFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tensors = None  # unmaps the file; its pages are already in the page cache

    @contextmanager
    def region(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor `name` as a writable view of the file; its pages are released when the
        block ends (they are in the file: a shared mapping writes through the page cache)."""
        assert self._tensors is not None, "the writer is closed"
        tensor = self._tensors[name]
        try:
            yield tensor
        finally:
            _release_pages(tensor)


def check_shape(path: Path, name: str, actual: tuple[int, ...], expected: tuple[int, ...], config_file: Path) -> None:
    if tuple(actual) != tuple(expected):
        raise ConvertError(
            f"{path}: tensor {name} has shape {tuple(actual)}, but {config_file.name} implies {tuple(expected)} "
            f"(does {config_file} belong to these weights?)"
        )


def check_names(handle: TensorFile, shapes: dict[str, tuple[int, ...]], config_file: Path) -> None:
    """The file holds exactly the parameters `shapes` lists, each of that shape."""
    names = set(handle.names())
    missing, unexpected = sorted(set(shapes) - names), sorted(names - set(shapes))
    if missing or unexpected:
        raise ConvertError(f"{handle.path}: does not match {config_file} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, shape in shapes.items():
        check_shape(handle.path, name, handle.shape(name), shape, config_file)
