"""Locked volumes and images: what locks them (for ``--info``), and the layers that unlock a LUKS1 volume
without device-mapper (the keys are tried as :mod:`mountd.engine.imagekeys` says).

A LUKS1 volume on a host without device-mapper is opened by QEMU's own ``luks`` block driver over a raw
window of the attached disk (the partition's or LV's bytes), exported through FUSE as a plain file of the
decrypted data, with a loop device on it: two layers (``fuse``, ``loop``) of the volume, each journalled,
verified and rolled back like any other. QEMU 7.2 reads LUKS1 only; a LUKS2 volume there needs dm-crypt.

The legacy AES encryption of qcow2 has no way to tell a wrong key: it decrypts to noise. Such an image
opened with a wrong key shows neither a partition table nor a filesystem, and that is reported as the
wrong passphrase it almost certainly is.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from typing import TYPE_CHECKING

from mountd.engine.backends import Disk, export_path
from mountd.engine.imagekeys import HOW_TO_GIVE, KeyNeededError, with_each_key
from mountd.engine.inspection import DiskLayout, Volume, VolumeKind, analyse_disk
from mountd.engine.stack import MountStack
from mountd.errors import UnsupportedError, WrongKeyError
from mountd.host.qemusecret import SECRET_ID
from mountd.host.support import HostSupport
from mountd.image.blockio import FileReader, SliceReader
from mountd.image.imageinfo import ImageInfo
from mountd.image.luks import LuksHeader, read_header
from mountd.layers.fuse import ExportSpec
from mountd.layers.loop import LoopSpec

if TYPE_CHECKING:
    from mountd.model import MountRequest

#: The signatures (blkid types) of volumes that need a key.
LOCKED_TYPES = ("crypto_LUKS", "BitLocker")


def is_locked(volume: Volume) -> bool:
    return volume.signature is not None and volume.signature.type in LOCKED_TYPES


def can_unlock(volume: Volume, host: HostSupport) -> bool:
    """Whether ``host`` unlocks ``volume``, so that a mount of every volume includes it and asks for its key:
    LUKS through dm-crypt, else LUKS1 through QEMU's luks driver; BitLocker through dislocker's FUSE. Others
    are mounted only when named, and then say what they need."""
    kind = lock_kind(volume)
    if kind == "BitLocker":
        return host.fuse and host.has("dislocker-fuse")
    dm_crypt = host.device_mapper and host.has("cryptsetup")
    return kind.startswith("LUKS") and (dm_crypt or (kind == "LUKS1" and host.fuse_exports))


def key_needed(volume: Volume) -> KeyNeededError:
    return KeyNeededError(f"volume {volume.name} is locked ({lock_kind(volume)}): give its passphrase "
                          f"({HOW_TO_GIVE})")


def lock_kind(volume: Volume) -> str:
    """How ``--info`` names the lock: "LUKS1", "LUKS2", "BitLocker"."""
    sig = volume.signature
    if sig is None or sig.type not in LOCKED_TYPES:
        return ""
    if sig.type == "crypto_LUKS":
        return f"LUKS{sig.version}" if sig.version else "LUKS"
    return sig.type


def image_lock_kind(info: ImageInfo) -> str:
    """How ``--info`` names QEMU's encryption of the image: "QEMU luks", "QEMU aes" ("": none)."""
    return f"QEMU {info.encryption}" if info.encryption else ""


def check_decrypted(info: ImageInfo, layout: DiskLayout) -> None:
    """Legacy AES decrypts with any key: nothing recognisable inside means the key was wrong."""
    if info.encryption == "aes" and layout.table is None and not any(v.signature for v in layout.volumes):
        raise WrongKeyError("wrong passphrase for the image: with it, the image (QEMU's legacy AES "
                            "encryption, which cannot check a passphrase) holds nothing recognisable")


def unlock_volume(stack: MountStack, disk: Disk, volume: Volume,
                  request: MountRequest) -> list[tuple[str, Volume]]:
    """Unlock a LUKS1 ``volume`` through QEMU's luks driver: each block device inside it to mount (a loop
    device), with the volume it holds: the volume itself with its filesystem, or the linear LVs of an LVM
    physical volume inside."""
    kind = lock_kind(volume)
    if volume.offset is None:
        raise UnsupportedError(f"volume {volume.name} is {kind} on a volume that needs device-mapper")
    header = _header(disk.node, volume)
    if header.version != 1:
        need = ("cryptsetup (package cryptsetup-bin), which this host lacks" if disk.device_mapper
                else "device-mapper (dm-crypt), which this kernel lacks")
        raise UnsupportedError(f"volume {volume.name} is {kind}: unlocking it needs {need} (QEMU's luks "
                               "driver reads LUKS1 only)")
    secrets = request.keys.for_volume(volume.name)
    if not secrets:
        raise key_needed(volume)
    payload = volume.size - header.payload_offset
    blockdev = _luks_blockdev(disk.node, volume.offset, volume.size)
    export = export_path(stack.journal.root, f"{stack.record.id}-{len(stack.record.layers)}")

    def attach(key_fd: int) -> str:
        spec = ExportSpec(blockdev, export, request.read_only, "", payload, key_fd=key_fd)
        return stack.push(spec.plan(volume.name), fds=(key_fd,)).node

    clear = with_each_key(secrets, f"volume {volume.name}", attach)
    layout = _inside(clear)
    if layout.table is not None:
        raise UnsupportedError(f"volume {volume.name} holds a partition table inside its {kind} encryption, "
                               "which imgmount does not open")
    lvs = [v for v in layout.volumes if v.kind == VolumeKind.LV and v.filesystem and v.offset is not None]
    whole = replace(volume, signature=next((v.signature for v in layout.volumes if v.kind == VolumeKind.DISK),
                                           None))
    targets = [(lv, lv.offset or 0, lv.size) for lv in lvs] or [(whole, 0, 0)]
    return [(stack.push(LoopSpec(clear, offset, size, read_only=request.read_only, qemu_locks=False)
                        .plan(inside.name)).node, inside) for inside, offset, size in targets]


def _header(node: str, volume: Volume) -> LuksHeader:
    assert volume.offset is not None
    fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = read_header(SliceReader(FileReader(fd), volume.offset, volume.size))
    finally:
        os.close(fd)
    if header is None:
        raise UnsupportedError(f"volume {volume.name} is {lock_kind(volume)}, which imgmount cannot unlock")
    return header


def _luks_blockdev(node: str, offset: int, size: int) -> str:
    """QEMU's luks driver over the window ``[offset, offset+size)`` of the attached disk (a root-owned
    device or FUSE export); the key is :data:`SECRET_ID`, defined from a memfd."""
    protocol = "host_device" if stat.S_ISBLK(os.stat(node).st_mode) else "file"
    return (f"driver=luks,key-secret={SECRET_ID},file.driver=raw,file.offset={offset},file.size={size},"
            f"file.file.driver={protocol},file.file.filename={node.replace(',', ',,')}")


def _inside(export: str) -> DiskLayout:
    """What the decrypted data holds, read as a disk: a filesystem, or an LVM physical volume and its LVs."""
    fd = os.open(export, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return analyse_disk(FileReader(fd))
    finally:
        os.close(fd)
