"""What an unlocked volume shows (pure: layouts in, layout out)."""

from __future__ import annotations

from mountd.engine.cryptvolumes import RECOVERY_PASSWORD, _with_inside
from mountd.engine.inspection import DiskLayout, Volume, VolumeKind
from mountd.engine.unlocking import is_locked
from mountd.image.fsprobe import Signature
from mountd.image.partitions import PartitionTable

LUKS2 = Signature("crypto_LUKS", "crypto", uuid="0b1c-2d", version="2")
PV = Signature("LVM2_member", "raid", uuid="pv-uuid")
EXT4 = Signature("ext4", "filesystem", label="root")


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


def test_recovery_passwords_are_told_from_passwords() -> None:
    assert RECOVERY_PASSWORD.fullmatch(b"-".join([b"123456"] * 8))
    assert not RECOVERY_PASSWORD.fullmatch(b"123456-123456") and not RECOVERY_PASSWORD.fullmatch(b"hunter22")
