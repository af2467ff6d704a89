"""OVA appliances as VirtualBox exports them: streamOptimized VMDKs, an OVF 1.0 descriptor (References,
DiskSection), a SHA256 manifest, all in a ustar archive with the descriptor first."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from imgmount_testkit.images import convert, run

VMDK_FORMAT = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
OVF = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
    xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
    xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
    xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
{files}
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
{disks}
  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96"><Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description></OperatingSystemSection>
  </VirtualSystem>
</Envelope>
"""


def vmdk_name(name: str, number: int) -> str:
    return f"{name}-disk{number:03d}.vmdk"


def build_ova(workdir: Path, name: str, raws: Sequence[Path]) -> Path:
    """``workdir/name.ova`` holding each raw disk as ``name-disk00N.vmdk``; the VMDKs stay in ``workdir``."""
    vmdks = [convert(raw, workdir / vmdk_name(name, i), "vmdk", "subformat=streamOptimized")
             for i, raw in enumerate(raws, 1)]
    ovf = workdir / f"{name}.ovf"
    ovf.write_text(ovf_descriptor(name, [v.name for v in vmdks],
                                  [(i, raw.stat().st_size) for i, raw in enumerate(raws, 1)]))
    manifest = workdir / f"{name}.mf"
    manifest.write_text("".join(f"SHA256 ({p.name}) = {_sha256(p)}\n" for p in (ovf, *vmdks)))
    ova = workdir / f"{name}.ova"
    run(["tar", "--format=ustar", "-cf", str(ova), "-C", str(workdir), ovf.name, manifest.name,
         *(v.name for v in vmdks)])
    return ova


def ovf_descriptor(name: str, files: Sequence[str], disks: Sequence[tuple[int, int]]) -> str:
    """VirtualBox's OVF 1.0: ``files`` as References (file1, file2 ...), ``disks`` as (file number,
    capacity) in the DiskSection (vmdisk1, vmdisk2 ...)."""
    refs = "\n".join(f'    <File ovf:id="file{i}" ovf:href="{href}"/>' for i, href in enumerate(files, 1))
    section = "\n".join(f'    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk{i}" ovf:fileRef="file{f}" '
                        f'ovf:format="{VMDK_FORMAT}"/>' for i, (f, capacity) in enumerate(disks, 1))
    return OVF.format(files=refs, disks=section, name=name)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tar_header(name: bytes, size_field: bytes, kind: bytes = b"0", *, checksum: int | None = None) -> bytes:
    """One ustar header with a raw 12-byte size field (octal, base-256 or garbage) and the right checksum
    (unless one is given): for crafted archives."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136] = size_field.ljust(12, b"\0")
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    total = sum(h[:148]) + 8 * 32 + sum(h[156:]) if checksum is None else checksum
    h[148:156] = f"{total:06o}\0 ".encode()
    return bytes(h)


def octal(n: int) -> bytes:
    """A tar size field holding ``n``."""
    return f"{n:011o}\0".encode()
