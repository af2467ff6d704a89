"""mountd.image.luks on crafted headers: every field out of bounds is one clear error, bounded work."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from typing import Any

import pytest

from mountd.image.blockio import BytesReader
from mountd.image.luks import LUKS1_HEADER_SIZE, LuksHeaderError, read_header

UUID = b"6c26f2cb-bfb1-4b24-8540-e80ba3d43d22"
VOLUME = 4 << 20


def luks1(payload_sectors: int = 4096, key_bytes: int = 64, uuid: bytes = UUID, slot0: tuple[int, int, int] = (
        0x00AC71F3, 8, 4000)) -> bytes:
    """A LUKS1 header; ``slot0``: (active, key material sector, stripes) of key slot 0, the others disabled."""
    head = struct.pack(">6sH32s32s32sII20s32sI40s", b"LUKS\xba\xbe", 1, b"aes", b"xts-plain64", b"sha256",
                       payload_sectors, key_bytes, bytes(20), bytes(32), 1000, uuid)
    active, material, stripes = slot0
    head += struct.pack(">II32sII", active, 1000, bytes(32), material, stripes)
    head += struct.pack(">II32sII", 0x0000DEAD, 0, bytes(32), 0, 4000) * 7
    return head.ljust(LUKS1_HEADER_SIZE, b"\0").ljust(VOLUME, b"\0")


def luks2_copy(at: int, area: bytes, hdr_size: int = 16384, magic: bytes = b"LUKS\xba\xbe") -> bytes:
    binary = bytearray(struct.pack(">6sHQQ48s32s64s40s48sQ184s64s", magic, 2, hdr_size, 1, b"mylabel",
                                   b"sha256", bytes(64), UUID, b"", at, bytes(184), bytes(64)))
    binary = binary.ljust(4096, b"\0")
    area = area.ljust(hdr_size - 4096, b"\0")
    binary[448:480] = hashlib.sha256(bytes(binary) + area).digest()
    return bytes(binary) + area


def metadata(segment: Any) -> bytes:
    return json.dumps({"keyslots": {}, "segments": {"0": segment}, "digests": {}}).encode()


def luks2(segment: Any = None, *, area: bytes | None = None, hdr_size: int = 16384) -> bytes:
    if area is None:
        area = metadata(segment if segment is not None else
                        {"type": "crypt", "offset": "1048576", "size": "dynamic",
                         "encryption": "aes-xts-plain64", "sector_size": 4096})
    primary = luks2_copy(0, area, hdr_size)
    secondary = luks2_copy(hdr_size, area, hdr_size, b"SKUL\xba\xbe")
    return (primary + secondary).ljust(VOLUME, b"\0")


def test_luks1_fields() -> None:
    header = read_header(BytesReader(luks1()))
    assert header is not None
    assert (header.version, header.cipher, header.payload_offset) == (1, "aes-xts-plain64", 4096 * 512)
    assert header.uuid == UUID.decode()


def test_luks2_fields() -> None:
    header = read_header(BytesReader(luks2()))
    assert header is not None
    assert (header.version, header.label, header.payload_offset, header.sector_size) == (2, "mylabel", 1 << 20,
                                                                                          4096)


def test_not_luks() -> None:
    assert read_header(BytesReader(bytes(8192))) is None
    assert read_header(BytesReader(b"")) is None


@pytest.mark.parametrize("data, cause", [
    (luks1(payload_sectors=0), "payload offset"),
    (luks1(payload_sectors=1 << 30), "payload offset"),
    (luks1(uuid=b"not a uuid; rm -rf"), "UUID"),
    (luks1(slot0=(0x00AC71F3, 8, 40000)), "key slot 0 is damaged"),
    (luks1(slot0=(0x00AC71F3, 4090, 4000)), "key slot 0 is damaged"),
    (luks1(slot0=(0x00AC71F3, 0, 4000)), "key slot 0 is damaged"),
    (luks1(slot0=(0x12345678, 8, 4000)), "key slot 0 is damaged"),
    (luks1(key_bytes=1 << 20), "-byte key"),
    (luks1()[:100], "cut short"),
    (b"LUKS\xba\xbe\x00\x07" + bytes(4096), "version 7"),
    (luks2({"type": "crypt", "offset": "99999999999", "size": "dynamic"}), "outside the volume"),
    (luks2({"type": "crypt", "offset": "-1", "size": "dynamic"}), "not a number"),
    (luks2({"type": "crypt", "offset": 1048576, "size": "dynamic"}), "not a number"),
    (luks2({"type": "crypt", "offset": "1048576", "size": "dynamic", "sector_size": 3}), "sector size"),
    (luks2({"type": "linear", "offset": "1048576", "size": "dynamic"}), "not a crypt segment"),
    (luks2(area=b"{not json"), "not valid JSON"),
    (luks2(area=b"[1, 2]"), "not a JSON object"),
    (luks2(area=json.dumps({"segments": {}}).encode()), "no data segment"),
    (luks2(area=b"[" * 5000 + b"]" * 5000), "nests deeper"),
    (luks2(hdr_size=12345), "header size"),
])
def test_crafted(data: bytes, cause: str) -> None:
    with pytest.raises(LuksHeaderError, match=cause):
        read_header(BytesReader(data))


def test_largest_json_area_is_read_in_bounded_time() -> None:
    # The largest header the format allows (4 MiB), filled with a flat object: parsed, not refused, quickly.
    big = {"segments": {"0": {"type": "crypt", "offset": str(9 << 20), "size": "dynamic"}},
           "pad": ["x" * 60] * 60000}
    data = luks2(area=json.dumps(big).encode(), hdr_size=4 << 20)
    data = data.ljust(16 << 20, b"\0")
    started = time.monotonic()
    header = read_header(BytesReader(data))
    assert header is not None and header.payload_offset == 9 << 20
    assert time.monotonic() - started < 2.0
