"""mountd.image.lvmlabel and lvmmeta on PVs made by the LVM tools, compared with what ``pvs``/``vgs``/``lvs`` report.

Each PV is a region of a sparse image, exposed as a loop device for the tools; the parser reads the image file
itself through a SliceReader, as the engine does. No device-mapper is needed (``--driverloaded n``).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgmount_testkit.images import LvSpec, blank, loop, lv_extents, make_lvm, run
from mountd.image.blockio import FileReader, SliceReader
from mountd.image.lvmconfig import LvmMetadataError
from mountd.image.lvmlabel import PhysicalVolume, read_pv
from mountd.image.lvmmeta import VolumeGroup
from tests.support.lvm_multi import Region, create_lv, create_pvs, lvm, pv_loops, report

MiB = 1 << 20
ONE = [Region(MiB, 64 * MiB)]
TWO = [Region(MiB, 48 * MiB), Region(50 * MiB, 48 * MiB)]


@pytest.fixture
def image(workdir: Path) -> Path:
    return blank(workdir / "disk.img", 100 * MiB)


def read_region(image: Path, region: Region) -> PhysicalVolume | None:
    fd = os.open(image, os.O_RDONLY)
    try:
        return read_pv(SliceReader(FileReader(fd), region.offset, region.size))
    finally:
        os.close(fd)


def read_vg(image: Path, region: Region) -> VolumeGroup:
    pv = read_region(image, region)
    assert pv is not None and pv.vg is not None
    return pv.vg


def tools_view(devs: list[str]) -> dict[str, Any]:
    """The VG as the LVM tools report it, in the shape of :func:`our_view`."""
    (vg,) = report(devs, "vgs", "vg_name,vg_uuid,vg_seqno,vg_extent_size")
    pvs = report(devs, "pvs", "pv_name,pv_uuid,pe_start,pv_pe_count,vg_name")
    uuid_of = {row["pv_name"]: row["pv_uuid"] for row in pvs}
    segs = report(devs, "lvs", "lv_name,lv_uuid,lv_size,seg_start_pe,seg_size_pe,segtype,stripe_size,"
                  "seg_pe_ranges", "-a", "--segments")
    segments: dict[str, list[tuple[Any, ...]]] = {}
    for row in segs:
        ranges = tuple((uuid_of[dev], int(span.split("-")[0]))
                       for dev, span in (part.rsplit(":", 1) for part in row["seg_pe_ranges"].split()))
        segments.setdefault(row["lv_name"], []).append(
            (int(row["seg_start_pe"]), int(row["seg_size_pe"]), row["segtype"], ranges, int(row["stripe_size"])))
    return {
        "vg": (vg["vg_name"], vg["vg_uuid"], int(vg["vg_seqno"]), int(vg["vg_extent_size"])),
        "pvs": {row["pv_uuid"]: (int(row["pe_start"]), int(row["pv_pe_count"])) for row in pvs},
        "lvs": {row["lv_name"]: (row["lv_uuid"], int(row["lv_size"])) for row in segs},
        "segments": segments,
    }


def our_view(vg: VolumeGroup) -> dict[str, Any]:
    uuid_of = {pv.name: pv.uuid for pv in vg.pvs}
    segments = {lv.name: [(s.start_extent, s.extent_count,
                           "linear" if s.type == "striped" and len(s.stripes) == 1 else s.type,
                           tuple((uuid_of[name], first) for name, first in s.stripes), s.stripe_size)
                          for s in lv.segments] for lv in vg.lvs}
    return {
        "vg": (vg.name, vg.uuid, vg.seqno, vg.extent_size),
        "pvs": {pv.uuid: (pv.pe_start, pv.pe_count) for pv in vg.pvs},
        "lvs": {lv.name: (lv.uuid, lv.size) for lv in vg.lvs},
        "segments": segments,
    }


def assert_same_as_tools(image: Path, regions: list[Region], devs: list[str]) -> VolumeGroup:
    expected = tools_view(devs)
    vgs = [read_vg(image, region) for region in regions]
    assert all(vg == vgs[0] for vg in vgs)  # every PV of the VG carries the same newest copy
    assert our_view(vgs[0]) == expected
    return vgs[0]


def make_vg(devs: list[str], vg: str, *vgcreate_args: str, pvcreate_args: tuple[str, ...] = ()) -> None:
    create_pvs(devs, *pvcreate_args)
    lvm(devs, "vgcreate", *vgcreate_args, vg, *devs)


@contextlib.contextmanager
def no_lvm_backups(vg: str) -> Iterator[None]:
    """make_lvm lets LVM write /etc/lvm/{backup,archive} files for the VG: remove ours afterwards."""
    try:
        yield
    finally:
        for path in [Path("/etc/lvm/backup") / vg, *Path("/etc/lvm/archive").glob(f"{vg}_*.vg")]:
            path.unlink(missing_ok=True)


# --- layouts ----------------------------------------------------------------------------------------------------

def test_several_lvs_with_filesystems(image: Path) -> None:
    region = Region(MiB, 96 * MiB)
    with no_lvm_backups("lvmmeta_fs"):
        extents = make_lvm(image, region.offset, region.size, "lvmmeta_fs", [
            LvSpec("root", 24, "ext4", label="rootfs"), LvSpec("data", 40, "xfs", label="datafs"),
            LvSpec("raw", 8)])
        with loop(image, region.offset, region.size) as dev:
            vg = assert_same_as_tools(image, [region], [dev])
            assert lv_extents(dev).keys() == {"root", "data", "raw"}
    pv_uuid = vg.pvs[0].uuid
    for ext in extents:
        assert vg.linear_extent(ext.name) == (pv_uuid, ext.offset, ext.size)
        assert vg.lv(ext.name).uuid == ext.uuid and vg.lv(ext.name).visible
    for name, fstype, label in (("root", "ext4", "rootfs"), ("data", "xfs", "datafs")):
        extent = vg.linear_extent(name)
        assert extent is not None
        with loop(image, region.offset + extent[1], extent[2], read_only=True) as dev:
            probe = run(["blkid", "-p", "-o", "export", dev])
        assert f"TYPE={fstype}" in probe.split() and f"LABEL={label}" in probe.split()


@pytest.mark.parametrize(("extent", "lv_sizes"), [("1m", ("3m", "5m")), ("8m", ("16m", "8m"))])
def test_extent_sizes(image: Path, extent: str, lv_sizes: tuple[str, str]) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_ext", "-s", extent)
        for i, size in enumerate(lv_sizes):
            create_lv(devs, "lvmmeta_ext", f"lv{i}", size)
        vg = assert_same_as_tools(image, ONE, devs)
    assert vg.extent_size == int(extent[:-1]) * MiB
    assert [lv.size for lv in vg.lvs] == [int(size[:-1]) * MiB for size in lv_sizes]


def test_lv_extended_into_a_second_segment(image: Path) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_grow")
        create_lv(devs, "lvmmeta_grow", "grown", "8m")
        create_lv(devs, "lvmmeta_grow", "after", "8m")
        lvm(devs, "lvextend", "-L", "+12m", "lvmmeta_grow/grown")
        vg = assert_same_as_tools(image, ONE, devs)
    grown = vg.lv("grown")
    assert [(s.start_extent, s.extent_count) for s in grown.segments] == [(0, 2), (2, 3)]
    assert grown.size == 20 * MiB and vg.linear_extent("grown") is None
    assert vg.linear_extent("after") == (vg.pvs[0].uuid, vg.pvs[0].pe_start + 2 * 4 * MiB, 8 * MiB)


def test_vg_spanning_two_pvs(image: Path) -> None:
    with pv_loops(image, TWO) as devs:
        make_vg(devs, "lvmmeta_span")
        create_lv(devs, "lvmmeta_span", "second", "8m", devs[1])
        create_lv(devs, "lvmmeta_span", "both", "60m")
        vg = assert_same_as_tools(image, TWO, devs)
    pv0, pv1 = (read_region(image, region) for region in TWO)
    assert pv0 is not None and pv1 is not None
    assert [pv.uuid for pv in vg.pvs] == [pv0.uuid, pv1.uuid]
    assert vg.linear_extent("second") == (pv1.uuid, vg.pvs[1].pe_start, 8 * MiB)
    assert {stripe[0] for s in vg.lv("both").segments for stripe in s.stripes} == {"pv0", "pv1"}
    assert vg.linear_extent("both") is None


def test_two_stripes_across_two_pvs(image: Path) -> None:
    with pv_loops(image, TWO) as devs:
        make_vg(devs, "lvmmeta_stripe")
        create_lv(devs, "lvmmeta_stripe", "striped", "16m", "-i", "2", "-I", "64k")
        vg = assert_same_as_tools(image, TWO, devs)
    (seg,) = vg.lv("striped").segments
    assert (seg.type, len(seg.stripes), seg.stripe_size) == ("striped", 2, 64 * 1024)
    assert vg.linear_extent("striped") is None


def test_renamed_lv_reads_the_newest_copy(image: Path) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_ren")
        create_lv(devs, "lvmmeta_ren", "first", "8m")
        lvm(devs, "lvrename", "lvmmeta_ren", "first", "second")
        lvm(devs, "lvrename", "lvmmeta_ren", "second", "third")
        vg = assert_same_as_tools(image, ONE, devs)
    assert vg.seqno >= 4 and [lv.name for lv in vg.lvs] == ["third"]


def test_pv_with_ignored_metadata_area(image: Path) -> None:
    """pvchange --metadataignore: the PV belongs to the VG but only the other PV carries its metadata."""
    with pv_loops(image, TWO) as devs:
        make_vg(devs, "lvmmeta_ign")
        lvm(devs, "pvchange", "--metadataignore", "y", devs[0])
        create_lv(devs, "lvmmeta_ign", "lv", "8m")
        assert [row["pv_mda_used_count"] for row in report(devs, "pvs", "pv_mda_used_count")] == ["0", "1"]
        expected = tools_view(devs)
    pv0 = read_region(image, TWO[0])
    assert pv0 is not None and pv0.vg is None
    assert our_view(read_vg(image, TWO[1])) == expected


def test_orphan_pv(image: Path) -> None:
    with pv_loops(image, ONE) as devs:
        create_pvs(devs)
        (row,) = report(devs, "pvs", "pv_uuid,dev_size,vg_name")
    pv = read_region(image, ONE[0])
    assert pv is not None and pv.vg is None and row["vg_name"] == ""
    assert (pv.uuid, pv.device_size) == (row["pv_uuid"], int(row["dev_size"]))


def test_metadata_wrapping_around_its_buffer(image: Path) -> None:
    """Big tags make each commit ~40 KB, so a few dozen renames wrap the 1 MiB circular buffer."""
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_wrap")
        tags = [arg for i in range(40) for arg in ("--addtag", f"t{i}_" + "x" * 1000)]
        lvm(devs, "vgchange", *tags, "lvmmeta_wrap")
        create_lv(devs, "lvmmeta_wrap", "lv0", "8m")
        for i in range(40):
            if mda_text_location(image, ONE[0], 0)[2]:
                break
            lvm(devs, "lvrename", "lvmmeta_wrap", f"lv{i}", f"lv{i + 1}")
        assert mda_text_location(image, ONE[0], 0)[2], "the metadata never wrapped"
        assert_same_as_tools(image, ONE, devs)


# --- two metadata copies and corruption -------------------------------------------------------------------------

def mda_starts(image: Path, region: Region) -> list[int]:
    """Metadata area offsets (within the PV) from the PV header that pvcreate writes in sector 1."""
    with open(image, "rb") as f:
        f.seek(region.offset + 512)
        label = f.read(512)
    pos, starts, lists = 72, [], 0
    while lists < 2:
        offset = struct.unpack_from("<Q", label, pos)[0]
        pos += 16
        if offset == 0:
            lists += 1
        elif lists == 1:
            starts.append(offset)
    return starts


def mda_text_location(image: Path, region: Region, index: int) -> tuple[int, int, bool]:
    """(image offset of the committed text, its size, whether it wraps) for the index-th metadata area."""
    start = region.offset + mda_starts(image, region)[index]
    with open(image, "rb") as f:
        f.seek(start)
        header = f.read(512)
    mda_size = struct.unpack_from("<Q", header, 32)[0]
    offset, size = struct.unpack_from("<QQ", header, 40)
    return start + offset, size, offset + size > mda_size


def flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x20]))


def test_two_metadata_copies_and_fallback(image: Path) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_two", pvcreate_args=("--pvmetadatacopies", "2"))
        create_lv(devs, "lvmmeta_two", "keep", "8m")
        assert report(devs, "pvs", "pv_mda_count")[0]["pv_mda_count"] == "2"
        assert len(mda_starts(image, ONE[0])) == 2
        first = ONE[0].offset + mda_starts(image, ONE[0])[0]
        with open(image, "rb") as f:
            f.seek(first)
            stale = f.read(MiB - 4096)
        lvm(devs, "lvrename", "lvmmeta_two", "keep", "renamed")
        newest = assert_same_as_tools(image, ONE, devs)
    with open(image, "r+b") as f:  # the first copy goes back one generation: the second one is newer
        f.seek(first)
        f.write(stale)
    assert read_vg(image, ONE[0]) == newest
    flip(image, first + 100)  # first header now fails its checksum
    assert read_vg(image, ONE[0]) == newest
    text, size, _ = mda_text_location(image, ONE[0], 1)
    flip(image, text + size // 2)  # and the second copy's text too: nothing valid is left
    with pytest.raises(LvmMetadataError, match="fails its checksum"):
        read_region(image, ONE[0])


@pytest.mark.parametrize(("where", "message"), [
    ("label", "the LVM label in sector 1 fails its checksum"),
    ("header", "metadata area at byte 4096 has a header that fails its checksum"),
    ("text", "metadata area at byte 4096 holds metadata text that fails its checksum"),
])
def test_single_copy_corruption_is_an_error(image: Path, where: str, message: str) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_bad")
        create_lv(devs, "lvmmeta_bad", "lv", "8m")
    text, size, _ = mda_text_location(image, ONE[0], 0)
    offsets = {"label": ONE[0].offset + 512 + 40, "header": ONE[0].offset + 4096 + 8, "text": text + size // 3}
    flip(image, offsets[where])
    with pytest.raises(LvmMetadataError) as err:
        read_region(image, ONE[0])
    assert str(err.value) == (message if where == "label" else "the LVM " + message)


def test_wiped_pv_is_not_a_pv(image: Path) -> None:
    with pv_loops(image, ONE) as devs:
        make_vg(devs, "lvmmeta_wipe")
        run(["wipefs", "-q", "-a", devs[0]])
        assert report(devs, "pvs", "pv_uuid") == []  # the tools agree: no PV here
    assert read_region(image, ONE[0]) is None
