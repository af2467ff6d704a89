"""Writes the journal records of ``tests/data/pre-floors-journal/`` with the code of 8356c04, the last commit
before the move to floors (issue 11; a8b404f moved ``mountd/journal.py`` to ``mountd/engine/journal.py``).

Each record is built as that code built it: the request's options by its engine (``_options``), each layer's
planned identity as its ``backends.py``/``volumes.py`` wrote it, from its own helpers (``block_options`` of a
real qcow2 its ``probe_image`` read, ``client_options``, ``mount_options``, ``lv_table`` of an LVM metadata
text its ``parse_vg`` read, ``_dm_name``, ``log_name``), then what each layer adds once attached (device
nodes, pids and start times: values a real attach records), journalled step by step through its
``MountRecord.with_layer`` and written by its ``Journal.write``. Two mounts:

- ``3f9c2a7d1e44``: root's read-only mount through nbd of a qcow2 with two partitions, p1 mounted and p2 an
  LVM PV whose LV ``vg0/root`` is mapped by device-mapper and mounted with a note (its log is not replayed);
- ``b70e5d2c9a18``: uid 1000's mount through the caller's own QEMU server and a FUSE export, p1 replayed
  into a throwaway overlay, left "mounting" by a crash just before the mount itself.

Run it on a tree of that commit (``mountd`` there is the old package), from this repository's root::

    mkdir /tmp/old && git archive 8356c04 mountd imgmount_testkit | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old .venv/bin/python tests/data/make_pre_floors_journal.py tests/data/pre-floors-journal
"""
# ruff: noqa: I001  (the imports name the old tree's modules, which isort takes for this tree's or a third party's)

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from imgmount_testkit.lvm_synth import PV_UUID, simple_vg
from mountd.dm import lv_table
from mountd.engine import _options
from mountd.filesystems import mount_options
from mountd.imageinfo import block_options, probe_image
from mountd.journal import Journal, LayerRecord, MountRecord
from mountd.lvmmeta import parse_vg
from mountd.model import MountRequest
from mountd.mounts import unique_mountpoint
from mountd.recovery import log_name
from mountd.server import client_options
from mountd.volumes import _dm_name

WHERE = Path("/tmp/imgmount-pre-floors")  # the image's path is in the records
MiB = 1 << 20


def journalled(record: MountRecord, kind: str, volume: str, planned: dict[str, Any],
               attached: dict[str, Any] | None) -> MountRecord:
    """As the old MountStack.push did: the plan first, then (unless ``attached`` is None) the attached record."""
    record = record.with_layer(LayerRecord(kind, volume, "attaching", planned))
    if attached is not None:
        record = record.with_layer(LayerRecord(kind, volume, "attached", {**planned, **attached}))
    return record


def root_nbd_mount(info: Any) -> MountRecord:
    req = MountRequest(image=info.top.path)
    record = MountRecord(id="3f9c2a7d1e44", image=info.top.path, format=info.format, read_only=True,
                         owner=0, backend="nbd", options=_options(req), image_id=info.top.identity)
    record = journalled(record, "nbd", "", {
        "image_opts": block_options(info), "read_only": True, "snapshot": req.snapshot},
        {"node": "/dev/nbd0", "pid_file": "/run/imgmount/nbd/nbd0-5e0c7a91.pid", "pid": 48213,
         "start_time": 1203377, "size": info.virtual_size})
    record = journalled(record, "partition", "p1", {
        "parent": "/dev/nbd0", "number": 1, "start": 1 * MiB, "size": 64 * MiB}, {"node": "/dev/nbd0p1"})
    media = "/run/media/root"
    where = unique_mountpoint(media, "guest-p1")
    record = journalled(record, "mount", "p1", {
        "device": "/dev/nbd0p1", "mountpoint": where, "name": "guest-p1", "fstype": "ext4",
        "owner": 0, "options": mount_options("ext4", read_only=True, requested=(), owner_uid=0)},
        {"created": True, "node": where, "dev": "43:1", "mount_id": 812})
    record = journalled(record, "partition", "p2", {
        "parent": "/dev/nbd0", "number": 2, "start": 65 * MiB, "size": 446 * MiB}, {"node": "/dev/nbd0p2"})
    vg = parse_vg(simple_vg())
    lv = vg.lv("root")
    name = _dm_name(f"imgmount-{record.id}-{vg.name}-{lv.name}")
    record = journalled(record, "dm", "vg0/root", {
        "name": name, "uuid": f"IMGMOUNT-{record.id}-{lv.uuid}", "read_only": True,
        "table": lv_table(vg, lv.name, {PV_UUID: "/dev/nbd0p2"})},
        {"node": f"/dev/mapper/{name}", "devnum": "254:0"})
    why = ("replaying it without writing to the image needs qemu-storage-daemon (Debian package "
           "qemu-system-common) and /dev/fuse")
    note = (f"recent writes are not shown: its {log_name('xfs')} holds writes not yet applied (it was not "
            f"unmounted cleanly), and {why}")
    where = unique_mountpoint(media, "guest-vg0/root")
    record = journalled(record, "mount", "vg0/root", {
        "device": f"/dev/mapper/{name}", "mountpoint": where, "name": "guest-vg0/root", "fstype": "xfs",
        "owner": 0, "note": note, "options": mount_options("xfs", read_only=True, requested=(), owner_uid=0)},
        {"created": True, "node": where, "dev": "254:0", "mount_id": 815})
    return replace(record, state="mounted")


def confined_fuse_mount(info: Any) -> MountRecord:
    req = MountRequest(image=info.top.path, owner=1000, mount_options=("noatime",))
    record = MountRecord(id="b70e5d2c9a18", image=info.top.path, format=info.format, read_only=True,
                         owner=1000, backend="fuse", options=_options(req), image_id=info.top.identity)
    sock = f"/run/imgmount/servers/{record.id}.sock"
    record = journalled(record, "server", "", {
        "blockdev": block_options(info, by_fd=True), "socket": sock, "read_only": True, "uid": 1000,
        "gids": [1000, 24, 100], "image": info.top.path},
        {"node": sock, "pid": 51007, "start_time": 1290554, "size": info.virtual_size})
    export = f"/run/imgmount/exports/{record.id}.raw"
    record = journalled(record, "fuse", "", {
        "blockdev": client_options(sock), "export": export, "read_only": True, "snapshot": req.snapshot,
        "virtual_size": info.virtual_size}, {"node": export, "pid": 51012, "start_time": 1290561})
    record = journalled(record, "loop", "p1", {
        "backing": export, "offset": 1 * MiB, "size": 64 * MiB, "read_only": True, "qemu_locks": False,
        "direct_io": False},
        {"backing_dev": 44, "backing_ino": 2, "node": "/dev/loop0", "devnum": "7:0",
         "sysfs": {"backing_file": export, "offset": 1 * MiB, "sizelimit": 64 * MiB, "size_bytes": 64 * MiB,
                   "ro": True, "dev": "7:0"}})
    overlay = f"/run/imgmount/exports/{record.id}-{len(record.layers)}.raw"
    record = journalled(record, "fuse", "p1", {
        "blockdev": "driver=host_device,filename=/dev/loop0", "export": overlay, "read_only": False,
        "overlay": True, "virtual_size": 64 * MiB}, {"node": overlay, "pid": 51020, "start_time": 1290570})
    record = journalled(record, "loop", "p1", {
        "backing": overlay, "offset": 0, "size": 0, "read_only": False, "qemu_locks": False,
        "direct_io": False},
        {"backing_dev": 45, "backing_ino": 2, "node": "/dev/loop1", "devnum": "7:1",
         "sysfs": {"backing_file": overlay, "offset": 0, "sizelimit": 0, "size_bytes": 64 * MiB, "ro": False,
                   "dev": "7:1"}})
    mountpoint = unique_mountpoint("/run/media/alice", "guest-p1")
    planned = {"device": "/dev/loop1", "mountpoint": mountpoint, "name": "guest-p1", "fstype": "ext4",
               "owner": 1000, "options": mount_options("ext4", read_only=True, requested=req.mount_options,
                                                       owner_uid=1000, owner_gid=1000, replay=True)}
    record = journalled(record, "mount", "p1", planned, None)
    # The mount layer's progress() after making the directory, then the crash:
    return record.with_layer(LayerRecord("mount", "p1", "attaching", {**planned, "created": True}))


def main(out: Path) -> None:
    WHERE.mkdir(exist_ok=True)
    try:
        image = WHERE / "guest.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "512M"], check=True)
        info = probe_image(str(image))
        journal = Journal(str(out))
        for record in (root_nbd_mount(info), confined_fuse_mount(info)):
            journal.write(record)
    finally:
        shutil.rmtree(WHERE)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
