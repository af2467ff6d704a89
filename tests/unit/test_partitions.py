"""The partition table parser on tables built byte by byte: formats, recovery rules and hostile input."""

from __future__ import annotations

import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mountd.errors import InvalidArgumentError
from mountd.image.blockio import BytesReader
from mountd.image.partitions import Partition, PartitionTable, PartitionTableError, read_partition_table
from tests.support.tables import (
    ESP,
    LINUX_FS,
    GptEntry,
    Logical,
    MbrEntry,
    SparseReader,
    dos_image,
    fix_entries_crc,
    fix_header_crc,
    gpt_image,
    mbr_sector,
    set_header_field,
    write_sector,
)

DISK = 2048  # sectors: 1 MiB at 512 bytes, 8 MiB at 4096


def parse(image: bytes | bytearray, sector_size: int | None = None) -> PartitionTable | None:
    return read_partition_table(BytesReader(bytes(image)), sector_size)


def table(image: bytes | bytearray, sector_size: int | None = None) -> PartitionTable:
    result = parse(image, sector_size)
    assert result is not None
    return result


def spans(result: PartitionTable) -> list[tuple[int, int, int]]:
    return [(p.number, p.start, p.size) for p in result.partitions]


def sample_gpt(sector_size: int = 512) -> bytearray:
    return gpt_image([GptEntry(0, 128, 255, name="root"), GptEntry(2, 256, 511, ESP, attributes=4),
                      GptEntry(1, 600, 799, name="données ✓")], disk_sectors=DISK, sector_size=sector_size)


def sample_dos() -> bytearray:
    logicals = [Logical(200, 210, 80), Logical(400, 402, 20, 0x8E), Logical(300, 320, 60, 0x82, boot=True)]
    return dos_image([MbrEntry(2, 100, boot=True), None, MbrEntry(200, 400, 0x05), MbrEntry(700, 50, 0x07)],
                     logicals, disk_sectors=DISK)


# ------------------------------------------------------------------------------------- LBA math, CRC


def test_crc32_is_the_gpt_crc() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value UEFI's CRC must match


def test_a_partition_at_sector_128_starts_at_byte_65536_with_512_byte_sectors() -> None:
    assert table(sample_gpt(512)).partitions[0].start == 65536


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_gpt_offsets_are_sectors_times_sector_size(sector_size: int) -> None:
    result = table(sample_gpt(sector_size))  # auto-detected from the header at LBA 1
    assert result.sector_size == sector_size
    assert spans(result) == [(1, 128 * sector_size, 128 * sector_size),
                             (2, 600 * sector_size, 200 * sector_size),
                             (3, 256 * sector_size, 256 * sector_size)]


def test_mbr_offsets_use_the_sector_size_given() -> None:
    image = dos_image([MbrEntry(128, 256)], disk_sectors=DISK, sector_size=4096)
    assert spans(table(image, 4096)) == [(1, 128 * 4096, 256 * 4096)]
    assert spans(table(image)) == [(1, 65536, 256 * 512)]  # MBR does not record its sector size


def test_logical_starts_are_relative_to_their_ebr_and_links_to_the_extended_start() -> None:
    result = table(sample_dos())
    assert [(p.number, p.start // 512, p.size // 512, p.type) for p in result.partitions] == [
        (1, 2, 100, "83"), (3, 200, 400, "5"), (4, 700, 50, "7"),
        (5, 210, 80, "83"), (6, 402, 20, "8e"), (7, 320, 60, "82")]  # chain order, not disk order


# ------------------------------------------------------------------------------------------ fields


def test_gpt_fields() -> None:
    result = table(sample_gpt())
    assert (result.label, result.warnings) == ("gpt", ())
    assert result.disk_id == "5A3C5E0B-2D2E-4C6B-9F0E-0123456789AB"
    first, second, third = result.partitions
    assert first == Partition(1, 65536, 65536, LINUX_FS, "00000000-0000-0000-0000-00000000A000", "root",
                              bootable=False, container=False)
    assert (second.name, second.uuid) == ("données ✓", "00000000-0000-0000-0000-00000000A001")
    assert (third.type, third.bootable, third.name) == (ESP, True, "")


def test_dos_fields() -> None:
    result = table(sample_dos())
    assert (result.label, result.sector_size, result.warnings) == ("dos", 512, ())
    assert result.disk_id == "0x1234abcd"
    by_number = {p.number: p for p in result.partitions}
    assert [n for n, p in by_number.items() if p.bootable] == [1, 7]
    assert [n for n, p in by_number.items() if p.container] == [3]
    assert all(p.uuid == p.name == "" for p in result.partitions)


def test_gpt_names_decode_utf16_up_to_the_first_nul() -> None:
    names = ["a" * 36, "🐧 tux", "x\0hidden", "\udc00lone"]
    image = gpt_image([GptEntry(i, 100 + 10 * i, 109 + 10 * i, name=n) for i, n in enumerate(names)],
                      disk_sectors=DISK)
    assert [p.name for p in table(image).partitions] == ["a" * 36, "🐧 tux", "x", "\ufffdlone"]


@pytest.mark.parametrize("ext_type", [0x05, 0x0F, 0x85])
def test_every_extended_type_holds_logicals(ext_type: int) -> None:
    image = dos_image([MbrEntry(100, 500, ext_type)], [Logical(100, 101, 99), Logical(300, 310, 10)],
                      disk_sectors=DISK, ext_type=ext_type)
    assert spans(table(image)) == [(1, 100 * 512, 500 * 512), (5, 101 * 512, 99 * 512),
                                   (6, 310 * 512, 10 * 512)]


def test_zero_size_entries_are_skipped_and_numbers_keep_their_slot() -> None:
    image = dos_image([MbrEntry(10, 0), MbrEntry(0, 0, 0), None, MbrEntry(100, 10)], disk_sectors=DISK)
    assert spans(table(image)) == [(4, 100 * 512, 10 * 512)]


def test_gpt_numbers_keep_their_index_and_come_sorted() -> None:
    image = gpt_image([GptEntry(127, 100, 199), GptEntry(4, 300, 399), GptEntry(40, 200, 299)],
                      disk_sectors=DISK)
    assert [p.number for p in table(image).partitions] == [5, 41, 128]


def test_a_wide_entry_size_is_read_by_its_first_128_bytes() -> None:
    image = gpt_image([GptEntry(3, 100, 199, name="wide")], disk_sectors=DISK, entry_size=256, num_entries=64)
    assert [(p.number, p.name) for p in table(image).partitions] == [(4, "wide")]


def test_an_ebr_with_two_data_entries_gives_two_logicals_like_the_kernel() -> None:
    image = dos_image([MbrEntry(100, 500, 0x05)], disk_sectors=DISK)
    write_sector(image, 100, 512, mbr_sector([MbrEntry(1, 50), MbrEntry(60, 40, 0x82)], disk_id=0))
    assert spans(table(image))[1:] == [(5, 101 * 512, 50 * 512), (6, 160 * 512, 40 * 512)]


def test_garbage_in_the_third_ebr_entry_is_ignored_like_the_kernel() -> None:
    image = dos_image([MbrEntry(100, 500, 0x05)], disk_sectors=DISK)
    inside, outside = MbrEntry(10, 20), MbrEntry(1000, 20)  # relative to the EBR at 100
    write_sector(image, 100, 512, mbr_sector([MbrEntry(1, 5), None, outside, inside], disk_id=0))
    assert spans(table(image))[1:] == [(5, 101 * 512, 5 * 512), (6, 110 * 512, 20 * 512)]


# --------------------------------------------------------------------------------- choosing a table


@pytest.mark.parametrize("image", [b"", b"\0" * 511, bytes(DISK * 512), mbr_sector([]) + bytes(1024)],
                         ids=["empty", "short", "zeros", "empty-mbr"])
def test_no_table(image: bytes) -> None:
    assert parse(image) is None


def test_no_signature_means_no_table() -> None:
    image = sample_dos()
    image[510:512] = b"\0\0"
    assert parse(image) is None


def test_a_boot_flag_other_than_0_or_80_means_not_a_table() -> None:
    image = sample_dos()
    image[446 + 16] = 0x12
    assert parse(image) is None


@pytest.mark.parametrize("oem", [b"NTFS    ", b"EXFAT   "])
def test_ntfs_and_exfat_boot_sectors_are_whole_disk_filesystems(oem: bytes) -> None:
    image = sample_dos()
    image[3:11] = oem
    assert parse(image) is None


def test_a_fat_boot_sector_is_a_whole_disk_filesystem() -> None:
    image = sample_dos()
    image[0:3] = b"\xeb\x3c\x90"
    struct.pack_into("<HBHB", image, 11, 512, 4, 1, 2)
    image[0x36:0x3E] = b"FAT16   "
    assert parse(image) is None


def test_a_fat_boot_sector_with_ee_in_its_code_is_still_a_filesystem() -> None:
    image = bytearray(mbr_sector([MbrEntry(1, 100, 0xEE)]) + bytes(DISK * 512 - 512))
    image[0:3] = b"\xeb\x58\x90"
    struct.pack_into("<HBHB", image, 11, 512, 8, 32, 2)
    image[0x52:0x5A] = b"FAT32   "
    assert parse(image) is None


def test_hybrid_mbr_means_gpt() -> None:
    hybrid = [MbrEntry(128, 128, 0x0C, boot=True)]
    image = gpt_image([GptEntry(0, 128, 255)], disk_sectors=DISK, hybrid=hybrid)
    result = table(image)
    assert (result.label, spans(result), result.warnings) == ("gpt", [(1, 65536, 65536)], ())


def test_gpt_without_a_protective_mbr_is_used_with_a_warning() -> None:
    image = sample_gpt()
    image[:512] = bytes(512)
    result = table(image)
    assert result.label == "gpt" and result.partitions == table(sample_gpt()).partitions
    assert "no protective MBR" in result.warnings[0]


def test_a_stale_gpt_beside_a_real_mbr_table_is_ignored_with_a_warning() -> None:
    image = sample_gpt()
    image[:512] = sample_dos()[:512]
    result = table(image)
    assert result.label == "dos" and "stale" in result.warnings[0]


def test_protective_mbr_without_any_gpt_is_an_error() -> None:
    image = sample_gpt()
    image[512:1024] = bytes(512)
    image[-512:] = bytes(512)
    with pytest.raises(PartitionTableError, match="protective partition"):
        parse(image)


def test_protective_mbr_with_only_the_backup_header_uses_it() -> None:
    image = sample_gpt()
    image[512:1024] = bytes(512)
    result = table(image)
    assert result.partitions == table(sample_gpt()).partitions
    assert "primary GPT is missing" in result.warnings[0]


def test_an_unsupported_sector_size_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        parse(sample_gpt(), 1024)


# -------------------------------------------------------------------------------------- GPT recovery

LAST = DISK - 1


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("header_crc", 1, "header CRC mismatch"),
    ("signature", b"EFI PARX", "no GPT signature"),
    ("my_lba", 7, "says it is at LBA 7"),
    ("header_size", 91, "invalid header size 91"),
    ("header_size", 513, "invalid header size 513"),
    ("entry_size", 100, "invalid entry size 100"),
    ("entry_size", 192, "invalid entry size 192"),
    ("num_entries", 0, "claims 0 partition entries"),
    ("num_entries", 1 << 31, "claims 2147483648 partition entries"),
    ("entries_lba", 10**12, "partition entries outside the disk"),
    ("first_usable", 5000, "first usable LBA 5000 after last"),
    ("entries_crc", 1, "partition entry array CRC mismatch"),
])
def test_a_bad_primary_falls_back_to_the_backup(field: str, value: int | bytes, reason: str) -> None:
    image = sample_gpt()
    set_header_field(image, 1, 512, field, value, fix_crc=field != "header_crc")
    if field == "signature":  # a missing primary signature is only found through the protective MBR
        reason = "no GPT signature at LBA 1"
    result = table(image)
    assert result.partitions == table(sample_gpt()).partitions
    assert len(result.warnings) == 1 and reason in result.warnings[0] and "backup" in result.warnings[0]


def test_a_corrupt_entry_array_falls_back_to_the_backup() -> None:
    image = sample_gpt()
    image[2 * 512 + 56] ^= 0xFF  # first byte of the name of entry 1
    result = table(image)
    assert result.partitions == table(sample_gpt()).partitions
    assert result.warnings == ("primary GPT is corrupt (header at LBA 1 has a partition entry array CRC "
                               "mismatch); using the backup header",)


def test_both_headers_bad_is_an_error_naming_both() -> None:
    image = sample_gpt()
    set_header_field(image, 1, 512, "header_crc", 1, fix_crc=False)
    set_header_field(image, LAST, 512, "my_lba", 3)
    with pytest.raises(PartitionTableError) as caught:
        parse(image)
    assert str(caught.value) == ("the GPT is corrupt: primary header at LBA 1 has a header CRC mismatch; "
                                 f"backup header at LBA {LAST} says it is at LBA 3")


def test_two_billion_entries_are_refused_quickly() -> None:
    image = sample_gpt()
    for lba in (1, LAST):
        set_header_field(image, lba, 512, "num_entries", 1 << 31)
    begin = time.perf_counter()
    with pytest.raises(PartitionTableError, match="claims 2147483648 partition entries"):
        parse(image)
    assert time.perf_counter() - begin < 0.1


def test_a_corrupt_backup_is_reported_but_the_primary_is_used() -> None:
    image = sample_gpt()
    set_header_field(image, LAST, 512, "header_crc", 1, fix_crc=False)
    result = table(image)
    assert result.partitions == table(sample_gpt()).partitions
    assert result.warnings == (f"backup GPT is corrupt (header at LBA {LAST} has a header CRC mismatch); "
                               "using the primary header",)


def test_entries_outside_the_usable_sectors_are_ignored_with_a_warning() -> None:
    image = gpt_image([GptEntry(0, 1, 100), GptEntry(1, 200, 199), GptEntry(2, 300, 399),
                       GptEntry(3, 2000, 2100)], disk_sectors=DISK)
    result = table(image)
    assert spans(result) == [(3, 300 * 512, 100 * 512)]
    assert [w.split(" (")[0] for w in result.warnings] == [f"GPT partition {n}" for n in (1, 2, 4)]


def test_a_truncated_gpt_image_keeps_what_fits() -> None:
    image = gpt_image([GptEntry(0, 100, 199), GptEntry(1, 1000, 1999)], disk_sectors=4096)[: 1500 * 512]
    result = table(image)  # the backup header is gone with the end of the image: the primary is intact
    assert spans(result) == [(1, 100 * 512, 100 * 512), (2, 1000 * 512, 500 * 512)]
    assert "truncated" in result.warnings[0] and "truncated from 512000 to 256000 bytes" in result.warnings[1]


# ---------------------------------------------------------------------------------------- MBR limits


def test_partitions_past_the_end_are_truncated_or_ignored_like_the_kernel() -> None:
    image = dos_image([MbrEntry(100, 100), MbrEntry(1000, 5000), MbrEntry(DISK, 10), MbrEntry(10, 20)],
                      disk_sectors=DISK)
    result = table(image)
    assert spans(result) == [(1, 100 * 512, 100 * 512), (2, 1000 * 512, (DISK - 1000) * 512),
                             (4, 5120, 10240)]
    assert [w.split(" ")[1] for w in result.warnings] == ["2", "3"]


def test_an_ebr_chain_that_loops_back_is_cut_with_a_warning() -> None:
    logicals = [Logical(100, 101, 49), Logical(200, 201, 49), Logical(300, 301, 49)]
    image = dos_image([MbrEntry(100, 500, 0x05)], logicals, disk_sectors=DISK)
    write_sector(image, 300, 512, mbr_sector([MbrEntry(1, 49), MbrEntry(100, 100, 0x05)], disk_id=0))
    result = table(image)  # the third EBR links back to the second
    assert [p.number for p in result.partitions] == [1, 5, 6, 7]
    assert result.warnings == ("logical partitions: the EBR chain loops back to sector 200; the partitions "
                               "after it are ignored",)


def test_an_ebr_linking_to_itself_is_cut() -> None:
    image = dos_image([MbrEntry(100, 500, 0x05)], disk_sectors=DISK)
    write_sector(image, 100, 512, mbr_sector([MbrEntry(1, 10), MbrEntry(0, 500, 0x05)], disk_id=0))
    result = table(image)
    assert [p.number for p in result.partitions] == [1, 5] and "loops back" in result.warnings[0]


@pytest.mark.parametrize(("ext_start", "warning"), [(0, "sector 0, the MBR itself"),
                                                   (DISK + 5, "past the end of the disk")])
def test_an_extended_partition_in_the_wrong_place(ext_start: int, warning: str) -> None:
    image = dos_image([MbrEntry(10, 10), MbrEntry(ext_start, 100, 0x05)], disk_sectors=DISK)
    result = table(image)
    assert spans(result)[0] == (1, 5120, 5120) and warning in result.warnings[-1]


def test_an_ebr_without_signature_ends_the_chain() -> None:
    logicals = [Logical(100, 101, 49), Logical(200, 201, 49)]
    image = dos_image([MbrEntry(100, 500, 0x05)], logicals, disk_sectors=DISK)
    image[200 * 512 + 510] = 0
    result = table(image)
    assert [p.number for p in result.partitions] == [1, 5] and "0x55AA" in result.warnings[0]


def test_a_chain_of_a_million_ebrs_on_a_huge_disk_stops_at_256() -> None:
    size = 1 << 40
    chunks = {0: mbr_sector([MbrEntry(2048, 1 << 30, 0x05)])}
    for i in range(300):  # EBR i at sector 2048 + 2i: one sector of data, a link to the next
        ebr = mbr_sector([MbrEntry(1, 1), MbrEntry(2 * i + 2, 2, 0x05)], disk_id=0)
        chunks[(2048 + 2 * i) * 512] = ebr
    begin = time.perf_counter()
    result = read_partition_table(SparseReader(size, chunks))
    assert result is not None and len(result.partitions) == 1 + 256
    assert "longer than 256" in result.warnings[0] and time.perf_counter() - begin < 1


# --------------------------------------------------------------------------------- property tests

FAST = settings(deadline=300, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


def check(image: bytes, sector_size: int | None = None) -> None:
    """Anything at all parses to None, a table, or PartitionTableError; partitions always fit the disk."""
    try:
        result = parse(image, sector_size)
    except PartitionTableError as error:
        assert str(error) and "\n" not in str(error)
        return
    if result is None:
        return
    numbers = [p.number for p in result.partitions]
    assert numbers == sorted(set(numbers)) and all(n >= 1 for n in numbers)
    for p in result.partitions:
        assert p.start >= 0 and p.size > 0 and p.start + p.size <= len(image)


@FAST
@given(st.binary(max_size=40000), st.sampled_from([None, 512, 4096]))
def test_arbitrary_bytes(data: bytes, sector_size: int | None) -> None:
    check(data, sector_size)


@FAST
@given(st.binary(max_size=20000), st.booleans(), st.sampled_from([512, 4096]))
def test_arbitrary_bytes_with_signatures(data: bytes, protective: bool, gpt_at: int) -> None:
    image = bytearray(data.ljust(gpt_at + 512, b"\0"))
    image[510:512] = b"\x55\xaa"
    if protective:
        image[446 + 4] = 0xEE
    image[gpt_at : gpt_at + 8] = b"EFI PART"
    check(bytes(image))


SAMPLES = {"gpt": sample_gpt(), "gpt4k": sample_gpt(4096), "dos": sample_dos()}
HOT = {  # where mutations matter most: MBR entries, EBRs, GPT headers and the first entries
    "gpt": [(446, 512), (512, 604), (1024, 1024 + 512), ((DISK - 1) * 512, (DISK - 1) * 512 + 92)],
    "gpt4k": [(446, 512), (4096, 4188), (8192, 8192 + 512), ((DISK - 1) * 4096, (DISK - 1) * 4096 + 92)],
    "dos": [(446, 512), (200 * 512 + 446, 200 * 512 + 512), (300 * 512 + 446, 300 * 512 + 512),
            (400 * 512 + 446, 400 * 512 + 512)],
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, int | None]:
    name = draw(st.sampled_from(sorted(SAMPLES)))
    image = bytearray(SAMPLES[name])
    for _ in range(draw(st.integers(1, 12))):
        lo, hi = draw(st.sampled_from(HOT[name]))
        image[draw(st.integers(lo, hi - 1))] = draw(st.integers(0, 255))
    if name.startswith("gpt") and draw(st.booleans()):  # keep the CRCs right so the checks behind them run
        size = 4096 if name == "gpt4k" else 512
        for lba in (1, DISK - 1):
            if draw(st.booleans()):
                fix_entries_crc(image, lba, size)
            else:
                fix_header_crc(image, lba, size)
    return bytes(image), draw(st.sampled_from([None, 512, 4096]))


@FAST
@given(mutated())
def test_mutated_real_tables(case: tuple[bytes, int | None]) -> None:
    check(*case)


WIDTHS = {"revision": 32, "header_size": 32, "my_lba": 64, "alternate_lba": 64, "first_usable": 64,
          "last_usable": 64, "entries_lba": 64, "num_entries": 32, "entry_size": 32, "entries_crc": 32}


@st.composite
def bad_headers(draw: st.DrawFn) -> bytes:
    """Valid CRCs around hostile header fields, in both headers: what a crafted image would do."""
    image = sample_gpt()
    for lba in (1, DISK - 1):
        for field in draw(st.lists(st.sampled_from(sorted(WIDTHS)), max_size=3)):
            bits = WIDTHS[field]
            value = draw(st.integers(0, (1 << bits) - 1) | st.sampled_from([0, 1, 2, 33, 128, 2047, 2048]))
            set_header_field(image, lba, 512, field, value)
        if draw(st.booleans()):
            fix_entries_crc(image, lba, 512)
    return bytes(image)


@FAST
@given(bad_headers())
def test_crafted_gpt_headers(image: bytes) -> None:
    check(image)


@st.composite
def gpt_layouts(draw: st.DrawFn) -> tuple[list[GptEntry], int]:
    sector_size = draw(st.sampled_from([512, 4096]))
    cuts = sorted(draw(st.sets(st.integers(40, DISK - 40), max_size=16)))
    indexes = draw(st.permutations(range(128)))
    entries = [GptEntry(indexes[i], a, b - 1, draw(st.sampled_from([LINUX_FS, ESP])),
                        name=draw(st.text(max_size=36).filter(lambda s: "\0" not in s)),
                        attributes=draw(st.sampled_from([0, 4, 1 << 60])))
               for i, (a, b) in enumerate(zip(cuts[::2], cuts[1::2], strict=False))]
    return entries, sector_size


@FAST
@given(gpt_layouts())
def test_any_gpt_layout_reads_back(layout: tuple[list[GptEntry], int]) -> None:
    entries, sector_size = layout
    result = table(gpt_image(entries, disk_sectors=DISK, sector_size=sector_size))
    expected = sorted((e.index + 1, e.first * sector_size, (e.last - e.first + 1) * sector_size, e.type,
                       e.unique_guid(), e.name.encode("utf-16-le", "surrogatepass")[:72]
                       .decode("utf-16-le", "replace"), e.attributes == 4) for e in entries)
    got = [(p.number, p.start, p.size, p.type, p.uuid, p.name, p.bootable) for p in result.partitions]
    assert got == expected
    assert result.warnings == ()
