"""Read a LUKS header (version 1 or 2) without cryptsetup: what a volume needs to be opened and described.

LUKS1 (cryptsetup ``docs/on-disk-format.pdf``): a 592-byte big-endian header at 0: magic ``LUKS\\xba\\xbe``,
version 1, cipher name and mode, hash, the payload offset in 512-byte sectors, key size, digest, UUID, and
eight key slots. LUKS2 (``docs/on-disk-format-luks2.pdf``): a 4096-byte binary header (magic, version 2,
header size, sequence id, label, checksum algorithm, salt, UUID, subsystem, its own offset, checksum), then a
JSON area up to the header size; a second copy (magic ``SKUL\\xba\\xbe``) follows at that size. The data
lives in the JSON's ``segments``; its offset is a decimal string in bytes.

Bounds: the header size is one of the sizes the format allows (16 KiB to 4 MiB), so the JSON read is at most
4 MiB; the JSON is checked by its SHA-256 checksum where the header names that algorithm, and its nesting is
bounded before it is parsed. A damaged primary LUKS2 header falls back to the secondary one, as cryptsetup
does. Anything else that is wrong is a :class:`LuksHeaderError` naming what.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from mountd.errors import InvalidImageError
from mountd.image.blockio import BlockReader

MAGIC = b"LUKS\xba\xbe"
SECONDARY_MAGIC = b"SKUL\xba\xbe"
SECTOR = 512
LUKS1_HEADER_SIZE = 592
LUKS2_BINARY_SIZE = 4096
#: The header sizes LUKS2 allows (binary header + JSON area): 16 KiB .. 4 MiB, powers of two.
LUKS2_HEADER_SIZES = frozenset(16384 << n for n in range(9))
#: Nesting of the JSON area: cryptsetup's own objects go 4 levels deep; deeper is crafted.
MAX_JSON_DEPTH = 16

_LUKS1 = struct.Struct(">6sH32s32s32sII20s32sI40s")
_KEY_SLOT = struct.Struct(">II32sII")  # active, iterations, salt, key material offset (sectors), stripes
KEY_SLOTS, KEY_SLOT_AT = 8, 208
SLOT_ACTIVE, SLOT_INACTIVE = 0x00AC71F3, 0x0000DEAD
STRIPES = 4000  # the anti-forensic split every LUKS1 writer uses (and QEMU requires)
_LUKS2 = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_UUID = re.compile(r"[0-9A-Fa-f-]{1,40}")


class LuksHeaderError(InvalidImageError):
    """The LUKS header is damaged or crafted."""


@dataclass(frozen=True)
class LuksHeader:
    version: int  # 1 or 2
    uuid: str
    label: str  # LUKS2 only ("" for LUKS1)
    payload_offset: int  # bytes from the start of the volume to the encrypted data
    payload_size: int | None  # bytes; None: to the end of the volume
    cipher: str  # "aes-xts-plain64"
    sector_size: int  # the encryption sector size (LUKS1: always 512)

    @property
    def kind(self) -> str:
        """How ``--info`` names it: "LUKS1" or "LUKS2"."""
        return f"LUKS{self.version}"


def is_luks(reader: BlockReader) -> bool:
    return reader.read(0, len(MAGIC)) == MAGIC


def read_header(reader: BlockReader) -> LuksHeader | None:
    """The LUKS header at the start of ``reader``; None if there is none (no magic)."""
    head = reader.read(0, LUKS2_BINARY_SIZE)
    if not head.startswith(MAGIC):
        return None
    if len(head) < 8:
        raise LuksHeaderError("the LUKS header is cut short")
    version = struct.unpack_from(">H", head, 6)[0]
    if version == 1:
        return _luks1(head, reader.size)
    if version == 2:
        return _luks2(reader)
    raise LuksHeaderError(f"the LUKS header has version {version}, which imgmount does not know")


def _luks1(head: bytes, size: int) -> LuksHeader:
    if len(head) < LUKS1_HEADER_SIZE:
        raise LuksHeaderError("the LUKS1 header is cut short")
    (_, _, cipher_name, cipher_mode, _, payload_sectors, key_bytes, _, _, _,
     uuid) = _LUKS1.unpack_from(head)
    offset = payload_sectors * SECTOR
    if not LUKS1_HEADER_SIZE <= offset < size or key_bytes == 0:
        raise LuksHeaderError(f"the LUKS1 header's payload offset ({payload_sectors} sectors) is outside the "
                              f"volume ({size} bytes)")
    _check_key_slots(head, key_bytes, offset)
    return LuksHeader(version=1, uuid=_text(uuid, "UUID"), label="", payload_offset=offset, payload_size=None,
                      cipher=f"{_text(cipher_name, 'cipher')}-{_text(cipher_mode, 'cipher mode')}",
                      sector_size=SECTOR)


def _check_key_slots(head: bytes, key_bytes: int, payload: int) -> None:
    """Every key slot is enabled or disabled, and an enabled one keeps its key material (key size x 4000
    stripes) between the header and the data: what QEMU's luks driver, which reads them next, relies on."""
    if key_bytes > 256:  # 512-bit keys are the largest any cipher here takes; 256 bytes is already absurd
        raise LuksHeaderError(f"the LUKS1 header has a {key_bytes}-byte key")
    for n in range(KEY_SLOTS):
        active, _, _, material, stripes = _KEY_SLOT.unpack_from(head, KEY_SLOT_AT + n * _KEY_SLOT.size)
        if active == SLOT_INACTIVE:
            continue
        start = material * SECTOR
        if active != SLOT_ACTIVE or stripes != STRIPES or start < LUKS1_HEADER_SIZE or \
                start + key_bytes * stripes > payload:
            raise LuksHeaderError(f"LUKS1 key slot {n} is damaged (its key material is not where the format "
                                  "puts it)")


def _luks2(reader: BlockReader) -> LuksHeader:
    try:
        label, uuid, area = _luks2_area(reader, 0, MAGIC)
    except LuksHeaderError as primary:
        secondary = _secondary_offset(reader)
        if secondary is None:
            raise primary from None
        label, uuid, area = _luks2_area(reader, secondary, SECONDARY_MAGIC)
    segment = _first_segment(_parse_json(area))
    offset = _number(segment.get("offset"), "segment offset")
    size = segment.get("size")
    payload_size = None if size == "dynamic" else _number(size, "segment size")
    if offset >= reader.size or (payload_size is not None and offset + payload_size > reader.size):
        raise LuksHeaderError(f"the LUKS2 data segment (offset {offset}) is outside the volume "
                              f"({reader.size} bytes)")
    sector_size = segment.get("sector_size", SECTOR)
    if sector_size not in (512, 1024, 2048, 4096):
        raise LuksHeaderError(f"the LUKS2 data segment has sector size {sector_size!r}")
    return LuksHeader(version=2, uuid=uuid, label=label, payload_offset=offset, payload_size=payload_size,
                      cipher=str(segment.get("encryption", ""))[:64], sector_size=sector_size)


def _luks2_area(reader: BlockReader, at: int, magic: bytes) -> tuple[str, str, bytes]:
    """(label, UUID, JSON area) of the LUKS2 header copy at ``at``, its checksum verified."""
    binary = reader.read(at, LUKS2_BINARY_SIZE)
    if len(binary) < LUKS2_BINARY_SIZE:
        raise LuksHeaderError("the LUKS2 header is cut short")
    (found, version, hdr_size, _, label, csum_alg, _, uuid, _, hdr_offset, _,
     csum) = _LUKS2.unpack_from(binary)
    if found != magic or version != 2 or hdr_offset != at:
        raise LuksHeaderError(f"the LUKS2 header at byte {at} is damaged")
    if hdr_size not in LUKS2_HEADER_SIZES or at + hdr_size > reader.size:
        raise LuksHeaderError(f"the LUKS2 header size ({hdr_size} bytes) is not one the format allows")
    area = reader.read(at + LUKS2_BINARY_SIZE, hdr_size - LUKS2_BINARY_SIZE)
    if _text(csum_alg, "checksum algorithm") == "sha256":
        zeroed = binary[:448] + bytes(64) + binary[512:]
        if hashlib.sha256(zeroed + area).digest() != csum[:32]:
            raise LuksHeaderError(f"the LUKS2 header at byte {at} fails its checksum")
    return _text(label, "label"), _text(uuid, "UUID"), area


def _secondary_offset(reader: BlockReader) -> int | None:
    """Where the second LUKS2 header copy is: right after the first, whose size we may not trust."""
    for offset in sorted(LUKS2_HEADER_SIZES):
        if reader.read(offset, len(SECONDARY_MAGIC)) == SECONDARY_MAGIC:
            return offset
    return None


def _parse_json(area: bytes) -> dict[str, Any]:
    text = area.split(b"\0", 1)[0]
    depth = max_depth = 0
    for byte in text:  # bounded by the area size (4 MiB at most); json would recurse on "[[[[..."
        depth += (byte in b"[{") - (byte in b"]}")
        max_depth = max(max_depth, depth)
    if max_depth > MAX_JSON_DEPTH:
        raise LuksHeaderError(f"the LUKS2 metadata nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LuksHeaderError(f"the LUKS2 metadata is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise LuksHeaderError("the LUKS2 metadata is not a JSON object")
    return data


def _first_segment(data: dict[str, Any]) -> dict[str, Any]:
    segments = data.get("segments")
    if not isinstance(segments, dict) or not segments:
        raise LuksHeaderError("the LUKS2 metadata has no data segment")
    key = min(segments, key=lambda k: int(k) if k.isdigit() else 1 << 64)
    segment = segments[key]
    if not isinstance(segment, dict) or segment.get("type") != "crypt":
        raise LuksHeaderError(f"the LUKS2 data segment {key[:20]!r} is not a crypt segment")
    return segment


def _number(value: object, what: str) -> int:
    """LUKS2 writes 64-bit numbers as decimal strings."""
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise LuksHeaderError(f"the LUKS2 {what} is not a number: {str(value)[:30]!r}")
    return int(value)


def _text(raw: bytes, what: str) -> str:
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if what == "UUID" and text and not _UUID.fullmatch(text):
        raise LuksHeaderError(f"the LUKS header's {what} is not a UUID")
    return text
