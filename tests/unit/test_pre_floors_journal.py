"""A journal written before the move to floors (issue 11) is still read: a restarted daemon of this version adopts
the mounts an older one made. The records in tests/data/pre-floors-journal were written by the code of 8356c04,
the last commit before the move (tests/data/make_pre_floors_journal.py says how): each layer record parses into
its kind's spec with the values that code planned, and the JSON reads back as it was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import mountd.engine.engine  # noqa: F401  (registers every layer kind)
from mountd.engine.journal import Journal, MountRecord
from mountd.host.opener import Credentials
from mountd.layers.dm import DmSpec
from mountd.layers.fuse import ExportSpec
from mountd.layers.layer import LayerRecord, LayerState, layer_from_record
from mountd.layers.loop import LoopSpec
from mountd.layers.mount import MountSpec
from mountd.layers.nbd import NbdSpec, PartitionSpec
from mountd.layers.server import ServerSpec
from mountd.model import MountedVolume, MountState
from mountd.settings import DEFAULT_STATE_DIR

OLD = Path(__file__).resolve().parents[1] / "data" / "pre-floors-journal"
IMAGE = "/tmp/imgmount-pre-floors/guest.qcow2"
MiB = 1 << 20
NOTE = ("recent writes are not shown: its log holds writes not yet applied (it was not unmounted cleanly), and "
        "replaying it without writing to the image needs qemu-storage-daemon (Debian package "
        "qemu-system-common) and /dev/fuse")


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    shutil.copytree(OLD, tmp_path / "state")
    return Journal(tmp_path / "state")


def _layers(record: MountRecord) -> list[tuple[str, str, LayerState]]:
    return [(x.kind, x.volume, x.state) for x in record.layers]


def test_both_records_are_read(journal: Journal) -> None:
    assert [r.id for r in journal.all()] == ["3f9c2a7d1e44", "b70e5d2c9a18"]
    for record in journal.all():
        written = json.loads((OLD / "mounts" / f"{record.id}.json").read_text())
        assert json.loads(json.dumps(record.to_json())) == written  # the JSON is as that code wrote it
        assert all(layer_from_record(x).node == x.node for x in record.layers)  # every layer rebuilt


def test_roots_nbd_mount_with_an_lv(journal: Journal) -> None:
    record = journal.read("3f9c2a7d1e44")
    assert (record.image, record.format, record.read_only, record.owner, record.backend, record.state) == (
        IMAGE, "qcow2", True, 0, "nbd", MountState.MOUNTED)
    assert record.options == {"mount-options": [], "mount-root": None, "requested-backend": "auto",
                              "snapshot": None, "volumes": []}
    attached = LayerState.ATTACHED
    assert _layers(record) == [("nbd", "", attached), ("partition", "p1", attached), ("mount", "p1", attached),
                               ("partition", "p2", attached), ("dm", "vg0/root", attached),
                               ("mount", "vg0/root", attached)]
    nbd, p1, mount_p1, p2, dm, mount_lv = record.layers
    assert NbdSpec.parse(nbd.identity) == NbdSpec(
        f"driver=qcow2,file.driver=file,file.filename={IMAGE}", True, "", f"{DEFAULT_STATE_DIR}/nbd")
    assert (nbd.node, nbd.process) == ("/dev/nbd0", (48213, 1203377))
    assert PartitionSpec.parse(p1.identity) == PartitionSpec("/dev/nbd0", 1, 1 * MiB, 64 * MiB)
    assert PartitionSpec.parse(p2.identity) == PartitionSpec("/dev/nbd0", 2, 65 * MiB, 446 * MiB)
    assert (p1.node, p2.node) == ("/dev/nbd0p1", "/dev/nbd0p2")
    assert MountSpec.parse(mount_p1.identity) == MountSpec(
        "/dev/nbd0p1", "/run/media/root/guest-p1", "ext4", ("ro", "nosuid", "nodev", "noload", "errors=remount-ro"),
        0, "guest-p1")
    name = "imgmount-3f9c2a7d1e44-vg0-root"
    assert DmSpec.parse(dm.identity) == DmSpec(
        name, "IMGMOUNT-3f9c2a7d1e44-00LLLL-LLLL-LLLL-LLLL-LLLL-LLLL-LLLLLL", True,
        [[0, 80, "linear", "/dev/nbd0p2", 2048]])
    assert dm.node == f"/dev/mapper/{name}"
    lv = MountSpec.parse(mount_lv.identity)
    assert lv == MountSpec(f"/dev/mapper/{name}", "/run/media/root/guest-vg0_root", "xfs",
                           ("ro", "nosuid", "nodev", "norecovery", "nouuid"), 0, "guest-vg0/root", NOTE)
    assert lv.read_only and mount_lv.node == lv.mountpoint and mount_lv.process is None
    info = record.info()
    assert (info.device, info.image_id, info.notes) == ("/dev/nbd0", record.image_id, (("vg0/root", NOTE),))
    assert info.volumes == (
        MountedVolume("p1", "/dev/nbd0p1", "ext4", "/run/media/root/guest-p1"),
        MountedVolume("vg0/root", f"/dev/mapper/{name}", "xfs", "/run/media/root/guest-vg0_root"))


def test_a_callers_fuse_mount_left_half_made(journal: Journal) -> None:
    record = journal.read("b70e5d2c9a18")
    assert (record.owner, record.backend, record.state) == (1000, "fuse", MountState.MOUNTING)
    assert record.options["mount-options"] == ["noatime"]
    assert [(kind, volume) for kind, volume, _ in _layers(record)] == [
        ("server", ""), ("fuse", ""), ("loop", "p1"), ("fuse", "p1"), ("loop", "p1"), ("mount", "p1")]
    server, export, loop, overlay, overlay_loop, mount = record.layers
    sock = "/run/imgmount/servers/b70e5d2c9a18.sock"
    assert ServerSpec.parse(server.identity) == ServerSpec(
        "driver=qcow2,file.driver=file,file.filename=/proc/self/fd/4", sock, True, Credentials(1000, (1000, 24, 100)),
        IMAGE)
    assert (server.node, server.process) == (sock, (51007, 1290554))
    raw = "/run/imgmount/exports/b70e5d2c9a18.raw"
    assert ExportSpec.parse(export.identity) == ExportSpec(
        f"driver=nbd,server.type=unix,server.path={sock}", raw, True, "", 512 * MiB)
    assert (export.node, export.process) == (raw, (51012, 1290561))
    assert LoopSpec.parse(loop.identity, resolve=False) == LoopSpec(raw, 1 * MiB, 64 * MiB, True, False)
    assert (loop.node, loop.process) == ("/dev/loop0", None)
    top = "/run/imgmount/exports/b70e5d2c9a18-3.raw"
    assert ExportSpec.parse(overlay.identity) == ExportSpec(
        "driver=host_device,filename=/dev/loop0", top, False, "", 64 * MiB, overlay=True)
    assert LoopSpec.parse(overlay_loop.identity, resolve=False) == LoopSpec(top, 0, 0, False, False)
    assert overlay_loop.node == "/dev/loop1"
    assert mount.state == LayerState.ATTACHING and mount.node == ""
    spec = MountSpec.parse(mount.identity)
    assert spec == MountSpec("/dev/loop1", "/run/media/alice/guest-p1", "ext4",
                             ("ro", "nosuid", "nodev", "errors=remount-ro", "noatime"), 1000, "guest-p1")
    assert mount.identity["created"] is True  # the directory is ours: a clean-up removes it
    info = record.info()
    assert (info.device, info.volumes, info.notes) == (
        raw, (MountedVolume("p1", "/dev/loop1", "ext4", "/run/media/alice/guest-p1"),), ())


def test_a_record_is_rebuilt_from_its_json_alone() -> None:
    layer = json.loads((OLD / "mounts" / "3f9c2a7d1e44.json").read_text())["layers"][0]
    assert LayerRecord.from_json(layer).identity["image_opts"].endswith(IMAGE)
