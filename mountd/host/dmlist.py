"""The device-mapper devices that exist, asked of the kernel itself (the DM_LIST_DEVICES and DM_DEV_STATUS
ioctls on /dev/mapper/control, as ``dmsetup info`` does) rather than by running ``dmsetup``: a device's check
reads this list, and under emulation each ``dmsetup`` took a third of a second of CPU (the VM lane ran 1,700).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from mountd.errors import FailedError

CONTROL = "/dev/mapper/control"
#: struct dm_ioctl (linux/dm-ioctl.h): version[3], data_size, data_start, target_count, open_count, flags,
#: event_nr, padding, dev, name[128], uuid[129], data[7].
DM_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
DM_VERSION = (4, 0, 0)  # the interface's major version; the kernel answers with its own
DM_LIST_DEVICES, DM_DEV_STATUS, DM_TABLE_STATUS = 2, 7, 12
DM_READONLY_FLAG, DM_STATUS_TABLE_FLAG, DM_BUFFER_FULL_FLAG = 1 << 0, 1 << 4, 1 << 8
#: struct dm_name_list: dev, next (the offset of the next entry from this one; 0 ends the list), name.
NAME_LIST = struct.Struct("=QI")
#: struct dm_target_spec: sector_start, length, status, next (the offset of the next one from the start of
#: the data), target_type[16]; its parameters follow it as a string.
TARGET_SPEC = struct.Struct("=QQiI16s")
FIRST_BUFFER, MAX_BUFFER = 16 << 10, 16 << 20


class Header(NamedTuple):
    """The fields of struct dm_ioctl that the kernel answers in (see :data:`DM_IOCTL`)."""

    data_size: int
    data_start: int
    target_count: int
    open_count: int
    flags: int
    dev: int
    uuid: str

    @classmethod
    def unpack(cls, buffer: bytes | bytearray) -> Header:
        f = DM_IOCTL.unpack_from(buffer)
        return cls(f[3], f[4], f[5], f[6], f[7], f[10], _text(f[12]))


@dataclass(frozen=True)
class DmDevice:
    name: str
    uuid: str
    devnum: str  # "major:minor"
    read_only: bool
    open_count: int

    @property
    def sysname(self) -> str:
        """``dm-N``, its name under /sys/block."""
        return os.path.basename(os.path.realpath(f"/sys/dev/block/{self.devnum}"))


def dm_devices() -> list[DmDevice]:
    """Every device-mapper device, with its open count (a device removed meanwhile is left out; a kernel
    without device-mapper has none)."""
    with _control() as fd:
        if fd < 0:
            return []
        found = (_status(fd, name) for name in _names(fd))
        return [device for device in found if device is not None]


def dm_table(name: str) -> list[list[str]] | None:
    """The live table of the device ``name`` as ``dmsetup table`` shows it, a row of words per target
    (start, length, type, its parameters); None if there is no such device."""
    with _control() as fd:
        if fd < 0:
            return None
        try:
            header, data = _call_growing(fd, DM_TABLE_STATUS, name, DM_STATUS_TABLE_FLAG)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise
        return list(parse_targets(data, header.target_count))


@contextlib.contextmanager
def _control() -> Iterator[int]:
    """The control device open (-1 where the kernel has no device-mapper); any other failure, of it or of
    an ioctl on it, is a FailedError naming it."""
    try:
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV):
            yield -1
            return
        raise FailedError(f"cannot open {CONTROL}: {exc.strerror}") from None
    try:
        yield fd
    except OSError as exc:
        raise FailedError(f"device-mapper refused a query ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _names(fd: int) -> list[str]:
    _, data = _call_growing(fd, DM_LIST_DEVICES, "", 0)
    return list(parse_name_list(data))


def _call_growing(fd: int, command: int, name: str, flags: int) -> tuple[Header, bytes]:
    """:func:`_call`, again with a larger buffer while the kernel says its answer did not fit."""
    size = FIRST_BUFFER
    while True:
        header, data = _call(fd, command, name, size, flags)
        if not header.flags & DM_BUFFER_FULL_FLAG:
            return header, data
        if size >= MAX_BUFFER:
            raise OSError(errno.ENOBUFS, f"a device-mapper answer of more than {MAX_BUFFER} bytes")
        size *= 4


def _status(fd: int, name: str) -> DmDevice | None:
    try:
        header, _ = _call(fd, DM_DEV_STATUS, name, DM_IOCTL.size)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # removed since the list was read
            return None
        raise
    return DmDevice(name, header.uuid, f"{os.major(header.dev)}:{os.minor(header.dev)}",
                    bool(header.flags & DM_READONLY_FLAG), header.open_count)


def _call(fd: int, command: int, name: str, size: int, flags: int = 0) -> tuple[Header, bytes]:
    """One dm ioctl with a buffer of ``size`` bytes: the header the kernel wrote back, and its data part."""
    request = (3 << 30) | (DM_IOCTL.size << 16) | (0xFD << 8) | command  # _IOWR(0xfd, command, dm_ioctl)
    header = DM_IOCTL.pack(*DM_VERSION, size, DM_IOCTL.size, 0, 0, flags, 0, 0, 0, name.encode(), b"", b"")
    buffer = bytearray(header.ljust(size, b"\0"))
    fcntl.ioctl(fd, request, buffer)
    out = Header.unpack(buffer)
    return out, bytes(buffer[out.data_start:min(out.data_size, size)])


def parse_name_list(data: bytes) -> Iterator[str]:
    """The names in a DM_LIST_DEVICES answer (empty data, or an entry with device number 0: no devices)."""
    offset = 0
    while offset + NAME_LIST.size <= len(data):
        dev, step = NAME_LIST.unpack_from(data, offset)
        if dev == 0:
            return
        yield _text(data[offset + NAME_LIST.size:])
        if step == 0 or offset + step >= len(data):
            return
        offset += step


def parse_targets(data: bytes, count: int) -> Iterator[list[str]]:
    """The ``count`` targets of a DM_TABLE_STATUS answer, each as start, length, type and parameter words."""
    offset = 0
    for _ in range(count):
        if offset + TARGET_SPEC.size > len(data):
            raise OSError(errno.EPROTO, "a device-mapper table answer ends inside a target")
        start, length, _status, following, kind = TARGET_SPEC.unpack_from(data, offset)
        yield [str(start), str(length), _text(kind), *_text(data[offset + TARGET_SPEC.size:]).split()]
        offset = following


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", errors="surrogateescape")
