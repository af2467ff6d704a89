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
    files = "\n".join(f'    <File ovf:id="file{i}" ovf:href="{v.name}"/>' for i, v in enumerate(vmdks, 1))
    disks = "\n".join(f'    <Disk ovf:capacity="{raw.stat().st_size}" ovf:diskId="vmdisk{i}" '
                      f'ovf:fileRef="file{i}" ovf:format="{VMDK_FORMAT}"/>' for i, raw in enumerate(raws, 1))
    ovf = workdir / f"{name}.ovf"
    ovf.write_text(OVF.format(files=files, disks=disks, name=name))
    manifest = workdir / f"{name}.mf"
    manifest.write_text("".join(f"SHA256 ({p.name}) = {_sha256(p)}\n" for p in (ovf, *vmdks)))
    ova = workdir / f"{name}.ova"
    run(["tar", "--format=ustar", "-cf", str(ova), "-C", str(workdir), ovf.name, manifest.name,
         *(v.name for v in vmdks)])
    return ova


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
