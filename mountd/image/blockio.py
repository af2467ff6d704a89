"""Random-access readers over disk images, partitions and volumes.

Parsers (partition tables, LVM metadata, filesystem probes) read through :class:`BlockReader` so that the same
pure code runs on a raw file, on a window of it, and on any QEMU format served by
:mod:`mountd.image.nbdclient`.

Semantics of ``read(offset, length)``, like ``pread``: at most ``length`` bytes, fewer only at the end
of the device, and ``b""`` at or past the end. Callers check the length they got.
"""

from __future__ import annotations

import os
from typing import Protocol


class BlockReader(Protocol):
    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class FileReader:
    """Reads a regular file or block device through an open descriptor (the caller owns its lifetime)."""

    def __init__(self, fd: int, size: int | None = None) -> None:
        self._fd = fd
        # lseek to the end sizes block devices too (their st_size is 0).
        self._size = os.lseek(fd, 0, os.SEEK_END) if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = _clamp(offset, length, self._size)
        return os.pread(self._fd, length, offset) if length else b""


class SliceReader:
    """A window ``[offset, offset + size)`` of another reader: a partition, or an LV's extent in a PV."""

    def __init__(self, base: BlockReader, offset: int, size: int) -> None:
        if offset < 0 or size < 0:
            raise ValueError("negative slice")
        self._base = base
        self._offset = offset
        self._size = max(0, min(size, base.size - offset))

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        length = _clamp(offset, length, self._size)
        return self._base.read(self._offset + offset, length) if length else b""


class BytesReader:
    """An in-memory image, for pure tests and property tests."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        length = _clamp(offset, length, len(self._data))
        return self._data[offset : offset + length]


def _clamp(offset: int, length: int, size: int) -> int:
    if offset < 0 or length < 0:
        raise ValueError(f"bad read: offset {offset}, length {length}")
    return max(0, min(length, size - offset))
