"""LUKS on this host, which has no device-mapper: an encrypted volume is "locked" in inspection, the volumes
beside it mount as before, and unlocking LUKS2 (when named) fails with one sentence naming device-mapper,
leaving nothing.

The image is Ubuntu's "encrypt the disk" layout with a real LUKS2 header (``cryptsetup luksFormat`` on a loop
device); what is inside needs device-mapper to write, so it is empty here (the VM lane fills it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit.crypt_layouts import CryptGuest, ubuntu_encrypted
from mountd.engine.engine import Engine
from mountd.engine.inspection import Inspection, inspect_image
from mountd.engine.render import inspection_to_dict
from mountd.engine.unlocking import lock_kind
from mountd.errors import UnsupportedError
from mountd.host.support import check_host
from mountd.keys import Keys
from mountd.model import MountRequest
from tests.support import guests, leftovers
from tests.support.engines import engine_in

SECRET = b"correct horse battery staple"


@pytest.fixture(scope="module")
def ubuntu(tmp_path_factory: pytest.TempPathFactory) -> CryptGuest:
    return ubuntu_encrypted(tmp_path_factory.mktemp("luks") / "ubuntu.raw", SECRET, size=160 << 20,
                            with_content=False)


def shown(ins: Inspection) -> dict[str, dict[str, object]]:
    return {v["name"]: v for v in inspection_to_dict(ins)["volumes"]}


def mine(before: leftovers.Snapshot, ubuntu: CryptGuest, tmp_path: Path) -> list[str]:
    return leftovers.ours(leftovers.snapshot().new_since(before), ubuntu.raw.parent, tmp_path)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    assert not check_host().device_mapper, "this test is about a host without device-mapper"
    with engine_in(tmp_path / "state") as eng:
        yield eng


def test_inspection_shows_the_luks2_volume_locked(ubuntu: CryptGuest) -> None:
    ins = inspect_image(str(ubuntu.raw))
    p3 = ins.layout.volume("p3")
    assert p3 is not None and lock_kind(p3) == "LUKS2"
    assert shown(ins)["p3"]["locked"] == "LUKS2" and shown(ins)["p2"]["locked"] is None


def test_without_a_key_the_other_volumes_mount(engine: Engine, ubuntu: CryptGuest, tmp_path: Path) -> None:
    info = engine.mount(MountRequest(str(ubuntu.raw), mount_root=str(tmp_path / "media")))
    assert [v.name for v in info.volumes] == ["p1", "p2"]  # the ESP too: through fusefat, where no vfat
    guests.check_files(Path(info.volumes[1].mountpoint), ubuntu.files["p2"])
    engine.unmount(info.id)


def test_luks2_without_device_mapper_is_a_clear_error(engine: Engine, ubuntu: CryptGuest, tmp_path: Path) -> None:
    before = leftovers.snapshot()
    request = MountRequest(str(ubuntu.raw), mount_root=str(tmp_path / "media"), volumes=("p3",),
                           keys=Keys(everywhere=SECRET))
    with pytest.raises(UnsupportedError) as caught:
        engine.mount(request)
    assert str(caught.value).startswith("volume p3 is LUKS2: unlocking it needs device-mapper (dm-crypt), "
                                        "which this kernel lacks")
    assert SECRET.decode() not in str(caught.value)
    assert engine.mounts() == [] and mine(before, ubuntu, tmp_path) == []


def test_with_a_key_for_every_volume_what_can_be_mounted_is(engine: Engine, ubuntu: CryptGuest,
                                                            tmp_path: Path) -> None:
    request = MountRequest(str(ubuntu.raw), mount_root=str(tmp_path / "media"), keys=Keys(everywhere=SECRET))
    info = engine.mount(request)
    assert [v.name for v in info.volumes] == ["p1", "p2"]  # p3 is LUKS2: it needs device-mapper
    engine.unmount(info.id)
