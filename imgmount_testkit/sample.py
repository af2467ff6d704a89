"""The sample image of the README and ``scripts/demo``: a qcow2 holding a GPT with an ext4 partition and an
LVM physical volume whose volume group ``demo`` has an ext4 LV and an xfs LV, each with a file in it."""

from __future__ import annotations

import sys
from pathlib import Path

from imgmount_testkit import images

SIZE = 512 * images.MiB
TABLE = """label: gpt
size=64MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=boot
type=E6D6D379-F507-44C2-A23C-238F2A3DF928, name=lvm
"""
FILES = {
    "boot": {"hello.txt": b"hello from the boot partition\n"},
    "root": {"etc/os-release": b'NAME="imgmount sample"\n'},
    "data": {"notes.txt": b"xfs logical volume\n"},
}


def build(directory: Path) -> Path:
    """Build ``directory/sample.qcow2`` (and leave nothing else behind)."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = images.blank(directory / "sample.raw", SIZE)
    try:
        images.partition(raw, TABLE)
        boot, lvm = images.sfdisk_json(raw)["partitions"]
        images.format_region(raw, boot["start"] * 512, boot["size"] * 512, "ext4", label="boot",
                             files=FILES["boot"])
        images.make_lvm(raw, lvm["start"] * 512, lvm["size"] * 512, "demo", [
            images.LvSpec("root", 128, "ext4", "root", FILES["root"]),
            images.LvSpec("data", 300, "xfs", "data", FILES["data"]),
        ])
        return images.convert(raw, directory / "sample.qcow2", "qcow2")
    finally:
        raw.unlink()


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
