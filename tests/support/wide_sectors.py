"""A disk written for 4096-byte logical sectors (a 4Kn drive, or a VM disk with ``logical_block_size=4096``):
its GPT counts LBAs of 4096 bytes, and its filesystems were made on a 4096-byte-sector device."""

from __future__ import annotations

from pathlib import Path

from imgmount_testkit import images
from tests.support.guests import Guest, _content

SECTOR = 4096


def gpt4k_guest(path: Path) -> Guest:
    """GPT (4096-byte sectors): p1 ext4, p2 xfs, p3 an LVM PV of VG ``widevg`` with an ext4 LV ``data``."""
    raw = images.blank(path, 200 * images.MiB)
    images.partition(raw, "label: gpt\nsize=40MiB\nsize=64MiB\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928\n",
                     sector_size=SECTOR)
    parts = images.sfdisk_json(raw, sector_size=SECTOR)["partitions"]
    fstypes = {"p1": "ext4", "p2": "xfs"}
    for part, (name, fstype) in zip(parts, fstypes.items(), strict=False):
        images.format_region(raw, part["start"] * SECTOR, part["size"] * SECTOR, fstype, label=name,
                             files=_content(name), sector_size=SECTOR)
    p3 = parts[2]
    images.make_lvm(raw, p3["start"] * SECTOR, p3["size"] * SECTOR, "widevg",
                    [images.LvSpec("data", 40, "ext4", "data", _content("widevg/data"))])
    fstypes["widevg/data"] = "ext4"
    return Guest(raw, {name: _content(name) for name in fstypes}, fstypes)
