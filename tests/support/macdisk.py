"""Apple disk images (DMG, UDZO) with known content, written by :mod:`imgmount_testkit.udif` from a raw disk
that the usual tools (sfdisk, mkfs) built; the raw stays beside it for comparisons."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from imgmount_testkit import images, udif
from tests.support.guests import Guest, _content

MiB = images.MiB


@dataclass(frozen=True)
class MacDisk:
    guest: Guest  # its raw disk, and what each volume holds
    dmg: Path
    written: udif.Written


def _files(volume: str) -> dict[str, bytes]:
    """The usual files, and 3 MiB that zlib cannot shrink (stored raw, as hdiutil does)."""
    return {**_content(volume), "noise.bin": random.Random(volume).randbytes(3 * MiB)}


def gpt_dmg(directory: Path) -> MacDisk:
    """GPT with an ext4 partition and an xfs one, as a DMG."""
    raw = images.blank(directory / "mac.raw", 80 * MiB)
    images.partition(raw, "label: gpt\nsize=24MiB, name=data\nsize=40MiB, name=more\n")
    fstypes = {"p1": "ext4", "p2": "xfs"}
    for part, (name, fstype) in zip(images.sfdisk_json(raw)["partitions"], fstypes.items(), strict=True):
        images.format_region(raw, part["start"] * 512, part["size"] * 512, fstype, label=name,
                             files=_files(name))
    guest = Guest(raw, {name: _files(name) for name in fstypes}, fstypes)
    return MacDisk(guest, directory / "mac.dmg", udif.write_udif(raw, directory / "mac.dmg"))


def plain_dmg(directory: Path) -> MacDisk:
    """A filesystem on the whole disk (no partition table), as a DMG."""
    raw = images.blank(directory / "plain.raw", 24 * MiB)
    images.format_region(raw, 0, 24 * MiB, "ext4", label="plain", files=_files("disk"))
    guest = Guest(raw, {"disk": _files("disk")}, {"disk": "ext4"})
    return MacDisk(guest, directory / "plain.dmg", udif.write_udif(raw, directory / "plain.dmg"))
