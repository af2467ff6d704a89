"""An OVA appliance: a tar whose first member is the OVF descriptor, and whose disks are read in place.

The OVF's ``DiskSection`` lists the virtual machine's disks in order, each naming (``ovf:fileRef``) a
``File`` of ``References`` whose ``ovf:href`` is a member of the tar. Disks are called ``disk1``, ``disk2``
... in that order (their volumes ``disk1/p1``, ``disk2/vg/lv``); the OVF's own ``ovf:diskId`` is shown
beside. Disk files that the OVF marks compressed (``ovf:compression``) or split (``ovf:chunkSize``) cannot be
read in place, and say so. The descriptor is untrusted XML: at most :data:`MAX_OVF` bytes, no DTD.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree

from mountd.errors import InvalidImageError, UnsupportedError
from mountd.image.blockio import BlockReader
from mountd.image.tarheaders import Member, is_tar, members_of

MAX_OVF = 1 << 20
MAX_DISKS = 64  # each disk costs a QEMU to probe and one to serve; VMware's largest VM has 60 SCSI disks


@dataclass(frozen=True)
class OvaDisk:
    name: str  # "disk1": what its volumes' names start with
    label: str  # the OVF's diskId, or the member's name
    member: Member


@dataclass(frozen=True)
class _OvfDisk:
    disk_id: str
    href: str
    compression: str
    chunked: bool


def ova_disks(reader: BlockReader, image: str) -> list[OvaDisk] | None:
    """The disks of the OVA ``reader`` reads, in the OVF's order; None when it is not an OVA (no tar, or a
    tar whose first member is no ``.ovf``)."""
    if not is_tar(reader):
        return None
    found = members_of(reader)
    first = next(found, None)
    if first is None or not first.name.lower().endswith(".ovf"):
        return None  # some other tar (or a disk that merely looks like one): not ours to judge
    members = [first, *found]
    by_name: dict[str, Member] = {}
    for m in members:
        by_name.setdefault(m.name, m)
    disks = [_in_archive(d, by_name, image) for d in _ovf_disks(_descriptor(reader, members[0]))]
    if not disks:
        raise InvalidImageError(f"the OVF descriptor of {image} lists no disk (its DiskSection is empty)")
    return [OvaDisk(f"disk{i}", d.disk_id or d.href, m) for i, (d, m) in enumerate(disks, 1)]


def _descriptor(reader: BlockReader, ovf: Member) -> bytes:
    if ovf.size > MAX_OVF:
        raise InvalidImageError(f"the OVF descriptor {ovf.name[:200]} is {ovf.size} bytes, more than the "
                                f"{MAX_OVF} imgmount reads")
    return reader.read(ovf.offset, ovf.size)


def _ovf_disks(text: bytes) -> list[_OvfDisk]:
    if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
        raise InvalidImageError("the OVF descriptor declares a DTD or entities, which no OVF needs")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise InvalidImageError(f"the OVF descriptor is not well-formed XML: {exc}") from None
    files = {_attr(f, "id"): f for f in root.iter() if _local(f.tag) == "File"}
    found: list[_OvfDisk] = []
    for disk in (d for d in root.iter() if _local(d.tag) == "Disk"):
        if len(found) == MAX_DISKS:
            raise UnsupportedError(f"the OVF descriptor lists more than {MAX_DISKS} disks, the most imgmount "
                                   "opens in one OVA")
        file = files.get(_attr(disk, "fileRef"))
        if file is None:
            continue  # a disk the VM creates empty at import: nothing to mount
        found.append(_OvfDisk(_attr(disk, "diskId"), _attr(file, "href"), _attr(file, "compression"),
                              bool(_attr(file, "chunkSize"))))
    return found


def _in_archive(disk: _OvfDisk, members: dict[str, Member], image: str) -> tuple[_OvfDisk, Member]:
    label = (disk.disk_id or disk.href)[:100]
    if disk.compression and disk.compression != "identity":
        raise UnsupportedError(f"disk {label} of {image} is {disk.compression[:20]}-compressed, and imgmount "
                               "reads disks in place only: extract the OVA (tar -x) and decompress it")
    if disk.chunked:
        raise UnsupportedError(f"disk {label} of {image} is split into chunks (ovf:chunkSize): extract the "
                               "OVA (tar -x) and join them")
    member = members.get(disk.href.removeprefix("./"))
    if member is None:
        raise InvalidImageError(f"the OVF descriptor of {image} names disk file {disk.href[:200]!r}, which "
                                "is not in the archive")
    return disk, member


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _attr(element: ElementTree.Element, local: str) -> str:
    return next((v for k, v in element.attrib.items() if _local(k) == local), "")
