"""Streaming safetensors I/O, one tensor at a time, with bf16 kept bit-exact.

The file format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the raw data. The reader memory-maps the file and validates the header against
the file size before anything is read, so a truncated or corrupt file fails with its
name. numpy has no bfloat16: bf16 tensors are returned as float32 (exact widening) or
as raw uint16 bits (``raw=True``).

For streaming without mapping whole tensors into memory, :meth:`SafetensorsReader.file_range`
names a tensor's bytes as a :class:`FileRange` (file descriptor, absolute offset, size), and
:meth:`SafetensorsWriter.write_chunks` writes one tensor from a sequence of chunks: buffers,
or ``FileRange`` pieces that the kernel copies file to file (``copy_file_range``) without the
bytes passing through this process's memory.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import numpy as np

from mindport.dtypes import ITEMSIZE, NUMPY_DTYPES
from mindport.errors import CheckpointError

_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code: F32, F16, BF16, ...
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


_COPY_STEP = 1 << 30  # bytes per copy_file_range call
_READ_STEP = 16 << 20  # bytes per pread when the kernel copy is unavailable


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes at absolute ``offset`` of the open file ``fd`` (``path`` for messages)."""

    path: str
    fd: int
    offset: int
    nbytes: int

    def sub(self, start: int, nbytes: int) -> "FileRange":
        """The ``nbytes`` bytes from ``start`` (relative to this range)."""
        if start < 0 or start + nbytes > self.nbytes:
            raise ValueError(f"{self.path}: sub-range {start}+{nbytes} outside a range of {self.nbytes} bytes")
        return FileRange(self.path, self.fd, self.offset + start, nbytes)

    def read(self) -> bytearray:
        """The bytes, read with ``pread`` (no memory map, so nothing stays resident afterwards)."""
        out = bytearray(self.nbytes)
        view, done = memoryview(out), 0
        while done < self.nbytes:
            got = os.preadv(self.fd, [view[done:done + _READ_STEP]], self.offset + done)
            if got == 0:
                raise CheckpointError(f"{self.path}: truncated file: expected {self.nbytes} bytes at offset "
                                      f"{self.offset}, file ends after {done}")
            done += got
        return out


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bits (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


class SafetensorsReader:
    """Read tensors lazily from one ``.safetensors`` file."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as err:
            raise CheckpointError(f"{path}: cannot open ({err.strerror})") from None
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} header bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check_entry(name, entry, size - self.data_start)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size > self.data_start else None

    def _check_entry(self, name: str, entry, data_size: int) -> TensorInfo:
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: tensor '{name}': malformed header entry") from None
        if dtype not in NUMPY_DTYPES:
            raise CheckpointError(f"{self.path}: tensor '{name}': unsupported dtype {dtype}")
        expected = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{self.path}: tensor '{name}': offsets {begin}..{end} hold {end - begin} bytes, "
                                  f"shape {list(shape)} {dtype} needs {expected}")
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated file: tensor '{name}' ends at byte {end} of the data, "
                                  f"which has only {data_size}")
        return TensorInfo(dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def raw_bytes(self, name: str) -> memoryview:
        info = self.tensors[name]
        if info.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._map)[self.data_start + info.begin:self.data_start + info.end]

    def file_range(self, name: str) -> FileRange:
        """Where tensor ``name``'s bytes are in the file (for chunked, unmapped reads and copies)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        info = self.tensors[name]
        return FileRange(self.path, self._file.fileno(), self.data_start + info.begin, info.nbytes)

    def get(self, name: str, raw: bool = False) -> np.ndarray:
        """The tensor as a numpy array (a read-only view of the file; bf16 -> fp32 unless ``raw``)."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor '{name}'")
        info = self.tensors[name]
        arr = np.frombuffer(self.raw_bytes(name), dtype=NUMPY_DTYPES[info.dtype]).reshape(info.shape)
        return bf16_bits_to_f32(arr) if info.dtype == "BF16" and not raw else arr

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the OS unmaps at exit
                pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def numpy_dtype_code(arr: np.ndarray) -> str:
    for code, dt in NUMPY_DTYPES.items():
        if code != "BF16" and np.dtype(dt) == arr.dtype:
            return code
    raise CheckpointError(f"numpy dtype {arr.dtype} has no safetensors code")


class SafetensorsWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time.

    Tensors must be written in the declared order; the caller handles atomic placement.
    """

    def __init__(self, path: str, entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata or {})}
        offset = 0
        self.order: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self._f: BinaryIO = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, data) -> None:
        """Append tensor ``name``: a numpy array or a bytes-like object of the declared size."""
        self.write_chunks(name, [data])

    def write_chunks(self, name: str, chunks: Iterable) -> None:
        """Append tensor ``name`` as consecutive chunks whose sizes add up to the declared size.

        A chunk is a numpy array, a bytes-like object or a :class:`FileRange` (copied file to
        file by the kernel; falls back to ``pread`` + ``write`` where ``copy_file_range`` is
        unavailable). Chunks are consumed one at a time, so a generator keeps at most one in
        memory.
        """
        if self._next >= len(self.order):
            raise CheckpointError(f"{self.path}: wrote '{name}' after all {len(self.order)} declared tensors")
        expected_name, nbytes = self.order[self._next]
        if name != expected_name:
            raise CheckpointError(f"{self.path}: wrote '{name}' where '{expected_name}' was declared next")
        written = 0
        for chunk in chunks:
            if isinstance(chunk, FileRange):
                size = chunk.nbytes
                if written + size <= nbytes:
                    self._copy_range(chunk)
            else:
                buf = memoryview(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk).cast("B")
                size = buf.nbytes
                if written + size <= nbytes:
                    self._f.write(buf)
            written += size
            if written > nbytes:
                break
        if written != nbytes:
            raise CheckpointError(f"{self.path}: tensor '{name}' has {written}{'+' if written > nbytes else ''} "
                                  f"bytes, declared {nbytes}")
        self._next += 1

    def _copy_range(self, src: FileRange) -> None:
        self._f.flush()
        out = self._f.fileno()
        pos = self._f.tell()
        done = 0
        while done < src.nbytes:
            try:
                got = os.copy_file_range(src.fd, out, min(src.nbytes - done, _COPY_STEP), src.offset + done,
                                         pos + done)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                got = -1
            if got < 0:  # no kernel copy between these files: bounded reads and writes
                for start in range(done, src.nbytes, _READ_STEP):
                    piece = memoryview(src.sub(start, min(_READ_STEP, src.nbytes - start)).read())
                    at = pos + start
                    while piece.nbytes:
                        put = os.pwrite(out, piece, at)
                        piece, at = piece[put:], at + put
                done = src.nbytes
            elif got == 0:
                raise CheckpointError(f"{src.path}: truncated file: expected {src.nbytes} bytes at offset "
                                      f"{src.offset}, file ends after {done}")
            else:
                done += got
        self._f.seek(pos + src.nbytes)

    def close(self) -> None:
        if self._next != len(self.order) and not self._f.closed:
            self._f.close()
            raise CheckpointError(f"{self.path}: closed after {self._next} of {len(self.order)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
