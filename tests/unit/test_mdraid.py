"""Pure tests of the md superblock reader: each version at its place, every crafted value at its bound, and the
grouping of one image's members into arrays.

The superblocks are those imgmount_testkit.mdraid writes (checked against ``mdadm --examine`` in
tests/host/test_mdraid_member.py; the VM lane reads superblocks that ``mdadm --create`` wrote).
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgmount_testkit.mdraid import Array, data_area, sign_sb0, sign_sb1, superblock
from mountd.image.blockio import BytesReader
from mountd.image.mdraid import (
    MAX_DEVS,
    MAX_MEMBERS,
    MAX_RAID_DISKS,
    MdMember,
    MdSuperblockError,
    Placed,
    group_arrays,
    read_member,
)

MiB = 1 << 20
SIZE = 8 * MiB
ARRAY = Array("debian:data", uuid=bytes(range(16)))
VERSIONS = ("1.0", "1.1", "1.2", "0.90")


def device(version: str = "1.2", *, size: int = SIZE, role: int = 0, array: Array = ARRAY,
           change: dict[int, tuple[str, int]] | None = None) -> BytesReader:
    """A device of ``size`` bytes holding one member's superblock, with fields ``change``d (offset: (format,
    value)) and the checksum made right again, as a crafted image would."""
    where, block = superblock(version, size, array, role)
    for offset, (fmt, value) in (change or {}).items():
        struct.pack_into(fmt, block, offset, value)
    sign = sign_sb0 if version == "0.90" else sign_sb1
    data = bytearray(size)
    data[where:where + len(block)] = sign(block)
    return BytesReader(bytes(data))


@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_is_found_at_its_place(version: str) -> None:
    member = read_member(device(version, role=1))
    assert member is not None
    offset, size = data_area(version, SIZE)
    assert (member.version, member.level, member.raid_disks, member.role) == (version, 1, 2, 1)
    assert (member.data_offset, member.data_size, member.used_size) == (offset, size, size)
    assert member.describe() == f"member 2 of 2 of RAID1 array {'data' if version != '0.90' else '03020100'}"


def test_v1_uuid_and_name_are_read_as_mdadm_prints_them() -> None:
    member = read_member(device("1.2"))
    assert member is not None
    assert member.uuid == "00010203:04050607:08090a0b:0c0d0e0f"
    assert (member.name, member.short_name) == ("debian:data", "data")


@pytest.mark.parametrize("size", [0, 512, 8 * 512, 15 * 512, 16 * 512, 64 << 10])
def test_small_or_empty_devices_hold_no_member(size: int) -> None:
    assert read_member(BytesReader(bytes(size))) is None


def test_a_damaged_superblock_says_so() -> None:
    where, block = superblock("1.2", SIZE, ARRAY, 0)
    block[40] ^= 1  # the name, after the checksum was computed
    data = bytearray(SIZE)
    data[where:where + len(block)] = block
    with pytest.raises(MdSuperblockError, match="bad checksum"):
        read_member(BytesReader(bytes(data)))


@pytest.mark.parametrize(("field", "value", "refused"), [
    (220, MAX_DEVS, ""), (220, MAX_DEVS + 1, "device slots"), (220, 2**32 - 1, "device slots"),  # max_dev
    (92, 1, ""), (92, MAX_RAID_DISKS, ""), (92, 0, "0 devices"), (92, MAX_RAID_DISKS + 1, "devices"),
    (92, 2**31 - 1, "devices"),  # raid_disks
])
def test_device_counts_are_bounded(field: int, value: int, refused: str) -> None:
    reader = device(change={field: ("<I", value)})
    if not refused:
        assert read_member(reader) is not None
        return
    with pytest.raises(MdSuperblockError, match=refused):
        read_member(reader)


def test_the_data_area_may_end_at_the_device_end_but_not_past_it() -> None:
    sectors, start = SIZE // 512, 2048
    assert read_member(device(change={136: ("<Q", sectors - start), 80: ("<Q", 0)})) is not None
    for size in (sectors - start + 1, 2**64 - 1 - start):
        with pytest.raises(MdSuperblockError, match="outside the device"):
            read_member(device(change={136: ("<Q", size)}))


@pytest.mark.parametrize(("version", "offset"), [("1.2", 0), ("1.2", 15), ("1.1", 7)])
def test_data_over_the_superblock_is_refused(version: str, offset: int) -> None:
    with pytest.raises(MdSuperblockError, match="over the superblock"):
        read_member(device(version, change={128: ("<Q", offset)}))


def test_v1_0_data_running_into_the_superblock_is_refused() -> None:
    sb_sector = (SIZE // 512 - 16) & ~7
    with pytest.raises(MdSuperblockError, match="over the superblock"):
        read_member(device("1.0", change={136: ("<Q", sb_sector + 1), 80: ("<Q", 0)}))


def test_used_size_beyond_the_data_area_is_refused() -> None:
    with pytest.raises(MdSuperblockError, match="outside the device"):
        read_member(device(change={80: ("<Q", 2**63)}))


def test_a_superblock_elsewhere_than_it_says_is_refused() -> None:
    with pytest.raises(MdSuperblockError, match="says it is at sector 0"):
        read_member(device("1.2", change={144: ("<Q", 0)}))


def test_unknown_levels_and_versions_are_refused() -> None:
    with pytest.raises(MdSuperblockError, match="level 7"):
        read_member(device(change={72: ("<i", 7)}))
    with pytest.raises(MdSuperblockError, match="major version 2"):
        read_member(device(change={4: ("<I", 2)}))
    with pytest.raises(MdSuperblockError, match=r"version 0\.89"):
        read_member(device("0.90", change={8: ("<I", 89)}))


def test_roles() -> None:
    spare = read_member(device(change={256: ("<H", 0xFFFF)}))
    assert spare is not None and spare.role is None and spare.describe().startswith("a spare")
    outside = read_member(device(change={160: ("<I", 128)}))  # dev_number past max_dev: a spare, as for mdadm
    assert outside is not None and outside.role is None
    with pytest.raises(MdSuperblockError, match="role 2 in an array of 2"):
        read_member(device(change={256: ("<H", 2)}))


def test_v0_90_device_count_is_bounded_by_its_table() -> None:
    with pytest.raises(MdSuperblockError, match="28 devices"):
        read_member(device("0.90", change={40: ("<I", 28)}))


@pytest.mark.parametrize(("bit", "why"), [(2, "being rebuilt"), (4, "reshaped")])
def test_a_member_that_is_not_a_whole_copy_says_why(bit: int, why: str) -> None:
    member = read_member(device(change={8: ("<I", bit)}))
    assert member is not None and why in member.incomplete and "not a whole copy" in member.note


# --- arrays --------------------------------------------------------------------------------------------------


def placed(region: str, role: int, *, level: int = 1, raid_disks: int = 2, events: int = 5,
           uuid: str = "u", name: str = "h:data", incomplete: str = "") -> Placed:
    member = MdMember("1.2", uuid, name, level, raid_disks, role, MiB, 7 * MiB, 6 * MiB, events, 0, incomplete)
    return Placed(region, 10 * MiB * (role + 1), member)


def test_a_complete_mirror_is_read_from_its_first_member() -> None:
    (array,) = group_arrays([placed("p1", 0), placed("p2", 1)])
    copy = array.copy()
    assert copy is not None and copy.region == "p1" and copy.data_offset == 11 * MiB
    assert (array.size, array.missing(), array.note) == (6 * MiB, [], "")


def test_a_mirror_missing_a_member_is_degraded() -> None:
    (array,) = group_arrays([placed("p2", 1)])
    assert array.note == "degraded: member 1 of 2 is not in this image; read from p2"


def test_stale_and_rebuilding_members_are_not_read() -> None:
    (array,) = group_arrays([placed("p1", 0, events=4), placed("p2", 1)])
    assert [p.region for p in array.members] == ["p2"] and array.missing() == [0]
    (array,) = group_arrays([placed("p1", 0, incomplete="it was being rebuilt"), placed("p2", 1)])
    copy = array.copy()
    assert copy is not None and copy.region == "p2"


def test_striped_and_parity_arrays_say_what_they_need() -> None:
    (raid5,) = group_arrays([placed("p1", 0, level=5, raid_disks=3), placed("p2", 1, level=5, raid_disks=3)])
    assert raid5.copy() is None and raid5.size == 12 * MiB
    assert raid5.obstacle() == "RAID5 array data is incomplete: member 3 of 3 is not in this image"
    (raid0,) = group_arrays([placed("p1", 0, level=0), placed("p2", 1, level=0)])
    assert "needs the kernel's md driver" in raid0.obstacle()
    assert raid0.obstacle(md=True).endswith(": assembled read-only with mdadm when mounted")


def test_two_arrays_of_one_name_are_told_apart() -> None:
    arrays = group_arrays([placed("p1", 0, uuid="aaaaaaaa:1"), placed("p2", 0, uuid="bbbbbbbb:2")])
    assert [a.volume_name(arrays) for a in arrays] == ["md/data-aaaaaaaa", "md/data-bbbbbbbb"]


def test_the_members_read_per_image_are_bounded() -> None:
    with pytest.raises(MdSuperblockError, match=f"more than the {MAX_MEMBERS}"):
        group_arrays([placed(f"p{i}", 0, uuid=str(i)) for i in range(MAX_MEMBERS + 1)])


def test_array_names_are_safe_as_volume_names() -> None:
    (array,) = group_arrays([placed("p1", 0, name="host:../../etc\n")])
    assert array.volume_name([array]) == "md/etc"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VERSIONS), st.lists(st.tuples(st.integers(0, 1023), st.integers(0, 255)), max_size=8))
def test_mutated_superblocks_are_read_or_refused_quickly(version: str, flips: list[tuple[int, int]]) -> None:
    where, block = superblock(version, SIZE, ARRAY, 0)
    for offset, value in flips:
        block[offset] = value
    (sign_sb0 if version == "0.90" else sign_sb1)(block)
    data = bytearray(SIZE)
    data[where:where + len(block)] = block
    started = time.monotonic()
    try:
        member = read_member(BytesReader(bytes(data)))
    except MdSuperblockError:
        return
    finally:
        assert time.monotonic() - started < 0.5
    if member is not None:
        assert member.data_offset + member.data_size <= SIZE and member.used_size <= member.data_size


def test_a_raid0_that_records_no_used_size_is_its_data_areas_in_whole_chunks() -> None:
    """md writes no used size for RAID0 (mdadm --create's arrays, seen in the VM lane): each member counts
    its data area rounded down to whole chunks, as md's raid0 does."""
    members = [Placed(f"p{i + 1}", 10 * MiB * (i + 1),
                      MdMember("1.2", "u", "h:data", 0, 2, i, MiB, 7 * MiB + 4096, 0, 5, 64 * 1024))
               for i in range(2)]
    (array,) = group_arrays(members)
    assert array.first.in_array == 7 * MiB and array.size == 14 * MiB
