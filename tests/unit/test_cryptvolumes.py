"""What an unlocked volume shows (pure: layouts in, layout out)."""

from __future__ import annotations

from dataclasses import replace

from mountd.engine.cryptvolumes import _with_inside
from mountd.engine.inspection import DiskLayout, Volume, VolumeKind
from mountd.engine.unlocking import can_unlock, is_locked
from mountd.host.programs import PROGRAMS
from mountd.host.support import HostSupport
from mountd.image.fsprobe import Signature
from mountd.image.partitions import PartitionTable
from mountd.layers.bitlocker import is_recovery_password

LUKS2 = Signature("crypto_LUKS", "crypto", uuid="0b1c-2d", version="2")
PV = Signature("LVM2_member", "raid", uuid="pv-uuid")
EXT4 = Signature("ext4", "filesystem", label="root")
ALL = frozenset(p.name for p in PROGRAMS)


def test_an_unlocked_pv_keeps_its_name_and_its_lvs_join_unmapped() -> None:
    p3 = Volume("p3", VolumeKind.PARTITION, 1 << 20, 64 << 20, LUKS2)
    outer = DiskLayout(None, (), (Volume("p2", VolumeKind.PARTITION, 0, 1 << 20, EXT4), p3))
    inside = DiskLayout(None, (), (
        Volume("disk", VolumeKind.DISK, 0, 60 << 20, PV, vg="vgubuntu", note="LVM physical volume of vgubuntu",
               pv=True),
        Volume("vgubuntu/root", VolumeKind.LV, 4 << 20, 40 << 20, EXT4, vg="vgubuntu")))
    assert is_locked(p3)
    merged = _with_inside(outer, p3, inside)
    assert [v.name for v in merged.volumes] == ["p2", "p3", "vgubuntu/root"]
    unlocked, root = merged.volumes[1], merged.volumes[2]
    assert not is_locked(unlocked)
    assert (unlocked.signature, unlocked.vg, unlocked.pv, unlocked.offset) == (PV, "vgubuntu", True, 1 << 20)
    assert unlocked.note == "unlocked LUKS2; LVM physical volume of vgubuntu"
    assert root.offset is None and root.unmapped == "inside encrypted volume p3" and root.filesystem == "ext4"


def test_a_partition_table_inside_is_said_not_read() -> None:
    p1 = Volume("p1", VolumeKind.PARTITION, 0, 8 << 20, LUKS2)
    table = PartitionTable("gpt", 512, "id", (), ())
    merged = _with_inside(DiskLayout(None, (), (p1,)), p1, DiskLayout(table, (), ()))
    assert merged.volumes[0].note.endswith("it holds a partition table, which imgmount does not read inside "
                                           "encrypted volumes")


def test_recovery_passwords_are_told_from_passwords_as_dislocker_checks_them() -> None:
    """Each block a multiple of 11 below 2^16 * 11 (dislocker's valid_block); with or without hyphens."""
    valid = b"-".join([b"123453", b"000000", b"720885", b"011011", b"654313", b"111111", b"222222", b"333333"])
    assert is_recovery_password(valid) and is_recovery_password(valid.replace(b"-", b""))
    assert not is_recovery_password(valid.replace(b"123453", b"123456"))  # not a multiple of 11
    assert not is_recovery_password(valid.replace(b"720885", b"720896"))  # 2^16 * 11
    assert not is_recovery_password(b"123453-123453") and not is_recovery_password(b"hunter22")


def test_what_a_host_unlocks_decides_what_a_mount_of_every_volume_asks_for() -> None:
    """LUKS through dm-crypt where device-mapper and cryptsetup are; else LUKS1 only, through QEMU's luks
    driver on a FUSE export; BitLocker wherever dislocker's FUSE runs. An unlocked-looking volume never."""
    def volume(sig: Signature) -> Volume:
        return Volume("p3", VolumeKind.PARTITION, 1 << 20, 64 << 20, sig)

    luks1, luks2 = volume(replace(LUKS2, version="1")), volume(LUKS2)
    bitlocker, ext4 = volume(Signature("BitLocker", "crypto", version="2")), volume(EXT4)
    dm_host = HostSupport(device_mapper=True, fuse=True)
    fuse_only = HostSupport(fuse=True)
    no_cryptsetup = HostSupport(device_mapper=True, fuse=True, programs=ALL - {"cryptsetup"})
    bare = HostSupport(programs=ALL - {"qemu-storage-daemon", "dislocker-fuse"})
    assert [can_unlock(v, dm_host) for v in (luks1, luks2, bitlocker, ext4)] == [True, True, True, False]
    assert [can_unlock(v, fuse_only) for v in (luks1, luks2, bitlocker, ext4)] == [True, False, True, False]
    assert [can_unlock(v, no_cryptsetup) for v in (luks1, luks2, bitlocker)] == [True, False, True]
    assert [can_unlock(v, bare) for v in (luks1, luks2, bitlocker)] == [False, False, False]
