"""Reading the kernel's DM_LIST_DEVICES answer (the list of device-mapper names); the ioctls themselves run
against a real kernel in tests/vm/test_dm_layer.py."""

from __future__ import annotations

import struct

import pytest

from mountd.host.dmlist import NAME_LIST, TARGET_SPEC, parse_name_list, parse_targets


def name_list(*names: str, uuids: bool = False) -> bytes:
    """Entries as the kernel lays them out: dev, next, the name (NUL-ended, 8-byte aligned), and in newer
    kernels event_nr, flags and the uuid after it; ``next`` is the offset of the next entry, 0 on the last."""
    entries = []
    for i, name in enumerate(names):
        body = name.encode() + b"\0"
        body += b"\0" * (-len(body) % 8)
        if uuids:
            body += struct.pack("=II", 0, 1) + f"LVM-{i}".encode() + b"\0"
            body += b"\0" * (-len(body) % 8)
        entries.append((((253 << 8) | i), body))
    out = b""
    for i, (dev, body) in enumerate(entries):
        size = NAME_LIST.size + len(body)
        size += -size % 8
        nxt = size if i + 1 < len(entries) else 0
        out += (NAME_LIST.pack(dev, nxt) + body).ljust(size, b"\0")
    return out


def test_names_in_order_with_and_without_the_uuid_part() -> None:
    names = ("imgmount-1a2b-vg-root", "x", "a-name-of-exactly-sixteen")
    assert list(parse_name_list(name_list(*names))) == list(names)
    assert list(parse_name_list(name_list(*names, uuids=True))) == list(names)


def test_no_devices_is_an_entry_with_device_zero_or_no_data() -> None:
    assert list(parse_name_list(NAME_LIST.pack(0, 0) + b"\0" * 8)) == []
    assert list(parse_name_list(b"")) == []


def test_an_offset_past_the_data_ends_the_list() -> None:
    data = bytearray(name_list("one", "two"))
    struct.pack_into("=I", data, 8, 1 << 20)  # the first entry's next
    assert list(parse_name_list(bytes(data))) == ["one"]


def targets(*rows: tuple[int, int, str, str]) -> bytes:
    """DM_TABLE_STATUS data: each target's spec, its parameters (NUL-ended), aligned to 8 bytes; ``next`` is
    the offset of the next spec from the start of the data."""
    out = b""
    for start, length, kind, params in rows:
        body = params.encode() + b"\0"
        size = TARGET_SPEC.size + len(body)
        size += -size % 8
        out += (TARGET_SPEC.pack(start, length, 0, len(out) + size, kind.encode()) + body).ljust(size, b"\0")
    return out


def test_targets_as_dmsetup_table_shows_them() -> None:
    data = targets((0, 8192, "linear", "43:2 2048"), (8192, 4096, "striped", "2 128 43:2 10240 43:3 2048"))
    assert list(parse_targets(data, 2)) == [["0", "8192", "linear", "43:2", "2048"],
                                            ["8192", "4096", "striped", "2", "128", "43:2", "10240", "43:3", "2048"]]
    assert list(parse_targets(b"", 0)) == []


def test_a_count_past_the_data_is_an_error_not_a_short_table() -> None:
    with pytest.raises(OSError, match="ends inside a target"):
        list(parse_targets(targets((0, 8, "zero", "")), 2))
