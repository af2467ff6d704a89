"""The partition table parser against util-linux: every layout is made by sfdisk and read back by sfdisk.

4096-byte-sector layouts go through loop devices of that sector size (sfdisk treats a regular file as 512-byte
sectors), hence the host lane. Corrupted variants patch real sfdisk images the way a broken disk or a
crafted image would, and check the documented recovery or error (see :mod:`mountd.image.partitions`).
"""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imgmount_testkit import images
from mountd.image.blockio import FileReader
from mountd.image.partitions import PartitionTable, PartitionTableError, read_partition_table
from tests.support.tables import header_field, set_header_field

MiB = images.MiB
DOS_TYPES = ["83", "82", "8e", "7", "c", "b", "fd", "a5", "da", "ef"]
GPT_TYPES = ["0FC63DAF-8483-4772-8E79-3D69D8477DE4", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
             "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "E6D6D379-F507-44C2-A23C-238F2A3DF928",
             "933AC7E1-2EB4-4F13-B844-0E14E2AEF915", "21686148-6449-6E6F-744E-656564454649",
             "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"]
NAMES = ["root", "boot", "EFI system", "données", "ñandú ✓", "🐧", "x" * 36, "with spaces", ""]
ATTRS = ["", "LegacyBIOSBootable", "RequiredPartition", "GUID:60", "LegacyBIOSBootable GUID:63"]


@dataclass(frozen=True)
class Layout:
    name: str
    sector_size: int
    size_mib: int
    script: str

    @property
    def label(self) -> str:
        return self.script.split("\n", 1)[0].removeprefix("label: ")


def _line(number: int, fields: list[str]) -> str:
    return f"/dev/sdx{number} : " + ", ".join(f for f in fields if f)


def dos_primaries(count: int, sector_size: int, slots: tuple[int, ...] = ()) -> Layout:
    rng = random.Random(f"dos{count}{sector_size}{slots}")
    mib = MiB // sector_size
    boot = rng.randrange(count)
    lines, start = [], mib
    for i, slot in enumerate(slots or range(1, count + 1)):
        start += rng.choice([0, 0, mib])  # sometimes a gap
        size = rng.randint(1, 3) * mib - rng.choice([0, 7])
        lines.append(_line(slot, [f"start={start}", f"size={size}", f"type={rng.choice(DOS_TYPES)}",
                                  "bootable" if i == boot else ""]))
        start += size + (-size % mib)
    return Layout(f"dos-{count}p-{sector_size}{'-slots' + ''.join(map(str, slots)) if slots else ''}",
                  sector_size, 32, "label: dos\n" + "\n".join(lines) + "\n")


def dos_logicals(count: int, sector_size: int, *, placed: str, ext_type: str = "5") -> Layout:
    """``placed``: "packed" lets sfdisk place them; "gaps" leaves free space; "shuffled" breaks disk order."""
    rng = random.Random(f"log{count}{sector_size}{placed}")
    mib = MiB // sector_size
    lines = [_line(1, [f"start={mib}", f"size={mib}", "type=83"]),
             _line(2, [f"start={2 * mib}", f"type={ext_type}"])]
    slots, pos = [], 2 * mib
    for _ in range(count):
        slots.append(pos)
        pos += 2 * mib + (rng.choice([0, 2 * mib, 4 * mib]) if placed == "gaps" else 0)
    if placed == "shuffled":
        rng.shuffle(slots)
    for k, slot in enumerate(slots):
        start = f"start={slot + mib // 2}" if placed != "packed" else ""
        lines.append(_line(5 + k, [start, f"size={mib // 2 + rng.randint(0, 9)}",
                                   f"type={rng.choice(DOS_TYPES)}", "bootable" if k == 1 else ""]))
    return Layout(f"dos-ext{ext_type}-{count}l-{placed}-{sector_size}", sector_size, 8 + 4 * count,
                  "label: dos\n" + "\n".join(lines) + "\n")


def gpt(count: int, sector_size: int, *, order: str = "sorted", numbers: tuple[int, ...] = (),
        header: str = "") -> Layout:
    """``order``: "sorted" disk order follows numbering, "shuffled" does not, "auto" lets sfdisk place them."""
    rng = random.Random(f"gpt{count}{sector_size}{order}{numbers}")
    mib = MiB // sector_size
    numbers = numbers or tuple(range(1, count + 1))
    starts = [mib + k * mib for k in range(len(numbers))]
    if order == "shuffled":
        rng.shuffle(starts)
    lines = []
    for number, start in zip(numbers, starts, strict=True):
        name, attrs = rng.choice(NAMES), rng.choice(ATTRS)
        lines.append(_line(number, [
            f"start={start}" if order != "auto" else "", f"size={mib // 2 + rng.randint(0, mib // 2)}",
            f"type={rng.choice(GPT_TYPES)}", f'name="{name}"' if name else "",
            f'attrs="{attrs}"' if attrs else ""]))
    tag = f"-{order}" + (f"-n{numbers[-1]}" if count != len(numbers) or numbers[-1] != count else "")
    return Layout(f"gpt-{len(numbers)}{tag}{'-hdr' if header else ''}-{sector_size}", sector_size,
                  4 + len(numbers) + 2, f"label: gpt\n{header}" + "\n".join(lines) + "\n")


def layouts() -> list[Layout]:
    found = []
    for ss in (512, 4096):
        found += [dos_primaries(n, ss) for n in (1, 2, 3, 4)]
        found += [dos_logicals(n, ss, placed="packed", ext_type=t) for n, t in ((1, "5"), (3, "f"), (20, "85"))]
        found += [dos_logicals(n, ss, placed=p) for n, p in ((5, "gaps"), (12, "gaps"), (7, "shuffled"))]
        found += [gpt(n, ss) for n in (1, 4, 16, 60)]
        found += [gpt(n, ss, order=o) for n, o in ((5, "shuffled"), (30, "shuffled"), (8, "auto"))]
        found += [gpt(4, ss, numbers=(1, 5, 60, 128)), gpt(3, ss, numbers=(2, 150, 200), header="table-length: 200\n")]
    found += [dos_primaries(2, 512, (1, 4)), dos_primaries(2, 512, (2, 3)), dos_primaries(3, 4096, (4, 2, 1))]
    found += [gpt(6, 512, header="first-lba: 64\n"), gpt(6, 4096, header="first-lba: 40\n")]
    return found


LAYOUTS = layouts()


def test_enough_distinct_layouts() -> None:
    assert len({layout.name for layout in LAYOUTS}) == len(LAYOUTS) >= 40


def parse(path: Path, sector_size: int | None = None) -> PartitionTable | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_partition_table(FileReader(fd), sector_size)
    finally:
        os.close(fd)


def expected(sfdisk: dict[str, Any]) -> tuple[Any, ...]:
    """What sfdisk --json says, in our terms: bytes, Linux numbers, flags."""
    ss = sfdisk["sectorsize"]
    parts = []
    for p in sfdisk["partitions"]:
        number = int(p["node"][len(sfdisk["device"]) :].lstrip("p"))
        bootable = p.get("bootable", False) or "LegacyBIOSBootable" in p.get("attrs", "").split()
        parts.append((number, p["start"] * ss, p["size"] * ss, p["type"], p.get("uuid", ""), p.get("name", ""),
                      bootable, sfdisk["label"] == "dos" and p["type"] in ("5", "f", "85")))
    return sfdisk["label"], ss, sfdisk["id"], tuple(sorted(parts)), ()


def ours(table: PartitionTable | None) -> tuple[Any, ...]:
    assert table is not None
    parts = tuple((p.number, p.start, p.size, p.type, p.uuid, p.name, p.bootable, p.container)
                  for p in table.partitions)
    return table.label, table.sector_size, table.disk_id, parts, table.warnings


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_same_table_as_sfdisk(layout: Layout, tmp_path: Path) -> None:
    image = images.blank(tmp_path / "disk.img", layout.size_mib * MiB)
    images.partition(image, layout.script, sector_size=layout.sector_size)
    truth = images.sfdisk_json(image, sector_size=layout.sector_size)
    assert len(truth["partitions"]) == layout.script.count("/dev/sdx")  # sfdisk made every line
    # MBR does not record its sector size: 4096-byte MBR disks need it said; GPT finds it.
    given = layout.sector_size if layout.label == "dos" and layout.sector_size != 512 else None
    assert ours(parse(image, given)) == expected(truth)


# -------------------------------------------------------------------------------- corrupted variants


@pytest.fixture(scope="module")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PartitionTable]]:
    image = images.blank(tmp_path_factory.mktemp("gpt") / "gpt.img", 24 * MiB)
    images.partition(image, gpt(12, 512, order="shuffled").script)
    table = parse(image)
    assert table is not None and len(table.partitions) == 12 and table.warnings == ()
    yield image, table


@pytest.fixture(scope="module")
def dos_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, PartitionTable]]:
    image = images.blank(tmp_path_factory.mktemp("dos") / "dos.img", 64 * MiB)
    images.partition(image, dos_logicals(6, 512, placed="gaps").script)
    table = parse(image)
    assert table is not None and [p.number for p in table.partitions] == [1, 2, 5, 6, 7, 8, 9, 10]
    yield image, table


def patched(source: Path, tmp_path: Path, edit: Any, size: int | None = None) -> Path:
    data = bytearray(source.read_bytes())
    edit(data)
    target = tmp_path / "patched.img"
    target.write_bytes(data)
    if size is not None:
        os.truncate(target, size)
    return target


def last_lba(image: Path) -> int:
    return image.stat().st_size // 512 - 1


def test_primary_header_crc_broken_falls_back_to_the_backup(gpt_disk: tuple[Path, PartitionTable],
                                                            tmp_path: Path) -> None:
    image, good = gpt_disk

    def break_primary(data: bytearray) -> None:
        data[512 + 60] ^= 0x01  # a bit of the disk GUID, CRC left as it was

    result = parse(patched(image, tmp_path, break_primary))
    assert result is not None and result.partitions == good.partitions and result.disk_id == good.disk_id
    assert result.warnings == ("primary GPT is corrupt (header at LBA 1 has a header CRC mismatch); "
                               "using the backup header",)


def test_entry_array_crc_broken_falls_back_to_the_backup(gpt_disk: tuple[Path, PartitionTable],
                                                         tmp_path: Path) -> None:
    image, good = gpt_disk

    def break_entries(data: bytearray) -> None:
        data[1024 + 128 * 3 + 60] ^= 0x20  # the name of entry 4, in the primary array only

    result = parse(patched(image, tmp_path, break_entries))
    assert result is not None and result.partitions == good.partitions
    assert "partition entry array CRC mismatch" in result.warnings[0]


def test_backup_at_4096_byte_sectors(tmp_path: Path) -> None:
    image = images.blank(tmp_path / "disk.img", 24 * MiB)
    images.partition(image, gpt(5, 4096).script, sector_size=4096)
    good = parse(image)
    data = bytearray(image.read_bytes())
    data[4096 + 60] ^= 1
    image.write_bytes(data)
    result = parse(image)
    assert good is not None and result is not None and result.sector_size == 4096
    assert result.partitions == good.partitions and "header CRC mismatch" in result.warnings[0]


def test_both_headers_broken_is_an_error(gpt_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, _ = gpt_disk
    last = last_lba(image)

    def break_both(data: bytearray) -> None:
        data[512 + 60] ^= 1
        data[last * 512 + 60] ^= 1

    with pytest.raises(PartitionTableError) as caught:
        parse(patched(image, tmp_path, break_both))
    assert str(caught.value) == ("the GPT is corrupt: primary header at LBA 1 has a header CRC mismatch; "
                                 f"backup header at LBA {last} has a header CRC mismatch")


def test_both_entry_arrays_broken_is_an_error(gpt_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, _ = gpt_disk
    last = last_lba(image)

    def break_both(data: bytearray) -> None:
        for lba in (1, last):  # entry 1's first LBA, in both arrays
            entries = header_field(data, lba, 512, "entries_lba")
            assert isinstance(entries, int)
            data[entries * 512 + 40] ^= 1

    with pytest.raises(PartitionTableError, match=r"backup header .* partition entry array CRC mismatch"):
        parse(patched(image, tmp_path, break_both))


def test_gpt_claiming_2_to_the_31_entries_is_refused_quickly(gpt_disk: tuple[Path, PartitionTable],
                                                            tmp_path: Path) -> None:
    image, _ = gpt_disk

    def claim(data: bytearray) -> None:
        for lba in (1, last_lba(image)):
            set_header_field(data, lba, 512, "num_entries", 1 << 31)

    target = patched(image, tmp_path, claim)
    begin = time.perf_counter()
    with pytest.raises(PartitionTableError, match="claims 2147483648 partition entries"):
        parse(target)
    assert time.perf_counter() - begin < 0.1


def test_hybrid_mbr_made_by_sfdisk_means_gpt(gpt_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, good = gpt_disk
    target = patched(image, tmp_path, lambda data: None)
    first = good.partitions[0]
    images.run(["sfdisk", "--label-nested", "dos", "-q", "--no-reread", "--no-tell-kernel", str(target)],
               stdin=f"start=1, size=2047, type=ee\nstart={first.start // 512}, size={first.size // 512}, "
                     "type=c, bootable\n")
    result = parse(target)
    assert result is not None and result.label == "gpt" and result.partitions == good.partitions


def test_ebr_chain_looping_back_is_cut_with_a_warning(dos_disk: tuple[Path, PartitionTable],
                                                      tmp_path: Path) -> None:
    image, good = dos_disk
    ext = next(p for p in good.partitions if p.container)

    def loop_back(data: bytearray) -> None:  # the second EBR's link points back at the first EBR
        second = ext.start + struct.unpack_from("<I", data, ext.start + 446 + 16 + 8)[0] * 512
        struct.pack_into("<I", data, second + 446 + 16 + 8, 0)

    result = parse(patched(image, tmp_path, loop_back))
    assert result is not None and result.partitions == good.partitions[:4]  # 1, 2, 5, 6
    assert result.warnings == (f"logical partitions: the EBR chain loops back to sector {ext.start // 512}; "
                               "the partitions after it are ignored",)


def test_partitions_past_the_end_of_the_disk(dos_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, good = dos_disk
    by_number = {p.number: p for p in good.partitions}
    cut = by_number[7].start + 4096  # inside partition 7: 8, 9, 10 start after the end
    result = parse(patched(image, tmp_path, lambda data: None, size=cut))
    assert result is not None
    assert [(p.number, p.size) for p in result.partitions] == [
        (1, by_number[1].size), (2, cut - by_number[2].start), (5, by_number[5].size), (6, by_number[6].size),
        (7, 4096)]  # the EBR of 8 lies past the end too: the chain ends there, as in the kernel
    assert [w.split(" ")[:2] for w in result.warnings] == [["partition", "2"], ["partition", "7"],
                                                           ["logical", "partitions:"]]
    assert "past the end of the disk" in result.warnings[2]


def test_gpt_image_cut_short(gpt_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, good = gpt_disk
    ordered = sorted(good.partitions, key=lambda p: p.start)
    cut = ordered[5].start + 512
    result = parse(patched(image, tmp_path, lambda data: None, size=cut))
    assert result is not None
    assert {p.number for p in result.partitions} == {p.number for p in ordered[:6]}
    assert "image looks truncated" in result.warnings[0] and len(result.warnings) == 1 + 1 + 6


def test_bad_mbr_signature_means_no_table(dos_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, _ = dos_disk

    def unsign(data: bytearray) -> None:
        data[510:512] = b"\x55\xab"

    assert parse(patched(image, tmp_path, unsign)) is None


def test_protective_mbr_without_gpt_is_an_error(gpt_disk: tuple[Path, PartitionTable], tmp_path: Path) -> None:
    image, _ = gpt_disk
    last = last_lba(image)

    def wipe(data: bytearray) -> None:
        data[512:1024] = bytes(512)
        data[last * 512 :] = bytes(512)

    with pytest.raises(PartitionTableError, match="protective partition"):
        parse(patched(image, tmp_path, wipe))


def test_primary_header_claiming_another_place_falls_back(gpt_disk: tuple[Path, PartitionTable],
                                                           tmp_path: Path) -> None:
    image, good = gpt_disk

    def move(data: bytearray) -> None:  # a valid CRC, but the header says it belongs at LBA 2
        set_header_field(data, 1, 512, "my_lba", 2)

    result = parse(patched(image, tmp_path, move))
    assert result is not None and result.partitions == good.partitions
    assert "says it is at LBA 2" in result.warnings[0]


@pytest.mark.parametrize("fstype", ["vfat", "ext4", "xfs"])
def test_whole_disk_filesystems_have_no_table(fstype: str, tmp_path: Path) -> None:
    image = images.blank(tmp_path / "fs.img", 320 * MiB if fstype == "xfs" else 32 * MiB)
    images.mkfs(str(image), fstype)
    if fstype == "vfat":
        assert image.read_bytes()[510:512] == b"\x55\xaa"  # looks like an MBR at first sight
    assert parse(image) is None
