"""Guest disks with known content, for mount tests: what each volume should show once mounted."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from imgmount_testkit import images

MiB = images.MiB


@dataclass(frozen=True)
class Guest:
    raw: Path
    files: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)  # volume name -> path -> bytes
    fstypes: Mapping[str, str] = field(default_factory=dict)  # volume name -> filesystem type


def _content(volume: str) -> dict[str, bytes]:
    return {"hello.txt": f"hello from {volume}\n".encode(), "dir/blob.bin": hashlib.sha256(volume.encode()).digest() * 512}


def gpt_guest(path: Path) -> Guest:
    """GPT: p1 ext4, p2 xfs, p3 btrfs, p4 an LVM PV of VG ``guestvg`` with a linear ext4 LV ``root``."""
    raw = images.blank(path, 480 * MiB)
    images.partition(raw, "label: gpt\nsize=96MiB\nsize=48MiB\nsize=120MiB\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    parts = images.sfdisk_json(raw)["partitions"]
    fstypes = {"p1": "ext4", "p2": "xfs", "p3": "btrfs"}
    for part, (name, fstype) in zip(parts, fstypes.items(), strict=False):
        images.format_region(raw, part["start"] * 512, part["size"] * 512, fstype, label=name, files=_content(name))
    p4 = parts[3]
    images.make_lvm(raw, p4["start"] * 512, p4["size"] * 512, "guestvg",
                    [images.LvSpec("root", 100, "ext4", "root", _content("guestvg/root"))])
    fstypes["guestvg/root"] = "ext4"
    return Guest(raw, {name: _content(name) for name in fstypes}, fstypes)


def small_gpt_guest(path: Path) -> Guest:
    """GPT, small: p1 ext4, p2 an LVM PV of VG ``guestvg`` with a linear ext4 LV ``root`` (a partition node
    and a device-mapper LV, for what varies with the image format and not with the filesystems)."""
    raw = images.blank(path, 96 * MiB)
    images.partition(raw, "label: gpt\nsize=32MiB\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    p1, p2 = images.sfdisk_json(raw)["partitions"]
    images.format_region(raw, p1["start"] * 512, p1["size"] * 512, "ext4", label="p1", files=_content("p1"))
    images.make_lvm(raw, p2["start"] * 512, p2["size"] * 512, "guestvg",
                    [images.LvSpec("root", 40, "ext4", "root", _content("guestvg/root"))])
    fstypes = {"p1": "ext4", "guestvg/root": "ext4"}
    return Guest(raw, {name: _content(name) for name in fstypes}, fstypes)


def mbr_guest(path: Path) -> Guest:
    """MBR: p1 ext4, an extended partition p2 with logicals p5 ext4 and p6 xfs."""
    raw = images.blank(path, 160 * MiB)
    images.partition(raw, "label: dos\nsize=32MiB, type=83\ntype=5\nsize=40MiB, type=83\nsize=60MiB, type=83\n")
    parts = {re.search(r"(\d+)$", p["node"])[1]: p for p in images.sfdisk_json(raw)["partitions"]}  # type: ignore[index]
    fstypes = {"p1": "ext4", "p5": "ext4", "p6": "xfs"}
    for name, fstype in fstypes.items():
        part = parts[name[1:]]
        images.format_region(raw, part["start"] * 512, part["size"] * 512, fstype, label=name, files=_content(name))
    return Guest(raw, {name: _content(name) for name in fstypes}, fstypes)


def whole_disk_guest(path: Path, fstype: str = "ext4") -> Guest:
    """No partition table: a filesystem on the whole disk."""
    raw = images.blank(path, 64 * MiB)
    images.format_region(raw, 0, 64 * MiB, fstype, label="whole", files=_content("disk"))
    return Guest(raw, {"disk": _content("disk")}, {"disk": fstype})


def check_files(mountpoint: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        assert (mountpoint / name).read_bytes() == data, f"{name} differs in {mountpoint}"
