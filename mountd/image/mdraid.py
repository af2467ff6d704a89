"""Read Linux md RAID member superblocks without mdadm, and group the members of one image into arrays.

On-disk layout (``include/uapi/linux/raid/md_p.h``, mdadm ``super1.c``/``super0.c``). Version 1 superblocks
are little-endian, 256 bytes plus two bytes per device slot (``dev_roles``, ``max_dev`` of them, at most
1920: a superblock fills 4 KiB at most), at a place the minor version fixes: 1.1 at sector 0, 1.2 at sector 8
(4 KiB), 1.0 at the end (``(sectors - 16) & ~7``). The member's data area is ``data_size`` sectors from
``data_offset``; the array uses the first ``size`` of them. The checksum is the sum of the 32-bit words (and
a last 16-bit one) with ``sb_csum`` zero, folded to 32 bits. Version 0.90 sits in the last 64 KiB-aligned
64 KiB of the device (4 KiB, native-endian words: little-endian here), its data starts at 0, and ``size``
counts KiB.

A RAID1 member's data area is a whole copy of the array: mounting it alone is mounting the array degraded.
Every value read is checked against the device's size and the format's own limits before it is used; a
superblock whose magic is right but whose contents are not is :class:`MdSuperblockError`, never a guess.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from mountd.errors import InvalidImageError
from mountd.image.blockio import BlockReader

SECTOR = 512
MAGIC = 0xA92B4EFC
SB1_SIZE = 256
MAX_SB_SIZE = 4096
MAX_DEVS = (MAX_SB_SIZE - SB1_SIZE) // 2  # 1920: dev_roles slots a 4 KiB superblock holds
#: Devices of one array: far above any real one; the kernel's limit for 0.90 is 27.
MAX_RAID_DISKS = 256
SB0_SIZE = 4096
SB0_RESERVED = 64 << 10
SB0_DISKS = 27
#: Members of md arrays looked at in one image: one per partition at most (GPT's 128), with room to spare.
MAX_MEMBERS = 256

ROLE_SPARE, ROLE_FAULTY, ROLE_JOURNAL, ROLE_MAX = 0xFFFF, 0xFFFE, 0xFFFD, 0xFF00
FEATURE_RECOVERY_OFFSET = 2
FEATURE_RESHAPE_ACTIVE = 4
LEVELS = {-1: "linear", 0: "RAID0", 1: "RAID1", 4: "RAID4", 5: "RAID5", 6: "RAID6", 10: "RAID10"}

_SB1_HEAD = struct.Struct("<IIII16s32sQiiQII")  # magic .. raid_disks: bytes 0-95
_SB1_DEVICE = struct.Struct("<QQQQI")  # data_offset, data_size, super_offset, recovery_offset, dev_number
_SB1_STATE = struct.Struct("<QQQII")  # utime, events, resync_offset, sb_csum, max_dev: bytes 192-223
_NAME = re.compile(r"[^A-Za-z0-9_.+-]")


class MdSuperblockError(InvalidImageError):
    """An md superblock (the magic is there) that is damaged or crafted."""


@dataclass(frozen=True)
class MdMember:
    """One device's md superblock: which array, which place in it, where its data is."""

    version: str  # "1.0", "1.1", "1.2", "0.90"
    uuid: str  # the array's, as mdadm prints it: 8:8:8:8 hex digits
    name: str  # the array's name as stored ("host:name"; "" for 0.90)
    level: int
    raid_disks: int
    role: int | None  # 0-based slot in the array; None for a spare, faulty or journal device
    data_offset: int  # bytes from the member's start
    data_size: int  # bytes of data area
    used_size: int  # bytes of the data area the array uses
    events: int
    chunk: int  # bytes (striped levels)
    incomplete: str = ""  # why this member's data is not a whole copy (being rebuilt, reshaping)
    layout: int = 0  # where a striped level puts its chunks (:mod:`mountd.image.mdstripes`)

    @property
    def in_array(self) -> int:
        """Bytes of its data area the array uses: as recorded, or for RAID0, which records none, the data
        area in whole chunks (md's ``raid0`` rounds each member down so)."""
        if self.used_size or self.chunk <= 0:
            return self.used_size
        return self.data_size // self.chunk * self.chunk

    @property
    def level_name(self) -> str:
        return LEVELS.get(self.level, f"level {self.level}")

    @property
    def short_name(self) -> str:
        """The array's name without mdadm's "homehost:" prefix, safe as a device and volume name."""
        name = _NAME.sub("_", self.name.split(":", 1)[-1])[:32].strip("._")
        return name or self.uuid.replace(":", "")[:8]

    def describe(self) -> str:
        place = "a spare" if self.role is None else f"member {self.role + 1} of {self.raid_disks}"
        return f"{place} of {self.level_name} array {self.short_name}"

    @property
    def note(self) -> str:
        """What ``--info`` says of this member."""
        return self.describe() + (f" ({self.incomplete}: not a whole copy)" if self.incomplete else "")


def read_member(reader: BlockReader) -> MdMember | None:
    """The md superblock on ``reader`` (versions 1.2, 1.1, 1.0, 0.90, in that order), or None."""
    sectors = reader.size // SECTOR
    for version, sector in (("1.2", 8), ("1.1", 0), ("1.0", (sectors - 16) & ~7)):
        if sector >= 0 and (sector + 8) * SECTOR <= reader.size:
            block = reader.read(sector * SECTOR, MAX_SB_SIZE)
            if len(block) >= SB1_SIZE and struct.unpack_from("<I", block)[0] == MAGIC:
                return _parse_v1(block, version, sector, sectors)
    offset = (reader.size & ~(SB0_RESERVED - 1)) - SB0_RESERVED
    if offset >= 0:
        block = reader.read(offset, SB0_SIZE)
        if len(block) == SB0_SIZE and struct.unpack_from("<I", block)[0] == MAGIC:
            return _parse_v0(block, offset)
    return None


def _parse_v1(block: bytes, version: str, sector: int, sectors: int) -> MdMember:
    where = f"the md superblock (version {version})"
    (_, major, features, _, uuid, name, _, level, layout, size,
     chunk, raid_disks) = _SB1_HEAD.unpack_from(block)
    data_offset, data_size, super_offset, _, dev_number = _SB1_DEVICE.unpack_from(block, 128)
    _, events, _, csum, max_dev = _SB1_STATE.unpack_from(block, 192)
    if major != 1:
        raise MdSuperblockError(f"{where} has major version {major}, not 1")
    if max_dev > MAX_DEVS:
        raise MdSuperblockError(f"{where} claims {max_dev} device slots, more than the {MAX_DEVS} it holds")
    if csum != sb1_checksum(block[:SB1_SIZE + 2 * max_dev]):
        raise MdSuperblockError(f"{where} has a bad checksum: it is damaged")
    if super_offset != sector:
        raise MdSuperblockError(f"{where} says it is at sector {super_offset}, but it is at {sector}")
    _check_shape(where, level, raid_disks)
    _check_data_area(where, version, offset=data_offset, size=data_size, used=size, sb=sector,
                     sectors=sectors)
    role = _v1_role(block, dev_number, max_dev, raid_disks, where)
    incomplete = ("it was being rebuilt" if features & FEATURE_RECOVERY_OFFSET else
                  "the array was being reshaped" if features & FEATURE_RESHAPE_ACTIVE else "")
    return MdMember(version, format_uuid(uuid), name.split(b"\0", 1)[0].decode("utf-8", "replace"), level,
                    raid_disks, role, data_offset * SECTOR, data_size * SECTOR, size * SECTOR, events,
                    chunk * SECTOR, incomplete, layout)


def _check_shape(where: str, level: int, raid_disks: int) -> None:
    if level not in LEVELS:
        raise MdSuperblockError(f"{where} names RAID level {level}, which imgmount does not know")
    if not 1 <= raid_disks <= MAX_RAID_DISKS:
        raise MdSuperblockError(f"{where} claims {raid_disks} devices (imgmount reads 1 to {MAX_RAID_DISKS})")


def _check_data_area(where: str, version: str, *, offset: int, size: int, used: int, sb: int,
                     sectors: int) -> None:
    """The data area lies inside the device and clear of the superblock; the used part inside the area."""
    if offset + size > sectors or used > size:
        raise MdSuperblockError(f"{where} puts its data (sectors {offset} + {size}, {used} used) outside the "
                                f"device's {sectors} sectors")
    clear = offset + size <= sb if version == "1.0" else offset >= sb + MAX_SB_SIZE // SECTOR
    if not clear:
        raise MdSuperblockError(f"{where} puts its data (from sector {offset}) over the superblock")


def _v1_role(block: bytes, dev_number: int, max_dev: int, raid_disks: int, where: str) -> int | None:
    if dev_number >= max_dev:
        return None  # mdadm's role_from_sb: a device without a slot is a spare
    role = struct.unpack_from("<H", block, SB1_SIZE + 2 * dev_number)[0]
    if role >= ROLE_MAX:
        return None  # spare, faulty or journal
    if role >= raid_disks:
        raise MdSuperblockError(f"{where} gives this device role {role} in an array of {raid_disks}")
    return int(role)


def _parse_v0(block: bytes, offset: int) -> MdMember:
    where = "the md superblock (version 0.90)"
    words = struct.unpack("<1024I", block)
    major, minor = words[1], words[2]
    if major != 0 or minor not in (90, 91):
        raise MdSuperblockError(f"{where} has version {major}.{minor}")
    if words[38] != sb0_checksum(block):
        raise MdSuperblockError(f"{where} has a bad checksum: it is damaged")
    level = struct.unpack("<i", block[28:32])[0]
    raid_disks, size = words[10], words[8] * 1024
    _check_shape(where, level, raid_disks)
    if raid_disks > SB0_DISKS or size > offset:
        raise MdSuperblockError(f"{where} claims {raid_disks} devices of {size} bytes, which does not fit")
    role, state = words[992 + 3], words[992 + 4]
    uuid = struct.pack("<4I", words[5], words[13], words[14], words[15])
    events = words[40] << 32 | words[39]  # events_lo, events_hi on little-endian
    in_array = role < raid_disks and not state & 1  # bit 0: faulty
    return MdMember("0.90", format_uuid(uuid, native=True), "", level, raid_disks,
                    role if in_array else None, 0, offset, size, events, words[65], layout=words[64])


def sb1_checksum(data: bytes) -> int:
    """mdadm's ``calc_sb_1_csum`` over ``data`` (the superblock and its ``dev_roles``), ``sb_csum`` as 0."""
    data = data[:216] + b"\0\0\0\0" + data[220:]
    whole = len(data) // 4 * 4
    total = sum(struct.unpack(f"<{whole // 4}I", data[:whole]))
    if len(data) - whole >= 2:
        total += struct.unpack_from("<H", data, whole)[0]
    return int((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def sb0_checksum(block: bytes) -> int:
    """mdadm's ``calc_sb0_csum``: the 1024 words with ``sb_csum`` (word 38) as 0, folded to 32 bits."""
    words = list(struct.unpack("<1024I", block))
    words[38] = 0
    total = sum(words)
    return int((total & 0xFFFFFFFF) + (total >> 32)) & 0xFFFFFFFF


def format_uuid(raw: bytes, *, native: bool = False) -> str:
    """mdadm's ``8:8:8:8`` form; 0.90 keeps its four words in host order, printed as numbers."""
    if native:
        return ":".join(f"{w:08x}" for w in struct.unpack("<4I", raw))
    return ":".join(raw[i:i + 4].hex() for i in range(0, 16, 4))


# --- the arrays of one image -------------------------------------------------------------------------------

#: Parity devices per level: they add no space to the array.
_PARITY = {4: 1, 5: 1, 6: 2}


@dataclass(frozen=True)
class Placed:
    """A member found in a region of the disk: the region's volume name and byte offset."""

    region: str
    offset: int
    member: MdMember

    @property
    def data_offset(self) -> int:
        """Where this member's data area starts on the disk."""
        return self.offset + self.member.data_offset


@dataclass(frozen=True)
class MdArray:
    """The members of one array (by uuid) that an image holds; stale ones (fewer events) are left out."""

    members: tuple[Placed, ...]

    @property
    def first(self) -> MdMember:
        return self.members[0].member

    @property
    def size(self) -> int:
        """The array's size in bytes, from its superblock (what the kernel would show)."""
        m = self.first
        if m.level == 1:
            return m.used_size
        if m.level == 10:  # mdadm's default: two near copies
            return m.in_array * m.raid_disks // 2
        return m.in_array * (m.raid_disks - _PARITY.get(m.level, 0))

    def roles(self) -> list[int]:
        return sorted({p.member.role for p in self.members if p.member.role is not None})

    def missing(self) -> list[int]:
        """The slots (0-based) no member of this image fills."""
        return sorted(set(range(self.first.raid_disks)) - set(self.roles()))

    def volume_name(self, arrays: list[MdArray]) -> str:
        """``md/<name>``; two arrays of one name (among ``arrays``) are told apart by their uuid."""
        name = self.first.short_name
        if sum(a.first.short_name == name for a in arrays) > 1:
            name += "-" + self.first.uuid[:8]
        return f"md/{name}"

    @property
    def note(self) -> str:
        """What ``--info`` says of a mirror read from one member: that it is degraded, if it is."""
        copy, missing = self.copy(), self.missing()
        if copy is None or not missing:
            return ""
        slots = ", ".join(str(i + 1) for i in missing)
        return (f"degraded: member {slots} of {self.first.raid_disks} is not in this image; "
                f"read from {copy.region}")

    def obstacle(self, *, md: bool = False) -> str:
        """Why the array is not one piece of the disk: what is missing, or what assembling it takes (on a
        host that has ``md``: that a mount does it)."""
        m = self.first
        what = f"{m.level_name} array {m.short_name}"
        missing = self.missing()
        if missing:
            slots = ", ".join(str(i + 1) for i in missing)
            return f"{what} is incomplete: member {slots} of {m.raid_disks} is not in this image"
        how = "assembled read-only with mdadm when mounted" if md else \
            "it needs the kernel's md driver to assemble it"
        return f"{what} is spread over {m.raid_disks} members: {how}"

    def copy(self) -> Placed | None:
        """A member whose data area alone is the whole array: a complete RAID1 mirror, or the one device of a
        single-device array; None for any other array."""
        if self.first.level != 1 and self.first.raid_disks != 1:
            return None
        return next((p for p in self.members if p.member.role is not None and not p.member.incomplete), None)


def group_arrays(found: list[Placed]) -> list[MdArray]:
    """``found`` members by array, in the order first seen; each array's freshest members (most events)."""
    if len(found) > MAX_MEMBERS:
        raise MdSuperblockError(f"this image holds {len(found)} md RAID members, more than the {MAX_MEMBERS} "
                                "imgmount reads")
    by_uuid: dict[str, list[Placed]] = {}
    for placed in found:
        by_uuid.setdefault(placed.member.uuid, []).append(placed)
    arrays = []
    for members in by_uuid.values():
        newest = max(p.member.events for p in members)
        arrays.append(MdArray(tuple(p for p in members if p.member.events == newest)))
    return arrays
