"""Inspection of real images in every format QEMU can write, and through a backing chain.

The truth each inspection is checked against comes from the tools that built the image (sfdisk's table, the
LVM tools' extents, blkid on the raw bytes), never from our own parsers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.inspection import Inspection, inspect_image

MiB = images.MiB
TABLE = """label: gpt
size=24MiB, name=boot
size=100MiB, type=E6D6D379-F507-44C2-A23C-238F2A3DF928, name=lvm
"""
# (format, qemu-img -o options): every format qemu-img can write.
FORMATS = [
    ("raw", ()),
    ("qcow2", ()),
    ("qcow2", ("compat=0.10",)),
    ("qcow", ()),
    ("vmdk", ("subformat=monolithicSparse",)),
    ("vmdk", ("subformat=monolithicFlat",)),
    ("vmdk", ("subformat=twoGbMaxExtentSparse",)),
    ("vmdk", ("subformat=streamOptimized",)),
    ("vdi", ()),
    ("vhdx", ()),
    ("vpc", ("force_size=on",)),
    ("vpc", ("subformat=fixed", "force_size=on")),
    ("qed", ()),
    ("parallels", ()),
]


@dataclass(frozen=True)
class Expected:
    name: str
    offset: int
    size: int
    fstype: str
    label: str
    uuid: str


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Expected]]:
    """A raw GPT disk: p1 ext4, p2 an LVM PV of VG vg0 with an ext4 LV and an xfs LV; and what is in it."""
    raw = images.blank(tmp_path_factory.mktemp("guest") / "guest.raw", 128 * MiB)
    images.partition(raw, TABLE)
    p1, p2 = images.sfdisk_json(raw)["partitions"]
    images.format_region(raw, p1["start"] * 512, p1["size"] * 512, "ext4", label="boot")
    lvs = images.make_lvm(raw, p2["start"] * 512, p2["size"] * 512, "vg0",
                          [images.LvSpec("root", 40, "ext4", "root"),
                           images.LvSpec("data", 48, "xfs", "data")])
    regions = [("p1", p1["start"] * 512, p1["size"] * 512), ("p2", p2["start"] * 512, p2["size"] * 512)]
    regions += [(f"vg0/{lv.name}", p2["start"] * 512 + lv.offset, lv.size) for lv in lvs]
    return raw, [Expected(name, off, size, *_blkid(raw, off, size)) for name, off, size in regions]


def _blkid(raw: Path, offset: int, size: int) -> tuple[str, str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", "-O", str(offset), "-S", str(size), str(raw)],
                         capture_output=True, text=True, check=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values["TYPE"], values.get("LABEL", ""), values.get("UUID", "")


def _volumes(ins: Inspection) -> list[Expected]:
    return [Expected(v.name, v.offset or 0, v.size, v.signature.type if v.signature else "",
                     v.signature.label if v.signature else "", v.signature.uuid if v.signature else "")
            for v in ins.volumes]


@pytest.mark.parametrize(("fmt", "options"), FORMATS, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_every_writable_format_is_inspected_like_the_raw_disk(
    guest: tuple[Path, list[Expected]], tmp_path: Path, fmt: str, options: tuple[str, ...]
) -> None:
    raw, expected = guest
    image = images.convert(raw, tmp_path / f"guest.{fmt}", fmt, *options)
    ins = inspect_image(str(image))
    assert ins.image.format == fmt
    assert ins.image.virtual_size == 128 * MiB
    assert ins.table is not None and ins.table.label == "gpt" and ins.table.warnings == ()
    assert _volumes(ins) == expected
    assert [vg.name for vg in ins.volume_groups] == ["vg0"]
    assert all(u.state == "free" for u in ins.usage)


def test_backing_chain_three_deep_reads_the_top_of_the_chain(
    guest: tuple[Path, list[Expected]], tmp_path: Path
) -> None:
    raw, _ = guest
    base = images.convert(raw, tmp_path / "base.qcow2", "qcow2")
    chain = [base]
    for i in range(3):
        top = tmp_path / f"overlay{i}.qcow2"
        images.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", chain[-1].name, "-F", "qcow2", str(top)])
        chain.append(top)
    # The newest overlay gets a different partition table: inspection must see it, not the base's.
    other = images.blank(tmp_path / "other.raw", 128 * MiB)
    images.partition(other, "label: dos\nstart=2048, size=8MiB, type=83\n")
    images.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {other} 0 512", str(chain[-1])])
    ins = inspect_image(str(chain[-1]))
    assert [f.path for f in ins.image.chain] == [str(p) for p in reversed(chain)]
    assert [f.format for f in ins.image.chain] == ["qcow2"] * 4
    assert ins.table is not None and ins.table.label == "dos"
    assert [(v.name, v.offset, v.size) for v in ins.volumes] == [("p1", MiB, 8 * MiB)]
    # ... while the file below it still shows the original GPT.
    assert inspect_image(str(chain[-2])).table.label == "gpt"  # type: ignore[union-attr]


def test_cli_prints_tree_and_json(guest: tuple[Path, list[Expected]], tmp_path: Path) -> None:
    raw, expected = guest
    image = images.convert(raw, tmp_path / "guest.qcow2", "qcow2")
    text = _imgmount("--info", str(image))
    assert text.splitlines()[0].startswith(f"{image}: qcow2, 128 MiB virtual")
    assert "GPT partition table, 512-byte sectors" in text
    for e in expected:
        line = next(ln for ln in text.splitlines() if e.name in ln)
        assert e.fstype in line and e.label in line and e.uuid in line
    data = json.loads(_imgmount("--info", "--json", str(image)))
    assert data["format"] == "qcow2" and data["virtual-size"] == 128 * MiB
    assert data["in-use"] == "free"
    assert [(v["name"], v["offset"], v["size"], v["filesystem"]["type"]) for v in data["volumes"]] == [
        (e.name, e.offset, e.size, e.fstype) for e in expected]
    assert [p["name"] for p in data["partition-table"]["partitions"]] == ["boot", "lvm"]


def _imgmount(*args: str) -> str:
    imgmount = str(Path(sys.executable).parent / "imgmount")
    proc = subprocess.run([imgmount, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_read_only_cloop_format(guest: tuple[Path, list[Expected]], tmp_path: Path) -> None:
    """cloop is one of the formats QEMU reads but cannot write; Debian's cloop-utils makes one."""
    raw, expected = guest
    image = tmp_path / "guest.cloop"
    images.run(["create_compressed_fs", "-q", "-B", "65536", str(raw), str(image)])
    ins = inspect_image(str(image))
    assert (ins.image.format, ins.image.virtual_size) == ("cloop", 128 * MiB)
    assert _volumes(ins) == expected
