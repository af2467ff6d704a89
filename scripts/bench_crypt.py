"""Benchmark row of issue 10: a cold read of a 256 MiB file through a LUKS2 volume (Ubuntu's layout: LUKS2 ->
LVM -> ext4) against the same file on a plain ext4 partition of the same image. dm-crypt needs device-mapper,
so this runs in the VM lane: ``scripts/bench`` runs it there, and so does

    flock /tmp/imgmount-vm.lock scripts/vm-run --memory 2G -- .venv/bin/python scripts/bench_crypt.py

The engine runs in this process with the passphrase as a caller's key (``MountRequest.keys``); both volumes
are mounted at once from one raw image on the loop backend and read alternately, caches dropped before each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from imgmount_testkit import images
from imgmount_testkit.crypt_layouts import LINUX_FS, luks2_lvm
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.keys import Keys
from mountd.model import MountRequest

MiB = images.MiB
PASSPHRASE = b"bench passphrase"
BIG = 256 * MiB


def build(work: Path) -> Path:
    """GPT: p1 plain ext4, p2 LUKS2 -> vgubuntu/root ext4; both hold the same big.bin."""
    data = os.urandom(BIG)
    raw = images.blank(work / "luks-bench.raw", 720 * MiB)
    images.partition(raw, f"label: gpt\nsize=300MiB, type={LINUX_FS}\ntype={LINUX_FS}\n")
    (p1, p2) = ((p["start"] * 512, p["size"] * 512) for p in images.sfdisk_json(raw)["partitions"])
    images.format_region(raw, *p1, "ext4", files={"big.bin": data})
    luks2_lvm(raw, *p2, PASSPHRASE, {"big.bin": data})
    return raw


def cold_read(path: Path) -> float:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(MiB):
            pass
    return time.perf_counter() - start


def luks_rows(work: Path, repeats: int) -> list[tuple[str, float]]:
    """(volume, MiB/s) for the plain partition and the LUKS2 LV: medians of ``repeats`` alternated reads."""
    raw = build(work)
    engine = Engine(Journal(str(work / "state")))
    request = MountRequest(str(raw), mount_root=str(work / "media"), volumes=("p1", "vgubuntu/root"),
                           keys=Keys(everywhere=PASSPHRASE))
    info = engine.mount(request)
    try:
        files = [(v.name, Path(v.mountpoint) / "big.bin") for v in info.volumes]
        times: dict[str, list[float]] = {name: [] for name, _ in files}
        for _ in range(repeats):
            for name, path in files:
                times[name].append(cold_read(path))
    finally:
        engine.unmount(info.id)
    return [(name, BIG / MiB / statistics.median(t)) for name, t in times.items()]


def print_rows(rows: list[tuple[str, float]], repeats: int) -> None:
    print(f"\n## vm: cold-cache read of a 256 MiB file, LUKS2 vs plain (one raw image, loop), "
          f"median of {repeats}")
    plain = rows[0][1]
    print(f"{'volume':<26} {'MiB/s':>8} {'ratio':>6}")
    for name, mbs in rows:
        label = "p1 (plain ext4)" if name == "p1" else f"{name} (LUKS2+LVM)"
        print(f"{label:<26} {mbs:8.0f} {mbs / plain:6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    where = os.environ.get("IMGMOUNT_VM_WORK") or None
    with tempfile.TemporaryDirectory(prefix="imgmount-bench-luks-", dir=where) as tmp:
        print_rows(luks_rows(Path(tmp), args.repeats), args.repeats)


if __name__ == "__main__":
    main()
