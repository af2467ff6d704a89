"""The members of a tar archive (an OVA), read from its headers alone: name, data offset and size.

Nothing is extracted: each member's bytes stay where they are, and QEMU reads a disk in place through a raw
``offset``/``size`` child (:mod:`mountd.image.ova`). The archive is untrusted, so every number is checked
before it is used and the work is bounded: at most :data:`MAX_MEMBERS` headers, names of at most
:data:`MAX_NAME` bytes, extended (pax, GNU long-name) headers of at most :data:`MAX_EXTENDED` bytes, and
every member's data inside the file. Formats read: ustar (POSIX), GNU (base-256 sizes, ``L`` long names) and
pax (``path`` and ``size`` records), which is what VirtualBox, VMware's ovftool and GNU tar write.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from mountd.errors import InvalidImageError
from mountd.image.blockio import BlockReader

BLOCK = 512
MAX_MEMBERS = 1024  # an OVA holds a descriptor, a manifest, a certificate and its disks
MAX_NAME = 4096
MAX_EXTENDED = 64 * 1024
USTAR_MAGIC_AT = 257
REGULAR = (b"0", b"\x00", b"7")  # '7': contiguous file, read as a regular one
SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"K", b"V")  # links, devices, directories, fifos, volume label
PAX_LOCAL, PAX_GLOBAL, GNU_LONG_NAME = b"x", b"g", b"L"


@dataclass(frozen=True)
class Member:
    """A regular file in the archive: its bytes are ``[offset, offset + size)`` of the archive file."""

    name: str
    offset: int
    size: int


def is_tar(reader: BlockReader) -> bool:
    """A ustar header at the start (POSIX ``ustar\\0`` or GNU ``ustar  ``): what an OVA must be."""
    return reader.read(USTAR_MAGIC_AT, 5) == b"ustar"


def read_members(reader: BlockReader) -> list[Member]:
    """Every regular file of the archive, in order; an :class:`InvalidImageError` naming the first header
    that is not sound (bad checksum or number, a name or member that runs past its bounds, too many)."""
    return list(members_of(reader))


def members_of(reader: BlockReader) -> Iterator[Member]:
    """The regular files of the archive as their headers are read (the first without reading the rest)."""
    count = 0
    pending: dict[str, str] = {}  # what extended headers say of the next member: "path", "size"
    pos = 0
    for _ in range(MAX_MEMBERS * 2 + 2):  # each member may come with one extended header
        header = reader.read(pos, BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            return  # end of archive (two zero blocks, or a missing end marker)
        size = _checked(header, pos)
        data = pos + BLOCK
        if size > reader.size - data:
            raise InvalidImageError(f"the tar member at offset {pos} claims {size} bytes, past the end of "
                                    "the file (truncated or corrupt archive)")
        kind = header[156:157]
        if kind in (PAX_LOCAL, GNU_LONG_NAME):
            pending.update(_extended(reader, data, size, kind, pos))
        elif kind in REGULAR:
            count += 1
            if count > MAX_MEMBERS:
                raise InvalidImageError(f"the archive holds more than {MAX_MEMBERS} files: not an OVA")
            member = _member(header, data, size, pending, reader.size)
            size, pending = member.size, {}
            yield member
        elif kind not in SKIPPED and kind != PAX_GLOBAL:
            raise InvalidImageError(f"the tar member at offset {pos} is of a kind imgmount does not read "
                                    f"({kind!r}: sparse or multi-volume archives are not OVAs)")
        pos = data + _padded(size)
    raise InvalidImageError(f"the archive holds more than {MAX_MEMBERS} files: not an OVA")


def _checked(header: bytes, pos: int) -> int:
    """The header's data size, once its checksum is right (the checksum field counts as eight spaces)."""
    stored = _number(header[148:156], pos, "checksum")
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        raise InvalidImageError(f"the tar header at offset {pos} has a bad checksum (corrupt archive)")
    return _number(header[124:136], pos, "size")


def _number(field: bytes, pos: int, what: str) -> int:
    """An octal number (NUL or space terminated), or GNU's base-256 (first byte 0x80; 0xff: negative)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    if not text:
        return 0
    if field[:1] == b"\xff" or not all(0x30 <= c <= 0x37 for c in text):
        raise InvalidImageError(f"the tar header at offset {pos} has a bad {what} field (corrupt archive)")
    return int(text, 8)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _extended(reader: BlockReader, data: int, size: int, kind: bytes, pos: int) -> dict[str, str]:
    """What a pax header (``path``, ``size``) or a GNU long name says of the member that follows."""
    if size > MAX_EXTENDED:
        raise InvalidImageError(f"the extended tar header at offset {pos} is {size} bytes long, more than "
                                f"the {MAX_EXTENDED} imgmount reads (corrupt archive)")
    raw = reader.read(data, size)
    if kind == GNU_LONG_NAME:
        return {"path": _name(raw.split(b"\x00", 1)[0], pos)}
    return _pax_records(raw, pos)


def _pax_records(raw: bytes, pos: int) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records; only ``path`` and ``size`` matter here."""
    found: dict[str, str] = {}
    at = 0
    while at < len(raw) and raw[at:at + 1] != b"\x00":
        length_text, space, _ = raw[at:at + 20].partition(b" ")
        if not space or not length_text.isdigit() or int(length_text) <= len(length_text) + 1 \
                or at + int(length_text) > len(raw):
            raise InvalidImageError(f"the pax header at offset {pos} has a malformed record (corrupt "
                                    "archive)")
        record = raw[at + len(length_text) + 1:at + int(length_text)].rstrip(b"\n")
        key, equals, value = record.partition(b"=")
        if not equals:
            raise InvalidImageError(f"the pax header at offset {pos} has a record without a value (corrupt "
                                    "archive)")
        if key == b"path":
            found["path"] = _name(value, pos)
        elif key == b"size":
            if not value.isdigit() or len(value) > 20:
                raise InvalidImageError(f"the pax header at offset {pos} has a bad size (corrupt archive)")
            found["size"] = value.decode()
        at += int(length_text)
    return found


def _name(raw: bytes, pos: int) -> str:
    if not raw or len(raw) > MAX_NAME:
        raise InvalidImageError(f"the tar member at offset {pos} has an empty or overlong name")
    return raw.decode(errors="replace")


def _member(header: bytes, data: int, size: int, pending: dict[str, str], file_size: int) -> Member:
    name = pending.get("path") or _ustar_name(header)
    if "size" in pending:
        size = int(pending["size"])
        if size > file_size - data:
            raise InvalidImageError(f"tar member {name[:200]!r} claims {size} bytes, past the end of the "
                                    "file (truncated or corrupt archive)")
    return Member(name.removeprefix("./"), data, size)


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0] if header[257:263] == b"ustar\x00" else b""  # not GNU's
    return (prefix + b"/" + name if prefix else name).decode(errors="replace")
