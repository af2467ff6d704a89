"""A guest disk in the Fedora/RHEL installer's thin LVM layout, made with LVM's own tools on a kernel with
device-mapper (the VM lane): GPT with an ext4 ``/boot`` (p1) and an LVM PV (p2) holding VG ``vgthin``, whose
thin pool ``pool00`` holds the thin LVs ``root`` (xfs) and ``home`` (ext4).

A thin pool's btree metadata is written by the kernel, so it cannot be synthesized: the pool and its thin LVs
are created, activated, formatted and filled through a loop device on the PV's partition, then deactivated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from imgmount_testkit import images
from tests.support import guests

VG = "vgthin"
LVM_TYPE = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
NO_BACKUP = "backup { backup = 0 archive = 0 }"
#: thin LV -> its filesystem and virtual size (more than the pool holds: thin LVs are over-provisioned)
THIN_LVS = {"root": ("xfs", "96m"), "home": ("ext4", "48m")}
#: Some of the dm devices LVM's own activation makes for the pool and its thin LVs (it may make more).
HOST_NAMES = frozenset(f"{VG}-{name}" for name in ("pool00_tmeta", "pool00_tdata", "pool00-tpool", *THIN_LVS))


def lvm(dev: str, command: str, *args: str) -> str:
    """An LVM command that sees only ``dev`` and writes no backups (the lane's /etc is not ours)."""
    return images.run([command, "-q", "--devices", dev, "--config", NO_BACKUP, *args], env=images.LVM_ENV)


def thin_guest(path: Path) -> guests.Guest:
    raw = images.blank(path, 160 * guests.MiB)
    images.partition(raw, f"label: gpt\nsize=24MiB\ntype={LVM_TYPE}\n")
    boot, pv = images.sfdisk_json(raw)["partitions"]
    files = {"p1": guests._content("p1")} | {f"{VG}/{lv}": guests._content(f"{VG}/{lv}") for lv in THIN_LVS}
    images.format_region(raw, boot["start"] * 512, boot["size"] * 512, "ext4", label="boot", files=files["p1"])
    with images.loop(raw, pv["start"] * 512, pv["size"] * 512) as dev:
        lvm(dev, "pvcreate", dev)
        lvm(dev, "vgcreate", VG, dev)
        try:
            lvm(dev, "lvcreate", "--yes", "--type", "thin-pool", "-L", "64m", "-n", "pool00", VG)
            for lv, (fstype, size) in THIN_LVS.items():
                lvm(dev, "lvcreate", "--yes", "-V", size, "--thin", "-n", lv, f"{VG}/pool00")
                node = f"/dev/mapper/{VG}-{lv}"
                images.mkfs(node, fstype, label=lv)
                with images.mounted(node) as mnt:
                    put(mnt, files[f"{VG}/{lv}"])
        finally:
            deactivate(dev)
    fstypes = {"p1": "ext4"} | {f"{VG}/{lv}": fstype for lv, (fstype, _) in THIN_LVS.items()}
    return guests.Guest(raw, files, fstypes)


def put(mountpoint: Path, files: Mapping[str, bytes]) -> None:
    for name, data in files.items():
        (mountpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (mountpoint / name).write_bytes(data)


def deactivate(dev: str) -> None:
    """Deactivate the VG, after udev's own auto-activation of it (Debian's 69-lvm.rules) is done."""
    images.run(["udevadm", "settle", "--timeout=60"])
    lvm(dev, "vgchange", "-an", VG)
    images.forget_vg_online(VG)


def host_activated() -> set[str]:
    """LVM's own dm devices for the guest's VG: named "VG-..." (ours are "imgmount-...")."""
    names = (line.split()[0] for line in images.run(["dmsetup", "ls"]).splitlines() if line.strip())
    return {name for name in names if name.startswith(f"{VG}-")}
