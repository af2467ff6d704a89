"""Our partition parser against the Linux kernel's own: each layout is served on /dev/nbdN by qemu-nbd,
``partprobe`` makes the kernel read it, and every kernel partition node must match what
``mountd.image.partitions`` reads from the same device, to the sector.

The kernel shows an MBR extended partition (the container of the logicals) as a 1 KiB node (2 sectors of
512 bytes), so that nothing mistakes it for a volume: for containers only the start is compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.image.blockio import FileReader
from mountd.image.partitions import PartitionTable, read_partition_table
from tests.support import nbd

SECTOR = 512  # sysfs start/size unit
KERNEL_SCAN_TIMEOUT = 10.0
CONTAINER_NODE_SECTORS = 2


@dataclass(frozen=True)
class Layout:
    name: str
    fmt: str  # what the raw image is converted to before qemu-nbd serves it
    script: str  # sfdisk script; "{img}" stands for the image path (to number entries explicitly)
    size: int = 64 * images.MiB


LAYOUTS = [
    Layout("mbr-primaries", "raw", """label: dos
        start=2048, size=16384, type=83, bootable
        start=20480, size=8192, type=82
        start=40960, size=10000, type=7
        start=65536, size=20000, type=c
        """),
    Layout("mbr-extended-logicals", "qcow2", """label: dos
        start=2048, size=8M, type=83
        start=18432, size=40M, type=5
        start=112640, size=8M, type=c, bootable
        size=4M
        size=6M
        size=3M, type=82
        size=8M, type=7
        size=2M
        """),
    Layout("mbr-extended-lba-gaps", "vmdk", """label: dos
        {img}1 : start=2048, size=4M
        {img}3 : start=10240, size=50M, type=f
        {img}5 : start=12288, size=3M
        {img}6 : start=30000, size=5M
        {img}7 : start=60000, size=2M
        """),
    Layout("gpt-several", "qcow2", """label: gpt
        size=8M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
        size=4M, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name=swap
        size=16M, type=E6D6D379-F507-44C2-A23C-238F2A3DF928, name=lvm
        size=10M, name=root, attrs="LegacyBIOSBootable"
        size=3M, name=data
        """),
    Layout("gpt-gaps-unordered", "raw", """label: gpt
        {img}3 : start=2048, size=8M, name=three
        {img}1 : start=40960, size=4M, name=one
        {img}7 : start=100000, size=2M, name=seven
        {img}12 : start=20480, size=5000, name=twelve
        """),
    Layout("gpt-fifteen", "qcow2", "label: gpt\n" + "size=3M\n" * 15),  # nbd max_part=16: p1..p15
]


def build(layout: Layout, directory: Path) -> Path:
    raw = images.blank(directory / f"{layout.name}.raw", layout.size)
    script = "\n".join(line.strip() for line in layout.script.splitlines()) + "\n"
    images.partition(raw, script.replace("{img}", str(raw)))
    if layout.fmt == "raw":
        return raw
    return images.convert(raw, directory / f"{layout.name}.{layout.fmt}", layout.fmt)


def parse(path: Path | str, size: int | None = None) -> PartitionTable:
    fd = os.open(path, os.O_RDONLY)
    try:
        table = read_partition_table(FileReader(fd, size))
    finally:
        os.close(fd)
    assert table is not None, f"no partition table found in {path}"
    return table


def mismatches(table: PartitionTable, kernel: dict[int, nbd.KernelPartition]) -> list[str]:
    """Every difference between our reading and the kernel's, one line each."""
    ours = {p.number: p for p in table.partitions}
    problems = [f"partition {n}: kernel only ({kernel[n]})" for n in sorted(kernel.keys() - ours.keys())]
    problems += [f"partition {n}: ours only ({ours[n]})" for n in sorted(ours.keys() - kernel.keys())]
    for number in sorted(ours.keys() & kernel.keys()):
        part, node = ours[number], kernel[number]
        start, size = part.start // SECTOR, part.size // SECTOR
        if node.start != start:
            problems.append(f"partition {number}: start {start} (ours) != {node.start} (kernel)")
        if part.container and node.size != CONTAINER_NODE_SECTORS:
            problems.append(f"partition {number}: extended container node of {node.size} sectors, not {CONTAINER_NODE_SECTORS}")
        if not part.container and node.size != size:
            problems.append(f"partition {number}: size {size} (ours) != {node.size} (kernel)")
    return problems


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_kernel_sees_our_partitions(layout: Layout, scratch: Path, free_nbd: str) -> None:
    image = build(layout, scratch)
    expected = parse(scratch / f"{layout.name}.raw")
    numbers = {p.number for p in expected.partitions}
    name = Path(free_nbd).name
    with nbd.attached(image, layout.fmt, free_nbd) as events:
        # The kernel scans the device on connect by itself; let that finish so partprobe does not race it.
        events.wait_until(lambda: nbd.kernel_partitions(name).keys() == numbers, KERNEL_SCAN_TIMEOUT)
        images.run(["partprobe", free_nbd])
        # A timeout here is not an error by itself: the comparison below says what differs.
        events.wait_until(lambda: nbd.kernel_partitions(name).keys() == numbers, KERNEL_SCAN_TIMEOUT)
        kernel = nbd.kernel_partitions(name)
        through_device = parse(free_nbd, nbd.device_size(name))
    assert through_device == expected, f"{layout.fmt} served by qemu-nbd reads differently from the raw image"
    assert not expected.warnings
    assert mismatches(expected, kernel) == []
