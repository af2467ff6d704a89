"""/proc/self/mountinfo as mountd.layers.mount reads it: escapes, optional fields, lines it does not understand."""

from __future__ import annotations

from mountd.host.mountinfo import mountinfo, parse_mountinfo


def test_mountinfo_parser() -> None:
    text = (b"36 35 98:0 /mnt1 /mnt/my\\040disk\\011x\\134y rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
            b"37 36 0:40 / /run/media/u/vol rw,nosuid,nodev shared:5 master:2 - btrfs /dev/loop\\0401 "
            b"rw,rescue=nologreplay\n"
            b"garbage line\n"
            b"38 36 7:1 / /x ro - xfs /dev/loop1 ro,norecovery\n")
    first, second, third = parse_mountinfo(text)
    assert first.mountpoint == "/mnt/my disk\tx\\y" and first.root == "/mnt1" and first.dev == "98:0"
    assert (first.mount_id, first.parent_id, first.fstype) == (36, 35, "ext3")
    assert first.options == ("rw", "noatime") and first.super_options == ("rw", "errors=continue")
    assert second.source == "/dev/loop 1" and second.fstype == "btrfs"
    assert third.options == ("ro",) and third.super_options == ("ro", "norecovery")
    assert parse_mountinfo(b"") == []
    assert any(e.mountpoint == "/" for e in mountinfo())
