"""The NTFS dirty flag and hibernation check (:mod:`mountd.image.ntfs`) on volumes made by mkntfs and written
by ntfs-3g, and on crafted corruptions of them: bounded, never an exception."""

from __future__ import annotations

import random
import struct
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from imgmount_testkit import images
from imgmount_testkit.windows import HIBERNATION_HEADER
from mountd.image import ntfs
from mountd.image.blockio import BytesReader

MiB = images.MiB
MANY = {f"Program Files {i:03d} with a long name.txt": b"x" for i in range(200)}  # root index in INDX blocks


def volume(path: Path, files: Mapping[str, bytes], *, dirty: bool = False, mkntfs: tuple[str, ...] = ()) -> bytes:
    images.blank(path, 16 * MiB)
    images.run(["mkntfs", "-Q", "-F", "-q", *mkntfs, str(path)])
    mnt = path.with_suffix(".mnt")
    mnt.mkdir()
    images.run(["ntfs-3g", str(path), str(mnt)])
    try:
        for name, data in files.items():
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(data)
    finally:
        images.run(["umount", str(mnt)])
    if dirty:
        images.run(["ntfsfix", str(path)])
    return path.read_bytes()


@pytest.mark.parametrize(("files", "dirty", "expected"), [
    ({}, False, ntfs.NtfsState()),
    ({}, True, ntfs.NtfsState(dirty=True)),
    ({"hiberfil.sys": HIBERNATION_HEADER}, False, ntfs.NtfsState(hibernated=True)),
    ({"HIBERFIL.SYS": b"hibr" + bytes(60)}, False, ntfs.NtfsState(hibernated=True)),  # resident, any case
    ({**MANY, "hiberfil.sys": HIBERNATION_HEADER}, False, ntfs.NtfsState(hibernated=True)),
    ({"hiberfil.sys": bytes(4096)}, False, ntfs.NtfsState()),  # what a resumed Windows leaves: no signature
    ({"Windows/hiberfil.sys": HIBERNATION_HEADER}, False, ntfs.NtfsState()),  # not in the root
], ids=["clean", "dirty", "hibernated", "resident-uppercase", "large-root", "resumed", "subdirectory"])
def test_state_of_real_volumes(tmp_path: Path, files: dict[str, bytes], dirty: bool,
                               expected: ntfs.NtfsState) -> None:
    data = volume(tmp_path / "v.img", files, dirty=dirty)
    assert ntfs.state(BytesReader(data)) == expected


@pytest.mark.parametrize("geometry", [("-c", "512"), ("-c", "65536"), ("-s", "4096", "-c", "8192")],
                         ids=["512-byte clusters", "64k clusters", "4k sectors"])
def test_other_geometries(tmp_path: Path, geometry: tuple[str, ...]) -> None:
    """Index blocks smaller than a cluster are addressed in 512-byte units, larger ones in clusters."""
    data = volume(tmp_path / "v.img", {**MANY, "hiberfil.sys": HIBERNATION_HEADER}, mkntfs=geometry)
    assert ntfs.state(BytesReader(data)) == ntfs.NtfsState(hibernated=True)


def test_the_large_root_really_uses_index_blocks(tmp_path: Path) -> None:
    data = volume(tmp_path / "v.img", MANY)
    assert len(index_blocks(data)) >= 2


def index_blocks(data: bytes) -> list[int]:
    return [i for i in range(0, len(data), 4096) if data[i:i + 4] == b"INDX"]


def test_not_ntfs_is_clean(tmp_path: Path) -> None:
    raw = images.blank(tmp_path / "ext4.img", 16 * MiB)
    images.format_region(raw, 0, 16 * MiB, "ext4")
    assert ntfs.state(BytesReader(raw.read_bytes())) == ntfs.NtfsState()
    assert ntfs.state(BytesReader(b"")) == ntfs.NtfsState()


def test_an_index_block_that_points_to_itself_ends(tmp_path: Path) -> None:
    """Every INDX block's end entry turned into a node entry naming the block itself: a cycle."""
    data = bytearray(volume(tmp_path / "v.img", MANY))
    for offset in index_blocks(bytes(data)):
        _point_to_itself(data, offset)
    started = time.monotonic()
    assert ntfs.state(BytesReader(bytes(data))) == ntfs.NtfsState()  # hiberfil.sys is not there
    assert time.monotonic() - started < 2


def _point_to_itself(data: bytearray, offset: int) -> None:
    block = ntfs._fixed(bytes(data[offset:offset + 4096]), b"INDX")
    assert block is not None
    fixed = bytearray(block)
    vcn = struct.unpack_from("<Q", fixed, 0x10)[0]
    first, length = struct.unpack_from("<II", fixed, 0x18)
    pos = 0x18 + first
    while not struct.unpack_from("<H", fixed, pos + 12)[0] & ntfs.ENTRY_END:
        pos += struct.unpack_from("<H", fixed, pos + 8)[0]
    struct.pack_into("<HHH", fixed, pos + 8, 24, 0, ntfs.ENTRY_END | ntfs.ENTRY_NODE)
    struct.pack_into("<Q", fixed, pos + 16, vcn)
    struct.pack_into("<I", fixed, 0x1C, length + 8)
    data[offset:offset + 4096] = _unfixed(fixed)


def _unfixed(block: bytearray) -> bytes:
    """The update sequence applied again: each stride's last two bytes saved, the check value put there."""
    usa_ofs, usa_count = struct.unpack_from("<HH", block, 4)
    check = block[usa_ofs:usa_ofs + 2]
    for i in range(1, usa_count):
        end = i * 512
        block[usa_ofs + 2 * i:usa_ofs + 2 * i + 2] = block[end - 2:end]
        block[end - 2:end] = check
    return bytes(block)


class CountingReader(BytesReader):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_bytes = 0

    def read(self, offset: int, length: int) -> bytes:
        self.read_bytes += length
        return super().read(offset, length)


def test_random_corruption_is_bounded_and_never_raises(tmp_path: Path) -> None:
    """Bytes flipped in the boot sector, the MFT's first records and the root's index blocks."""
    clean = volume(tmp_path / "v.img", {**MANY, "hiberfil.sys": HIBERNATION_HEADER})
    mft = struct.unpack_from("<Q", clean, 0x30)[0] * 4096
    regions = [(0, 512), (mft, 16 * 1024), *((i, 4096) for i in index_blocks(clean))]
    rng = random.Random(10)
    started = time.monotonic()
    for _ in range(300):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 8)):
            start, size = rng.choice(regions)
            data[start + rng.randrange(size)] = rng.randrange(256)
        reader = CountingReader(bytes(data))
        ntfs.state(reader)
        assert reader.read_bytes <= 2 * MiB
    assert time.monotonic() - started < 30


def test_ntfs3g_agrees_on_hibernation(tmp_path: Path) -> None:
    """ntfs-3g's own check: it will not mount the hibernated volume read-write (it falls back to read-only)."""
    path = tmp_path / "v.img"
    volume(path, {"hiberfil.sys": HIBERNATION_HEADER})
    probe = subprocess.run(["ntfs-3g.probe", "--readwrite", str(path)], capture_output=True, text=True,
                           check=False)
    assert probe.returncode != 0 and "hibernated" in (probe.stdout + probe.stderr).lower()
