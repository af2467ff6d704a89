"""Each layer kind's spec reads back (``parse``) exactly what it planned (``plan``), through the journal's JSON;
a plan missing a key it needs is an InvalidArgument naming the kind, not a KeyError as root at attach time."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mountd.errors import InvalidArgumentError
from mountd.host.opener import Credentials
from mountd.layers.bitlocker import BitLockerSpec
from mountd.layers.crypt import CryptSpec
from mountd.layers.dm import DmSpec
from mountd.layers.fuse import ExportSpec
from mountd.layers.layer import LayerRecord, LayerState
from mountd.layers.loop import LoopSpec
from mountd.layers.md import MdSpec
from mountd.layers.mount import MountSpec
from mountd.layers.nbd import NbdSpec, PartitionSpec
from mountd.layers.server import ServerSpec

OPTIONS = ("ro", "nosuid", "nodev", "noload")
SPECS: list[Any] = [
    ServerSpec("driver=qcow2,file.driver=file,file.filename=/proc/self/fd/5", "/run/imgmount/servers/a.sock",
               True, Credentials(1000, (1000, 27)), "/home/u/vm.qcow2", 7),
    NbdSpec("driver=qcow2,file.driver=file,file.filename=/srv/vm.qcow2", True, "before-upgrade",
            "/run/imgmount/nbd", 6),
    PartitionSpec("/dev/nbd3", 2, 1 << 20, 64 << 20),
    ExportSpec("driver=raw,file.driver=file,file.filename=/srv/a.img", "/run/imgmount/exports/a.raw", False,
               "", 1 << 30, overlay=True),
    LoopSpec("/srv/a.img", 1 << 20, 64 << 20, True, False, 4096, True),
    MdSpec("0a1b2c3d:4e5f6a7b:8c9d0e1f:2a3b4c5d", ("/dev/loop3", "/dev/loop4"), True),
    DmSpec("imgmount-abc-vg-root", "IMGMOUNT-abc-Xyz123", True,
           [[0, 2048, "linear", "/dev/nbd3p2", 2048], [2048, 4096, "striped", 2, 128, "/dev/loop3", 8,
                                                       "/dev/loop4", 8]]),
    CryptSpec("/dev/nbd3p2", "imgmount-abc-p2", "2", "5d1b2a3c-1111-4222-8333-944455556666", True),
    BitLockerSpec("/dev/nbd3p3", "/run/imgmount/bitlocker/abc-p3", False),
    MountSpec("/dev/mapper/imgmount-abc-vg-root", "/run/media/u/vm-vg-root", "ext4", OPTIONS, 1000,
              "vm-vg-root"),
    MountSpec("/dev/nbd3p3", "/run/media/u/vm-p3", "ntfs", ("rw", "nosuid", "nodev"), 1000, None,
              "recent writes are not shown", "ntfs-3g"),
]


def _through_json(identity: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(json.dumps(identity)))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_a_plan_reads_back_as_its_spec(spec: Any) -> None:
    record = spec.plan("p2")
    assert (record.kind, record.volume, record.state) == (spec.kind, "p2", LayerState.ATTACHING)
    again = LayerRecord.from_json(_through_json({"kind": record.kind, "volume": record.volume,
                                                 "state": record.state, "identity": record.identity}))
    if isinstance(spec, LoopSpec):
        assert LoopSpec.parse(again.identity, resolve=False) == spec
    else:
        assert type(spec).parse(again.identity) == spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_a_plan_without_a_key_it_needs_is_invalid(spec: Any) -> None:
    needed = next(k for k in spec.identity() if k not in ("read_only", "snapshot", "servers", "key_fd"))
    broken = {k: v for k, v in spec.identity().items() if k != needed}
    with pytest.raises(InvalidArgumentError):
        type(spec).parse(broken)


def test_what_every_kind_records_once_attached() -> None:
    planned = LayerRecord("fuse", "", LayerState.ATTACHING, {"export": "/run/imgmount/exports/a.raw"})
    assert (planned.node, planned.process) == ("", None)
    attached = LayerRecord("fuse", "", LayerState.ATTACHED,
                           {"node": "/run/imgmount/exports/a.raw", "pid": 4321, "start_time": 98765})
    assert (attached.node, attached.process) == ("/run/imgmount/exports/a.raw", (4321, 98765))
    assert LayerRecord("server", "", LayerState.ATTACHING, {"pid": 4321}).process is None


def test_a_mount_spec_says_whether_it_writes() -> None:
    assert MountSpec.parse(SPECS[-2].identity()).read_only
    assert not MountSpec.parse(SPECS[-1].identity()).read_only
    with pytest.raises(InvalidArgumentError, match="not a list"):
        MountSpec.parse({**SPECS[-2].identity(), "options": "ro,nosuid,nodev"})


def test_a_crypt_spec_names_the_device_as_cryptsetup_does() -> None:
    crypt = next(s for s in SPECS if isinstance(s, CryptSpec))
    assert crypt.dm_uuid == "CRYPT-LUKS2-5d1b2a3c111142228333944455556666-imgmount-abc-p2"
