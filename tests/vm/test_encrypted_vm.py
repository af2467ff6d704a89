"""Encrypted images on the nbd backend (a real kernel): a qcow2 encrypted by QEMU (LUKS, legacy AES) served by
``qemu-nbd`` with its key as a secret object from a memfd, and a LUKS1 partition through QEMU's luks driver
over the nbd device; a wrong passphrase leaves no nbd device, server or export behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.engine.engine import Engine
from mountd.errors import WrongKeyError
from mountd.keys import Keys
from mountd.model import MountRequest
from tests.support import crypt_guests, guests, leftovers
from tests.support.crypt_guests import IMAGE_PASSPHRASE, PASSPHRASE
from tests.support.engines import engine_in
from tests.support.guests import Guest


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    with engine_in(scratch / "state") as eng:
        yield eng


@pytest.mark.parametrize("encryption", ["luks", "aes"])
def test_qemu_encrypted_qcow2_on_nbd(engine: Engine, scratch: Path, encryption: str) -> None:
    guest = crypt_guests.qemu_encrypted_guest(scratch, encryption)
    before = leftovers.snapshot()
    with pytest.raises(WrongKeyError, match="wrong passphrase for the image"):
        engine.mount(MountRequest(str(guest.raw), mount_root=str(scratch / "m"), backend="nbd",
                                  keys=Keys(everywhere=b"not it")))
    assert leftovers.snapshot().new_since(before) == [] and engine.mounts() == []
    info = engine.mount(MountRequest(str(guest.raw), mount_root=str(scratch / "m"), backend="nbd",
                                     keys=Keys({"image": IMAGE_PASSPHRASE})))
    assert info.backend == "nbd"
    _check_and_unmount(engine, info.id, guest)
    assert leftovers.snapshot().new_since(before) == []


def test_luks1_partition_over_nbd(engine: Engine, scratch: Path) -> None:
    guest = crypt_guests.luks1_partition_guest(scratch, formatter="qemu")  # cryptsetup cannot here: see there
    qcow2 = scratch / "luks1.qcow2"
    images.convert(guest.raw, qcow2, "qcow2")
    before = leftovers.snapshot()
    info = engine.mount(MountRequest(str(qcow2), mount_root=str(scratch / "m"), backend="nbd",
                                     keys=Keys({"p2": PASSPHRASE})))
    _check_and_unmount(engine, info.id, guest)
    assert leftovers.snapshot().new_since(before) == []


def _check_and_unmount(engine: Engine, mount_id: str, guest: Guest) -> None:
    info = engine.find(mount_id)
    assert {v.name for v in info.volumes} == set(guest.files)
    for v in info.volumes:
        guests.check_files(Path(v.mountpoint), guest.files[v.name])
    engine.unmount(mount_id)
