"""The ntfs-3g row of scripts/bench (issue 10): a cold read of a 256 MiB file through ntfs-3g (FUSE, how
Debian 12 mounts NTFS) against the same bytes in a file on a plain ext4 volume of the same image.

One raw GPT image holds both volumes (ext4, then NTFS made by mkntfs and filled through ntfs-3g); imgmount
mounts both in one mount (loop devices, so only the filesystem drivers differ). Each NTFS read is alternated
with an ext4 read, caches dropped before each, so both see the same disk and cache weather: medians.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

from imgmount_testkit import images, windows

MiB = images.MiB
SIZE = 256 * MiB
VOLUME = 320 * MiB
NTFS_BASIC = windows.BASIC


def build(work: Path) -> Path:
    raw = images.blank(work / "ntfs-vs-ext4.raw", 2 * VOLUME + 4 * MiB)
    size = f"size={VOLUME // MiB}MiB"
    images.partition(raw, f"label: gpt\n{size}\n{size}, type={NTFS_BASIC}\n")
    p1, p2 = images.sfdisk_json(raw)["partitions"]
    data = {"big.bin": os.urandom(SIZE)}
    images.format_region(raw, p1["start"] * 512, p1["size"] * 512, "ext4", files=data)
    windows.format_volume(raw, p2["start"] * 512, p2["size"] * 512, "ntfs", data)
    return raw


def rows(work: Path, repeats: int, mount: Callable[..., str], unmount: Callable[[str], None],
         cold: Callable[[Callable[[], object]], float]) -> list[tuple[str, float, float]]:
    """(volume, MiB/s, MiB/s of the ext4 volume alternated with it); ``mount``/``unmount``: scripts/bench's
    imgmount and imgumount, ``cold``: its timed read after dropping caches."""
    raw = build(work)
    info = json.loads(mount(str(raw), "--mount-root", str(work / "media")))
    try:
        files = {v["name"]: Path(v["mountpoint"]) / "big.bin" for v in info["volumes"]}
        pairs = [(cold(lambda: _read(files["p2"])), cold(lambda: _read(files["p1"])))
                 for _ in range(repeats)]
    finally:
        unmount(str(raw))
    ntfs_s = statistics.median(n for n, _ in pairs)
    ext4_s = statistics.median(e for _, e in pairs)
    return [("ntfs-3g (FUSE, loop)", SIZE / MiB / ntfs_s, SIZE / MiB / ext4_s)]


def _read(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
