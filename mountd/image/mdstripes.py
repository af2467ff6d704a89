"""An md array's data read from its members' data areas, where no one member holds it all (RAID0, RAID4/5/6,
RAID10): so that inspection sees the filesystem or LVM physical volume inside on any host, as md shows it
once assembled. Only data is read, never parity: every member must be present (a degraded parity array
would need the parity computed, which is md's job).

The chunk placement is md's (``drivers/md/raid0.c``, ``raid5.c`` ``raid5_compute_sector``, ``raid10.c``
``__raid10_find_phys``). With ``n`` members, ``d`` data chunks a stripe and stripe number ``s``:

- RAID0 (members of one size): chunk ``c`` on member ``c % n``, at ``c // n`` chunks;
- RAID4: parity on the last member, data ``i`` on member ``i``;
- RAID5, by layout: left-asymmetric (0) parity on ``d - s % n``, data skipping it; right-asymmetric (1)
  parity on ``s % n``, data skipping it; left-symmetric (2, mdadm's default) parity on ``d - s % n``, data
  ``i`` on ``(parity + 1 + i) % n``; right-symmetric (3) parity on ``s % n``, data as left-symmetric;
  parity-first (4) and parity-last (5) as RAID4 with parity on the first or the last member;
- RAID6, the same layouts with Q after P (left-symmetric: P on ``n - 1 - s % n``, Q on ``P + 1``, data from
  ``P + 2``);
- RAID10 "near" copies (layout ``0x100 | near``, mdadm's default ``n2``): chunk ``c``'s first copy is slot
  ``c * near`` of a row of ``n`` chunks. Far and offset copies are not read here.
"""

from __future__ import annotations

from collections.abc import Sequence

from mountd.image.blockio import BlockReader, SliceReader
from mountd.image.mdraid import MdArray

LEFT_ASYMMETRIC, RIGHT_ASYMMETRIC, LEFT_SYMMETRIC, RIGHT_SYMMETRIC, PARITY_0, PARITY_N = range(6)


class StripedReader:
    """The array's data, ``size`` bytes, from ``members`` (each one's data area, by role)."""

    def __init__(self, members: Sequence[BlockReader], level: int, layout: int, chunk: int,
                 size: int) -> None:
        self.members, self.level, self.layout, self.chunk = list(members), level, layout, chunk
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        end = min(offset + length, self.size)
        while offset < end:
            number, within = divmod(offset, self.chunk)
            member, at = self.place(number)
            take = min(self.chunk - within, end - offset)
            out += self.members[member].read(at * self.chunk + within, take).ljust(take, b"\0")
            offset += take
        return bytes(out)

    def place(self, number: int) -> tuple[int, int]:
        """Chunk ``number`` of the array: (member, chunk number in that member's data area)."""
        n = len(self.members)
        if self.level == 0:
            return number % n, number // n
        if self.level == 10:
            slot = number * (self.layout & 0xFF)
            return slot % n, slot // n
        parities = 2 if self.level == 6 else 1
        stripe, index = divmod(number, n - parities)
        return data_member(self.level, self.layout, n, stripe, index), stripe


def data_member(level: int, layout: int, n: int, stripe: int, index: int) -> int:
    """The member holding data chunk ``index`` of ``stripe`` in a RAID4/5/6 of ``n`` members (RAID6: Q
    right after P)."""
    parities = 2 if level == 6 else 1
    if level == 4 or layout == PARITY_N:
        return index
    if layout == PARITY_0:
        return index + parities
    parity = n - 1 - stripe % n if layout in (LEFT_ASYMMETRIC, LEFT_SYMMETRIC) else stripe % n
    if layout in (LEFT_SYMMETRIC, RIGHT_SYMMETRIC):
        return (parity + parities + index) % n
    return _skipping(index, sorted((parity + k) % n for k in range(parities)))  # member order, past P (and Q)


def _skipping(index: int, taken: list[int]) -> int:
    for t in taken:
        if index >= t:
            index += 1
    return index


def readable(level: int, layout: int, n: int) -> bool:
    """Whether :class:`StripedReader` places this array's chunks."""
    if level == 0:
        return n >= 1
    if level == 10:
        near, far = layout & 0xFF, (layout >> 8) & 0xFF
        return far == 1 and not layout & 0x10000 and 1 <= near <= n
    if level in (4, 5):
        return n >= 2 and (level == 4 or layout in range(6))
    return level == 6 and n >= 4 and layout in range(6)


def array_reader(disk: BlockReader, array: MdArray) -> StripedReader | None:
    """The data of ``array`` on ``disk``, read from its members' data areas; None where this module cannot
    (a member missing, a layout it does not place, RAID0 members of different sizes: md's zones)."""
    first = array.first
    roles = {p.member.role: p for p in array.members if p.member.role is not None}
    if array.missing() or len(roles) != first.raid_disks:
        return None
    if not readable(first.level, first.layout, len(roles)):
        return None
    members = [roles[i] for i in range(first.raid_disks)]
    if first.chunk <= 0 or (first.level == 0 and len({p.member.in_array for p in members}) != 1):
        return None
    areas = [SliceReader(disk, p.data_offset, p.member.in_array) for p in members]
    return StripedReader(areas, first.level, first.layout, first.chunk, array.size)
