"""md RAID guests: the disks of a RAID1 mirror as an installer leaves them (GPT, "Linux RAID" partitions, the
array's filesystem or LVM PV in each member's data area), with known files.

On this host (no md driver) the superblocks come from imgmount_testkit.mdraid; in the VM lane
:func:`mdadm_guest` builds the pair with ``mdadm --create`` itself.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from imgmount_testkit import images
from imgmount_testkit.mdraid import LINUX_RAID, Array, data_area, examine, format_data_area, write_member
from mountd.host.blockdev import BlockEvents
from tests.support import guests
from tests.support.guests import Guest
from tests.support.hostlvm import reload_rules, settle

MiB = images.MiB
MD_BUILD = "/dev/md100"  # where the VM lane's images are built (imgmount's arrays are md200 and up)
ARRAY = Array("debian:data")
VOLUME = "md/data"
PART = 48 * MiB


def members(raw: Path, count: int) -> list[tuple[int, int]]:
    """A GPT of ``count`` "Linux RAID" partitions of :data:`PART` each: their (offset, size) in bytes."""
    images.partition(raw, "label: gpt\n" + f"size={PART // MiB}MiB, type={LINUX_RAID}\n" * count)
    return [(p["start"] * 512, p["size"] * 512) for p in images.sfdisk_json(raw)["partitions"]]


def mirror_guest(path: Path, version: str = "1.2", *, roles: tuple[int, ...] = (0, 1)) -> Guest:
    """GPT with one partition per role in ``roles`` of a two-disk RAID1 whose array holds ext4."""
    raw = images.blank(path, (len(roles) * PART) + 4 * MiB)
    files = guests._content(VOLUME)
    for role, (offset, size) in zip(roles, members(raw, len(roles)), strict=True):
        format_data_area(raw, offset, size, version, "ext4", files)
        write_member(raw, offset, size, version, ARRAY, role)
    return Guest(raw, {VOLUME: files}, {VOLUME: "ext4"})


def whole_disk_member(path: Path, version: str = "1.0") -> Guest:
    """One disk of a mirror made of whole disks (no partition table): the superblock at the end (1.0, 0.90)
    leaves the filesystem at the disk's start, as boot loaders that cannot read md need."""
    raw = images.blank(path, PART)
    files = guests._content(VOLUME)
    format_data_area(raw, 0, PART, version, "ext4", files)
    write_member(raw, 0, PART, version, ARRAY, 1)
    return Guest(raw, {VOLUME: files}, {VOLUME: "ext4"})


def lvm_mirror_guest(path: Path) -> Guest:
    """The mirror holds an LVM PV of VG ``raidvg`` with an ext4 LV ``root`` (the Debian installer's
    "RAID1, then LVM" layout): a single member, degraded."""
    raw = images.blank(path, PART + 4 * MiB)
    ((offset, size),) = members(raw, 1)
    start, length = data_area("1.2", size)
    lv_files = guests._content("raidvg/root")
    images.make_lvm(raw, offset + start, length, "raidvg", [images.LvSpec("root", 24, "ext4", "root", lv_files)])
    write_member(raw, offset, size, "1.2", ARRAY, 0)
    return Guest(raw, {"raidvg/root": lv_files}, {"raidvg/root": "ext4"})


def mdadm_guest(path: Path, version: str = "1.2", *, count: int = 2, level: int = 1, devices: int = 2,
                lvm: bool = False) -> Guest:
    """The VM lane's array, made by ``mdadm --create`` on loop devices of ``count`` partitions, of ``devices``
    members at RAID ``level`` (with fewer partitions than members: the others "missing", as a disk taken out
    of a running mirror); the array holds ext4 with known files (``lvm``: an LVM PV of VG ``raidvg`` whose LV
    ``root`` holds them, the Debian installer's "RAID, then LVM"), is resynced as an installer's would be, and
    is stopped, and its loop devices gone, before the image is used."""
    raw = images.blank(path, count * PART + 4 * MiB)
    files = guests._content(VOLUME)
    with host_rules_masked():
        events = BlockEvents()  # before the loop devices go: their detach may wait for udev to close them
        with contextlib.ExitStack() as stack:
            devs = [stack.enter_context(images.loop(raw, offset, size)) for offset, size in members(raw, count)]
            images.run(["mdadm", "--create", MD_BUILD, "--run", f"--level={level}", f"--raid-devices={devices}",
                        *(["--assume-clean"] if level == 1 else []), f"--metadata={version}", "--name=data",
                        "--homehost=debian", *devs, *["missing"] * (devices - count)])
            try:
                if lvm:
                    _fill_lvm(MD_BUILD, files, path.parent)
                else:
                    _fill(MD_BUILD, files)
                _resynced(MD_BUILD)
            finally:
                images.run(["mdadm", "--stop", MD_BUILD])
        if not events.wait(lambda: not any(_attached(d) for d in devs), 30):
            raise RuntimeError(f"the build's loop devices {devs} are still attached 30 s after their detach")
    volume = "raidvg/root" if lvm else VOLUME
    return Guest(raw, {volume: files}, {volume: "ext4"})


def _fill_lvm(device: str, files: dict[str, bytes], work: Path) -> None:
    """VG ``raidvg`` with LV ``root`` (ext4 holding ``files``) on ``device``: made in a file by the LVM tools
    (metadata only, nothing activated), then copied onto the array."""
    size = int(images.run(["blockdev", "--getsize64", device]))
    plain = images.blank(work / "raid-lvm.raw", size)
    images.make_lvm(plain, 0, size, "raidvg", [images.LvSpec("root", 24, "ext4", "root", files)])
    with open(plain, "rb") as src, open(device, "r+b") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    plain.unlink()


def _resynced(device: str) -> None:
    """mdadm --wait: until the array's initial resync (parity, copies) is done; it exits 1 when there was
    none to wait for."""
    done = subprocess.run(["mdadm", "--wait", device], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode not in {0, 1}:
        raise RuntimeError(f"mdadm --wait {device} failed ({done.returncode}): {done.stderr.strip()}")


def examined(raw: Path, offset: int, size: int) -> dict[str, str]:
    """``mdadm --examine`` of a member, on a loop device the host's assembly is kept away from (else the host
    would assemble the image's array from that loop device, and mdadm would later join our members to it)."""
    with host_rules_masked():
        events = BlockEvents()
        shown = examine(raw, offset, size)
        device = images.run(["losetup", "--associated", str(raw), "--noheadings", "-O", "NAME"]).split()
        if not events.wait(lambda: not any(_attached(d) for d in device), 30):
            raise RuntimeError(f"the loop device of mdadm --examine is still attached: {device}")
    return shown


def _fill(device: str, files: dict[str, bytes]) -> None:
    images.mkfs(device, "ext4", "raid")
    with images.mounted(device) as mnt:
        for name, data in files.items():
            (mnt / name).parent.mkdir(parents=True, exist_ok=True)
            (mnt / name).write_bytes(data)


def _attached(device: str) -> bool:
    return Path("/sys/block", Path(device).name, "loop", "backing_file").exists()


#: Debian's rules that act on what appears on a block device: md assembly, and LVM auto-activation (69-lvm.rules
#: activates the VG on the build's array once a PV label shows on it, and the array cannot be stopped).
HOST_RULES = ("64-md-raid-assembly.rules", "69-lvm.rules")


@contextlib.contextmanager
def host_rules_masked() -> Iterator[None]:
    """:data:`HOST_RULES` masked (a rule file of that name in /run/udev/rules.d wins) while an image is built:
    the host would assemble the members on the build's loop devices again after the array is stopped, or
    activate the VG on it, and keep them busy. What the tests test is imgmount's devices, not these."""
    masks = [Path("/run/udev/rules.d", name) for name in HOST_RULES]
    for mask in masks:
        mask.parent.mkdir(parents=True, exist_ok=True)
        mask.write_text("# masked while a test image is built\n")
    reload_rules()
    try:
        yield
    finally:
        settle()
        for mask in masks:
            mask.unlink()
        reload_rules()
