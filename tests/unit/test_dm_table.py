"""``mountd.layers.dm.lv_table``: device-mapper tables from our own LVM metadata parse (pure: no kernel needed)."""

from __future__ import annotations

import pytest

from mountd.errors import NotFoundError, UnsupportedError
from mountd.image.lvmmeta import LogicalVolume, LvSegment, PvRef, VolumeGroup
from mountd.layers.dm import lv_table

MiB = 1 << 20
EXTENT = 4 * MiB  # 8192 sectors
PV0 = PvRef("pv0", "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa", pe_start=MiB, pe_count=100)
PV1 = PvRef("pv1", "bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb", pe_start=2 * MiB, pe_count=100)
NODES = {"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": "/dev/nbd0p1", PV1.uuid: "/dev/nbd0p2"}  # dashes do not matter


def lv(name: str, *segments: LvSegment) -> LogicalVolume:
    size = sum(s.extent_count for s in segments) * EXTENT
    return LogicalVolume(name, f"{name}-uuid", ("READ", "WRITE", "VISIBLE"), segments, size)


VG = VolumeGroup("ubuntu-vg", "vg-uuid", 7, EXTENT, (PV0, PV1), (
    lv("root", LvSegment(0, 10, "striped", (("pv0", 5),))),
    lv("two", LvSegment(0, 2, "striped", (("pv0", 20),)), LvSegment(2, 3, "striped", (("pv1", 0),))),
    lv("wide", LvSegment(0, 4, "striped", (("pv0", 30), ("pv1", 10)), stripe_size=64 * 1024)),
    lv("pool", LvSegment(0, 4, "thin-pool", ())),
    lv("mirrored", LvSegment(0, 4, "raid1", ())),
    lv("stacked", LvSegment(0, 4, "striped", (("root", 0),))),
))


def test_a_linear_lv_is_one_linear_line() -> None:
    # 1 MiB pe_start = 2048 sectors, extent 5 starts 5 * 8192 sectors further.
    assert lv_table(VG, "root", NODES) == [[0, 81920, "linear", "/dev/nbd0p1", 2048 + 5 * 8192]]


def test_each_segment_is_a_line_on_its_own_pv() -> None:
    assert lv_table(VG, "two", NODES) == [
        [0, 16384, "linear", "/dev/nbd0p1", 2048 + 20 * 8192],
        [16384, 24576, "linear", "/dev/nbd0p2", 4096],
    ]


def test_a_striped_segment_names_stripes_chunk_and_every_area() -> None:
    assert lv_table(VG, "wide", NODES) == [
        [0, 32768, "striped", 2, 128, "/dev/nbd0p1", 2048 + 30 * 8192, "/dev/nbd0p2", 4096 + 10 * 8192],
    ]


@pytest.mark.parametrize(("name", "message"), [
    ("pool", "logical volume ubuntu-vg/pool is a thin-pool volume: imgmount maps linear and striped LVs only"),
    ("mirrored", "logical volume ubuntu-vg/mirrored is a raid1 volume: imgmount maps linear and striped LVs "
                 "only"),
    ("stacked", "logical volume ubuntu-vg/stacked is stacked on logical volume root: imgmount maps linear and "
                "striped LVs only"),
])
def test_other_segment_types_are_unsupported(name: str, message: str) -> None:
    with pytest.raises(UnsupportedError) as err:
        lv_table(VG, name, NODES)
    assert str(err.value) == message


def test_a_pv_that_is_not_in_this_image_is_named() -> None:
    with pytest.raises(UnsupportedError, match=f"uses physical volume {PV1.uuid}, which is not in this image"):
        lv_table(VG, "two", {PV0.uuid: "/dev/nbd0p1"})


def test_an_unknown_lv_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        lv_table(VG, "nope", NODES)
