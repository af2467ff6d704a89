"""mountd.image.luks on headers written by ``cryptsetup luksFormat`` and by QEMU, compared with
``cryptsetup luksDump``; a damaged primary LUKS2 header falls back to the secondary copy, as cryptsetup does."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from imgmount_testkit.crypt_images import ext4_with, luks1_volume, luks_format, qemu_keyed, secret_file
from imgmount_testkit.images import MiB, blank, run
from mountd.image.blockio import FileReader, SliceReader
from mountd.image.luks import LuksHeader, LuksHeaderError, read_header

SECRET = b"correct horse"


def header_of(path: Path, offset: int = 0, size: int | None = None) -> LuksHeader | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = FileReader(fd)
        return read_header(SliceReader(reader, offset, reader.size - offset if size is None else size))
    finally:
        os.close(fd)


def dumped(path: Path, field: str) -> str:
    match = re.search(rf"^\s*{field}:\s*(.*)$", run(["cryptsetup", "luksDump", str(path)]), re.M)
    assert match, field
    return match.group(1).strip()


def test_luks1_from_cryptsetup(workdir: Path) -> None:
    image = blank(workdir / "v.img", 16 * MiB)
    luks_format(image, SECRET, version=1)
    header = header_of(image)
    assert header is not None
    assert (header.version, header.kind, header.label) == (1, "LUKS1", "")
    assert header.uuid == dumped(image, "UUID")
    assert header.payload_offset == int(dumped(image, "Payload offset")) * 512
    assert header.cipher == f"{dumped(image, 'Cipher name')}-{dumped(image, 'Cipher mode')}"
    assert header.payload_size is None


def test_luks2_from_cryptsetup(workdir: Path) -> None:
    image = blank(workdir / "v.img", 16 * MiB)
    luks_format(image, SECRET, version=2, label="cryptroot")
    header = header_of(image)
    assert header is not None
    assert (header.version, header.kind, header.label) == (2, "LUKS2", "cryptroot")
    assert header.uuid == dumped(image, "UUID")
    assert header.payload_offset == int(dumped(image, "offset").split()[0])
    assert header.cipher == dumped(image, "cipher")
    assert header.sector_size == int(dumped(image, "sector").split()[0])


def test_luks1_in_a_partition_window(workdir: Path) -> None:
    fs = ext4_with(workdir / "fs.raw", 8 * MiB, {"a": b"x"})
    volume = luks1_volume(workdir / "v.luks", SECRET, fs)
    disk = blank(workdir / "disk.img", 32 * MiB)
    with open(volume, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(MiB)
        dst.write(src.read())
    header = header_of(disk, MiB, volume.stat().st_size)
    assert header is not None and header.version == 1
    assert header.payload_offset == int(dumped(volume, "Payload offset")) * 512
    assert header_of(disk) is None  # the disk itself is not LUKS


def test_luks1_created_by_qemu(workdir: Path) -> None:
    with secret_file(SECRET) as secret:
        qemu_keyed(["qemu-img", "create", "-q", "-f", "luks", "--object", f"secret,id=s,file={secret}",
                    "-o", "key-secret=s,iter-time=100", str(workdir / "q.luks"), "4M"])
    header = header_of(workdir / "q.luks")
    assert header is not None and header.version == 1
    assert header.payload_offset == int(dumped(workdir / "q.luks", "Payload offset")) * 512


def test_damaged_primary_luks2_header_uses_the_secondary(workdir: Path) -> None:
    image = blank(workdir / "v.img", 16 * MiB)
    luks_format(image, SECRET, version=2, label="backup")
    with open(image, "r+b") as f:
        f.seek(4096 + 100)  # inside the primary JSON area: its checksum fails
        f.write(b"garbage")
    header = header_of(image)
    assert header is not None and header.label == "backup"


def test_both_luks2_headers_damaged(workdir: Path) -> None:
    image = blank(workdir / "v.img", 16 * MiB)
    luks_format(image, SECRET, version=2)
    with open(image, "r+b") as f:
        for copy in (0, 16384):
            f.seek(copy + 4096 + 100)
            f.write(b"garbage")
    with pytest.raises(LuksHeaderError, match="checksum"):
        header_of(image)
