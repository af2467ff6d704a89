"""Where md puts each chunk of a striped or parity array, against the placement tables of md's own
documentation and code (raid5.c ``raid5_compute_sector``, raid10.c ``__raid10_find_phys``), and the data read
back across chunk and member boundaries."""

from __future__ import annotations

import pytest

from mountd.image.blockio import BytesReader
from mountd.image.mdstripes import StripedReader, readable

CHUNK = 4


def placements(level: int, layout: int, members: int, chunks: int) -> list[tuple[int, int]]:
    reader = StripedReader([BytesReader(b"")] * members, level, layout, CHUNK, 0)
    return [reader.place(c) for c in range(chunks)]


@pytest.mark.parametrize(("level", "layout", "members", "expected"), [
    # RAID5 left-symmetric (mdadm's default), 3 members: parity on 2, 1, 0; data follows the parity.
    (5, 2, 3, [(0, 0), (1, 0), (2, 1), (0, 1), (1, 2), (2, 2)]),
    # RAID5 left-asymmetric: parity on 2, 1, 0; data in member order, skipping it.
    (5, 0, 3, [(0, 0), (1, 0), (0, 1), (2, 1), (1, 2), (2, 2)]),
    # RAID5 right-symmetric: parity on 0, 1, 2.
    (5, 3, 3, [(1, 0), (2, 0), (2, 1), (0, 1), (0, 2), (1, 2)]),
    # RAID4 (and RAID5 parity-last): parity on the last member.
    (4, 0, 3, [(0, 0), (1, 0), (0, 1), (1, 1)]),
    (5, 4, 3, [(1, 0), (2, 0), (1, 1), (2, 1)]),  # parity-first
    # RAID6 left-symmetric, 4 members: P on 3, 2, 1; Q after P; data after Q.
    (6, 2, 4, [(1, 0), (2, 0), (0, 1), (1, 1), (3, 2), (0, 2)]),
    # RAID6 left-asymmetric: P on 3 (Q on 0: data 1, 2), then P on 2 (Q on 3: data 0, 1).
    (6, 0, 4, [(1, 0), (2, 0), (0, 1), (1, 1)]),
    # RAID0, 2 members of one size: chunks alternate.
    (0, 0, 2, [(0, 0), (1, 0), (0, 1), (1, 1)]),
    # RAID10 near=2 (mdadm's n2): on 2 members every chunk is in row c of member 0 (and its copy on 1);
    # on 3 members the first copies fall on slots 0, 2, 4, 6 of rows of 3.
    (10, 0x102, 2, [(0, 0), (0, 1), (0, 2)]),
    (10, 0x102, 3, [(0, 0), (2, 0), (1, 1), (0, 2)]),
])
def test_chunks_are_where_md_puts_them(level: int, layout: int, members: int,
                                       expected: list[tuple[int, int]]) -> None:
    assert placements(level, layout, members, len(expected)) == expected


def test_data_reads_back_across_chunks_and_members() -> None:
    """A RAID5 of 3 whose chunks are written by the table above: any read is the array's bytes in order."""
    data = bytes(i % 80 for i in range(512))  # 128 chunks of 4, no byte b"P" (80)
    areas = [bytearray(b"P" * (CHUNK * 64)) for _ in range(3)]
    layout = StripedReader([BytesReader(b"")] * 3, 5, 2, CHUNK, 0)
    for c in range(len(data) // CHUNK):
        member, row = layout.place(c)
        areas[member][row * CHUNK:(row + 1) * CHUNK] = data[c * CHUNK:(c + 1) * CHUNK]
    reader = StripedReader([BytesReader(bytes(a)) for a in areas], 5, 2, CHUNK, len(data))
    assert reader.read(0, len(data)) == data
    assert reader.read(3, 9) == data[3:12] and reader.read(500, 100) == data[500:]
    assert b"P" not in reader.read(0, len(data))  # parity is never read


@pytest.mark.parametrize(("level", "layout", "members", "ok"), [
    (10, 0x201, 2, False),  # far copies
    (10, 0x10102, 2, False),  # offset copies
    (6, 2, 3, False),  # RAID6 needs 4
    (6, 8, 4, False),  # RAID6's own rotating layouts
    (5, 7, 3, False), (5, 2, 3, True), (0, 0, 1, True), (1, 0, 2, False), (-1, 0, 2, False),
])
def test_what_is_read_here_and_what_is_left_to_md(level: int, layout: int, members: int, ok: bool) -> None:
    assert readable(level, layout, members) is ok
