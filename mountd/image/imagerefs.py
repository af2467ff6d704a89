"""External files an image refers to, read from its header before QEMU ever opens it.

QEMU opens a qcow2 external data file and every VMDK extent as soon as it opens the image, even for
``qemu-img info``; a crafted image can name a device, a protocol (``nbd:``, ``json:``, ``http:``) or another
user's file there. So those names are read here, with bounded parsers, and checked by
:func:`resolve_reference` before any QEMU program sees the image. Backing files are read from the header
too, so the whole chain is known without letting QEMU follow it.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from mountd.errors import InvalidImageError, UnsupportedError

UML_COW_MAGIC = b"OOOM"
QCOW2_MAGIC = b"QFI\xfb"
QED_MAGIC = b"QED\x00"
VMDK_SPARSE_MAGIC = b"KDMV"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
VHD_FOOTER_COOKIE = b"conectix"
UDIF_TRAILER = b"koly" + struct.pack(">II", 4, 512)  # signature, version, header size
QCOW2_EXT_DATA_FILE = 0x44415441
QCOW2_EXT_BACKING_FORMAT = 0xE2792ACA
HEADER_READ = 64 * 1024
MAX_DESCRIPTOR = 64 * 1024
# A protocol prefix: letters, digits, '+', '-' or '.' before the first ':' and before any '/'.
PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class References:
    backing: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    extents: tuple[str, ...] = ()


def scan_references(fd: int, name: str) -> References:
    """The external names in the header of the file open at ``fd`` (called ``name``); raises for formats
    nothing can read (UML cow). Reads through a duplicate of ``fd``: nothing is opened by name."""
    try:
        with open(os.dup(fd), "rb") as f:
            f.seek(0)
            return _scan(f, name)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{name} is corrupt: {exc.message}") from None


def scan_head(head: bytes, name: str) -> References:
    """The external names in an image whose first bytes are ``head`` (an OVA's disk: names past them are
    refused as corrupt, which is what a disk that must name nothing deserves)."""
    try:
        return _scan(io.BytesIO(head), name)
    except InvalidImageError as exc:
        raise InvalidImageError(f"{name} is corrupt: {exc.message}") from None


def _scan(f: BinaryIO, path: str) -> References:
    head = f.read(HEADER_READ)
    if head.startswith(UML_COW_MAGIC) or head[:4] == UML_COW_MAGIC[::-1]:
        raise UnsupportedError(
            f"{path} is a User-Mode-Linux COW file, which QEMU cannot read: merge it into its backing "
            "file with uml_moo (Debian package uml-utilities) and mount the result"
        )
    if head.startswith(QCOW2_MAGIC):
        return _qcow2_references(f, head)
    if head.startswith(QED_MAGIC):
        return _qed_references(f, head)
    if head.startswith(VMDK_SPARSE_MAGIC):
        return _vmdk_sparse_references(f, head)
    if head.startswith(VMDK_DESCRIPTOR):
        return _vmdk_descriptor_references(head)
    return References()


def trailer_format(fd: int) -> str | None:
    """The format of an image that QEMU's probe takes for raw because its header is at the end: a fixed VHD
    (raw data plus a 512-byte "conectix" footer) or an Apple DMG (UDIF: a 512-byte "koly" trailer, version
    4; QEMU recognises DMG only by the file name's ".dmg", which ``/proc/self/fd/N`` does not have)."""
    size = os.fstat(fd).st_size
    tail = os.pread(fd, 12, size - 512) if size >= 512 else b""
    if tail[:8] == VHD_FOOTER_COOKIE:
        return "vpc"
    if tail == UDIF_TRAILER:
        return "dmg"
    return None


def _read_name(f: BinaryIO, offset: int, size: int, what: str) -> str:
    if size == 0:
        raise InvalidImageError(f"the image header names an empty {what}")
    if size > 4096:
        raise InvalidImageError(f"the image header's {what} name is {size} bytes long (corrupt header)")
    f.seek(offset)
    raw = f.read(size)
    if len(raw) != size or b"\x00" in raw:
        raise InvalidImageError(f"the image header's {what} name lies outside the file or is corrupt")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidImageError(f"the image header's {what} name is not valid UTF-8") from None


def _qcow2_references(f: BinaryIO, head: bytes) -> References:
    if len(head) < 72:
        raise InvalidImageError("the qcow2 header is truncated")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", head, 4)
    backing = _read_name(f, backing_offset, backing_size, "backing file") if backing_offset else None
    if version < 2:  # qcow (version 1) has no header extensions
        return References(backing=backing)
    header_length = struct.unpack_from(">I", head, 100)[0] if version >= 3 and len(head) >= 104 else 72
    fmt = data_file = None
    pos = header_length
    for _ in range(1024):  # header extensions: type, length, data padded to 8 bytes; bounded by HEADER_READ
        if pos + 8 > len(head):
            break
        ext_type, ext_len = struct.unpack_from(">II", head, pos)
        if ext_type == 0:
            break
        data = head[pos + 8 : pos + 8 + ext_len]
        if len(data) != ext_len:
            raise InvalidImageError("a qcow2 header extension runs past the header")
        if ext_type == QCOW2_EXT_DATA_FILE:
            data_file = _decode(data, "external data file")
        elif ext_type == QCOW2_EXT_BACKING_FORMAT:
            fmt = _decode(data, "backing format")
        pos += 8 + ((ext_len + 7) & ~7)
    return References(backing=backing, backing_format=fmt, data_file=data_file)


def _qed_references(f: BinaryIO, head: bytes) -> References:
    if len(head) < 64:
        raise InvalidImageError("the QED header is truncated")
    features = struct.unpack_from("<Q", head, 24)[0]
    backing_offset, backing_size = struct.unpack_from("<II", head, 56)
    if not features & 1:  # QED_F_BACKING_FILE
        return References()
    fmt = "raw" if features & 4 else None  # QED_F_BACKING_FORMAT_NO_PROBE
    return References(backing=_read_name(f, backing_offset, backing_size, "backing file"), backing_format=fmt)


def _vmdk_sparse_references(f: BinaryIO, head: bytes) -> References:
    """A sparse VMDK is its own one extent: QEMU reads only the parent from its embedded descriptor
    (``vmdk_open_vmdk4`` never opens the extents it lists). Those still name the file the disk was written
    as, which every OVA export renames, so they are not references."""
    if len(head) < 512:
        raise InvalidImageError("the VMDK header is truncated")
    desc_sector, desc_sectors = struct.unpack_from("<QQ", head, 28)
    if desc_sector == 0 or desc_sectors == 0:
        return References()  # a stream-optimized or split extent without an embedded descriptor
    if desc_sectors * 512 > MAX_DESCRIPTOR:
        raise InvalidImageError("the VMDK embedded descriptor is implausibly large (corrupt header)")
    f.seek(desc_sector * 512)
    described = _vmdk_descriptor_references(f.read(desc_sectors * 512))
    return References(backing=described.backing, backing_format=described.backing_format)


_EXTENT_LINE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+\d+\s+(\w+)\s*(?:"([^"]*)")?')
_PARENT_LINE = re.compile(r'^\s*parentFileNameHint\s*=\s*"([^"]*)"')


def _vmdk_descriptor_references(text: bytes) -> References:
    extents: list[str] = []
    parent = None
    for line in text[:MAX_DESCRIPTOR].split(b"\x00", 1)[0].decode(errors="replace").splitlines():
        if m := _EXTENT_LINE.match(line):
            if m.group(2).upper() != "ZERO":
                extents.append(m.group(3) or "")
        elif m := _PARENT_LINE.match(line):
            parent = m.group(1)
    return References(backing=parent, backing_format="vmdk" if parent else None, extents=tuple(extents))


def _decode(data: bytes, what: str) -> str:
    try:
        return data.rstrip(b"\x00").decode()
    except UnicodeDecodeError:
        raise InvalidImageError(f"the qcow2 {what} name is not valid UTF-8") from None


def reference_path(image: str, name: str, what: str) -> str:
    """The path that ``image`` names as its ``what``, as QEMU would combine it (relative to the image's
    directory), checked only as text: whoever opens it resolves it, with their own rights."""
    if not name:
        raise InvalidImageError(f"{image} names an empty {what}")
    if PROTOCOL.match(name):  # json:, nbd:, http:, ... (an absolute or ./ path never matches)
        raise InvalidImageError(
            f"{image} names a protocol as its {what} ({name[:200]!r}): only plain files are allowed"
        )
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(image), name)
