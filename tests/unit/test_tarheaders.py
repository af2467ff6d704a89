"""The OVA's tar reader: real archives (Python's tarfile writes ustar, GNU and pax) give each member's data
offset and size; crafted headers give one clear error, in bounded time and memory."""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgmount_testkit.ova import octal
from imgmount_testkit.ova import tar_header as header
from mountd.errors import InvalidImageError
from mountd.image.blockio import BytesReader
from mountd.image.tarheaders import BLOCK, MAX_EXTENDED, MAX_MEMBERS, Member, is_tar, read_members

FILES = {"appliance.ovf": b"<Envelope/>", "appliance.mf": b"SHA256 (x) = 00\n", "disk-1.vmdk": b"K" * 3000}


def archive(files: dict[str, bytes], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def pax(records: dict[str, str]) -> bytes:
    body = b""
    for key, value in records.items():
        text = f" {key}={value}\n".encode()
        length = len(text) + len(str(len(text)))
        length += len(str(length)) - len(str(len(text)))
        body += str(length).encode() + text
    return header(b"PaxHeaders/x", octal(len(body)), b"x") + body.ljust(-(-len(body) // BLOCK) * BLOCK, b"\0")


def members(data: bytes) -> list[Member]:
    return read_members(BytesReader(data))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_real_archives_give_each_members_bytes(fmt: int) -> None:
    data = archive(FILES, fmt)
    found = members(data)
    assert is_tar(BytesReader(data))
    assert [m.name for m in found] == list(FILES)
    assert {m.name: data[m.offset:m.offset + m.size] for m in found} == FILES


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu-longname", "pax-path"])
def test_long_names(fmt: int) -> None:
    name = "d/" * 80 + "appliance-disk001.vmdk"  # 182 bytes: no ustar name field holds it
    data = archive({"a.ovf": b"x", name: b"disk bytes"}, fmt)
    found = members(data)
    assert [m.name for m in found] == ["a.ovf", name]
    assert data[found[1].offset:found[1].offset + found[1].size] == b"disk bytes"


def test_base256_and_pax_sizes() -> None:
    base256 = header(b"disk.vmdk", b"\x80" + (5).to_bytes(11, "big")) + b"hello".ljust(BLOCK, b"\0")
    assert members(base256) == [Member("disk.vmdk", BLOCK, 5)]
    overridden = pax({"size": "7"}) + header(b"disk.vmdk", octal(0)) + b"7 bytes".ljust(BLOCK, b"\0")
    (m,) = members(overridden)
    assert overridden[m.offset:m.offset + m.size] == b"7 bytes"


@pytest.mark.parametrize(("data", "message"), [
    (header(b"disk.vmdk", octal(1 << 32)), "claims 4294967296 bytes, past the end"),
    (header(b"disk.vmdk", b"\x80" + b"\xff" * 11), "past the end of the file"),
    (pax({"size": str(10**19)}) + header(b"disk.vmdk", octal(0)), "past the end of the file"),
    (header(b"disk.vmdk", b"00000000009\0"), "bad size field"),
    (header(b"disk.vmdk", b"\xff" * 12), "bad size field"),
    (header(b"disk.vmdk", octal(0), checksum=1), "bad checksum"),
    (header(b"disk.vmdk", octal(0), b"S"), "sparse or multi-volume"),
    (pax({"path": "x" * 5000}) + header(b"disk.vmdk", octal(0)), "overlong name"),
    (header(b"L", octal(MAX_EXTENDED + 1), b"L") + bytes(MAX_EXTENDED + BLOCK), "more than the 65536"),
    (header(b"x", octal(3), b"x") + b"3 a".ljust(BLOCK, b"\0"), "malformed record|without a value"),
    (header(b"disk.vmdk", octal(BLOCK * 3)) + bytes(BLOCK), "past the end"),
], ids=["huge-octal", "huge-base256", "huge-pax-size", "bad-octal", "negative-base256", "checksum", "sparse",
        "long-pax-path", "huge-gnu-longname", "bad-pax-record", "truncated-member"])
def test_crafted_headers_give_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        members(data)


def test_a_hundred_thousand_members_stop_at_the_bound() -> None:
    data = header(b"f", octal(0)) * 100_000
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(InvalidImageError, match=f"more than {MAX_MEMBERS} files"):
        members(data)
    elapsed, (_, peak) = time.monotonic() - started, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 4 << 20


def test_directories_and_links_are_skipped_and_the_end_marker_is_optional() -> None:
    data = header(b"dir/", octal(0), b"5") + header(b"link", octal(0), b"2") + header(b"a.ovf", octal(1))
    assert members(data + b"x".ljust(BLOCK, b"\0")) == [Member("a.ovf", 3 * BLOCK, 1)]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=4 * BLOCK), st.integers(0, 3 * BLOCK))
def test_any_corruption_is_a_member_list_or_an_invalid_image(noise: bytes, at: int) -> None:
    data = bytearray(archive(FILES, tarfile.PAX_FORMAT))
    data[at:at + len(noise)] = noise
    try:
        found = members(bytes(data))
    except InvalidImageError:
        return
    assert all(0 <= m.offset and m.offset + m.size <= len(data) for m in found)
