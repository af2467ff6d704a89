"""A thin LV on a host without device-mapper (this one): ``--info`` lists it as a thin volume that needs
device-mapper, and mounting it is one clear sentence naming thin provisioning and device-mapper, with nothing
left behind. The image is one PV whose VG text (imgmount_testkit/lvm_synth.py) holds a thin pool and thin
LVs as lvm writes them: nothing is activated here, so no pool btree is needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgmount_testkit.lvm_synth import crafted_vg, pv_file
from mountd.engine.engine import Engine
from mountd.engine.inspection import inspect_image
from mountd.engine.journal import Journal
from mountd.engine.render import inspection_to_dict, render_tree
from mountd.errors import UnsupportedError
from mountd.host.support import HostSupport, check_host
from mountd.model import MountRequest
from tests.support import leftovers


@pytest.fixture(scope="module")
def thin_pv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if check_host().device_mapper:
        pytest.fail("this host has device-mapper: the thin-volume error is tested where it has none "
                    "(the VM lane mounts thin volumes)", pytrace=False)
    return pv_file(tmp_path_factory.mktemp("thin") / "thin.img", crafted_vg(lvs=7))  # thin0, thin1


def test_info_lists_thin_volumes_that_need_device_mapper(thin_pv: Path) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "imgmount"), "--info", "--json", str(thin_pv)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    volumes = {v["name"]: v for v in json.loads(proc.stdout)["volumes"]}
    assert volumes["big/thin0"]["note"] == "a thin volume in thin pool pool (thin provisioning): needs device-mapper"
    assert volumes["big/pool"]["note"].startswith("a thin pool (thin provisioning)")


def test_the_note_says_what_the_inspecting_host_does_with_it(thin_pv: Path) -> None:
    """What a thin LV takes is the inspecting host's matter: one with device-mapper (described here, as this
    host has none; the VM lane mounts thin volumes on a real one) maps it when it is mounted."""
    with_dm = HostSupport(device_mapper=True, fuse=True)
    notes = {v["name"]: v["note"] for v in inspection_to_dict(inspect_image(str(thin_pv), host=with_dm))["volumes"]}
    assert notes["big/thin0"] == ("a thin volume in thin pool pool (thin provisioning): mapped through "
                                  "device-mapper when mounted")
    assert "needs device-mapper" not in render_tree(inspect_image(str(thin_pv), host=with_dm))


def test_mounting_a_thin_volume_names_thin_provisioning_and_device_mapper(thin_pv: Path, tmp_path: Path) -> None:
    engine = Engine(Journal(str(tmp_path / "state")))
    before = leftovers.snapshot()
    with pytest.raises(UnsupportedError) as err:
        engine.mount(MountRequest(str(thin_pv), mount_root=str(tmp_path / "media"), volumes=("big/thin1",)))
    assert str(err.value) == ("logical volume big/thin1 is a thin volume in thin pool pool (thin provisioning): "
                              "it needs device-mapper, which this kernel lacks")
    mine = [x for x in leftovers.snapshot().new_since(before) if str(thin_pv) in x or str(tmp_path) in x]
    assert mine == []  # others' tests run beside this one: only what names this test's files is ours
    assert engine.mounts() == []
