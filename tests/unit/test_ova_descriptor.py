"""Which disks an OVA holds: the OVF's DiskSection, in order, mapped through References to tar members."""

from __future__ import annotations

import io
import tarfile

import pytest

from mountd.errors import InvalidImageError, UnsupportedError
from mountd.image.blockio import BytesReader
from mountd.image.ova import MAX_DISKS, MAX_OVF, ova_disks

ENVELOPE = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>{files}</References>
  <DiskSection><Info>Virtual disks</Info>{disks}</DiskSection>
</Envelope>
"""


def ovf(files: dict[str, str], disks: list[tuple[str, str]], extra: str = "") -> bytes:
    """``files``: id -> href (and any extra attributes); ``disks``: (diskId, fileRef) in order."""
    refs = "".join(f'<File ovf:id="{i}" ovf:href="{href}"{extra}/>' for i, href in files.items())
    section = "".join(f'<Disk ovf:diskId="{d}" ovf:fileRef="{f}" ovf:capacity="1"/>' for d, f in disks)
    return ENVELOPE.format(files=refs, disks=section).encode()


def ova(descriptor: bytes, *members: str, first: str = "vm.ovf") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(first, descriptor), *((m, m.encode() * 3) for m in members)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_disks_in_the_ovfs_order_named_disk1_disk2() -> None:
    descriptor = ovf({"file1": "vm-disk001.vmdk", "file2": "vm-disk002.vmdk"},
                     [("vmdisk2", "file2"), ("vmdisk1", "file1"), ("blank", "")])
    data = ova(descriptor, "vm.mf", "vm-disk001.vmdk", "vm-disk002.vmdk")
    disks = ova_disks(BytesReader(data), "vm.ova")
    assert disks is not None
    assert [(d.name, d.label, d.member.name) for d in disks] == [
        ("disk1", "vmdisk2", "vm-disk002.vmdk"), ("disk2", "vmdisk1", "vm-disk001.vmdk")]
    assert data[disks[0].member.offset:][:disks[0].member.size] == b"vm-disk002.vmdk" * 3


@pytest.mark.parametrize("data", [b"\0" * 4096, ova(b"x", first="README")], ids=["raw", "tar-without-ovf"])
def test_not_an_ova(data: bytes) -> None:
    assert ova_disks(BytesReader(data), "x") is None


@pytest.mark.parametrize(("descriptor", "error", "message"), [
    (ovf({"f": "gone.vmdk"}, [("d", "f")]), InvalidImageError, "names disk file 'gone.vmdk', which is not in"),
    (ovf({}, []), InvalidImageError, "lists no disk"),
    (b"<Envelope><References>", InvalidImageError, "not well-formed XML"),
    (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>', InvalidImageError, "DTD or entities"),
    (ovf({"f": "d.vmdk"}, [("d", "f")], ' ovf:compression="gzip"'), UnsupportedError, "gzip-compressed"),
    (ovf({"f": "d.vmdk"}, [("d", "f")], ' ovf:chunkSize="1024"'), UnsupportedError, "split into chunks"),
    (b" " * (MAX_OVF + 1), InvalidImageError, "more than the 1048576"),
    (ovf({"f": "d.vmdk"}, [("d", "f")] * (MAX_DISKS + 1)), UnsupportedError, "more than 64 disks"),
], ids=["missing-file", "no-disks", "bad-xml", "entities", "compressed", "chunked", "huge-ovf", "many-disks"])
def test_bad_descriptors(descriptor: bytes, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ova_disks(BytesReader(ova(descriptor, "d.vmdk")), "vm.ova")
