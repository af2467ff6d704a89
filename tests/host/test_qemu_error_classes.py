"""QEMU's failures, caused for real, reach the user as the error of their class (issue 9 #6): a lock held by a
running QEMU is InUse, a file that is not there NotFound, one the caller may not read NotAuthorized, a feature
this QEMU lacks Unsupported, a damaged image InvalidImage; never "in use" because QEMU's option prefix says
"lock", and never QEMU's option string instead of the file's name."""

from __future__ import annotations

import contextlib
import pwd
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

import mountd.layers.fuse
from imgmount_testkit import images
from imgmount_testkit.bus import world_dir
from imgmount_testkit.users import as_user
from mountd.engine.inspection import inspect_image
from mountd.errors import (
    InUseError,
    InvalidImageError,
    MountdError,
    NotFoundError,
    UnsupportedError,
)
from mountd.host.qemuerrors import QemuFailure, classify, last_words
from tests.support.layers import attached, planned
from tests.support.vms import running_vm

assert mountd.layers.fuse  # registers the "fuse" kind
INCOMPATIBLE_FEATURES = 72  # the qcow2 header's field (QEMU's QCowHeader.incompatible_features)
L1_TABLE_OFFSET = 40


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.convert(images.blank(tmp_path_factory.mktemp("qe") / "disk.raw", 16 * images.MiB),
                          tmp_path_factory.mktemp("qe") / "disk.qcow2", "qcow2")


def patched(image: Path, at: Path, offset: int, value: bytes) -> Path:
    """A copy of ``image`` with ``value`` written at ``offset`` of its header."""
    shutil.copy(image, at)
    with open(at, "r+b") as f:
        f.seek(offset)
        f.write(value)
    return at


def qemu_img_info(image: Path, *argv: str, user: list[str] | None = None) -> str:
    """What ``qemu-img info`` says on failure (it must fail)."""
    done = subprocess.run([*(user or []), "qemu-img", "info", *argv, str(image)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0, done.stdout
    return last_words(done.stderr)


def test_qemus_own_words_of_each_failure_are_classed(qcow2: Path, tmp_path: Path) -> None:
    unknown_feature = patched(qcow2, tmp_path / "feature.qcow2", INCOMPATIBLE_FEATURES, struct.pack(">Q", 1 << 20))
    bad_l1 = patched(qcow2, tmp_path / "l1.qcow2", L1_TABLE_OFFSET, struct.pack(">Q", 12345))
    shared = world_dir("imgmount-qe-")
    try:
        private = Path(shutil.copy(qcow2, shared / "root-only.qcow2"))
        private.chmod(0o600)
        nobody = pwd.getpwnam("nobody")
        said = {
            QemuFailure.MISSING: qemu_img_info(tmp_path / "gone.qcow2"),
            QemuFailure.PERMISSION: qemu_img_info(private, user=as_user(nobody.pw_uid, nobody.pw_gid, ())),
            QemuFailure.UNSUPPORTED: qemu_img_info(unknown_feature),
            QemuFailure.IMAGE: qemu_img_info(bad_l1),
        }
        with running_vm(f"file={qcow2},format=qcow2"):
            said[QemuFailure.LOCK] = qemu_img_info(qcow2)
    finally:
        shutil.rmtree(shared)
    assert {kind: classify(words) for kind, words in said.items()} == {kind: kind for kind in said}
    assert "Could not open 'file.driver" not in " ".join(said.values())


def test_a_feature_this_qemu_lacks_is_unsupported_and_names_it(qcow2: Path, tmp_path: Path) -> None:
    image = patched(qcow2, tmp_path / "feature.qcow2", INCOMPATIBLE_FEATURES, struct.pack(">Q", 1 << 20))
    with pytest.raises(UnsupportedError, match=rf"^QEMU cannot open {image}: it does not support what the image "
                                               r"uses \(.*Unknown incompatible feature: 100000\); a newer QEMU may$"):
        inspect_image(str(image))


def test_a_damaged_image_is_invalid(qcow2: Path, tmp_path: Path) -> None:
    image = patched(qcow2, tmp_path / "l1.qcow2", L1_TABLE_OFFSET, struct.pack(">Q", 12345))
    with pytest.raises(InvalidImageError, match=rf"^QEMU cannot open {image}: .*L1 table offset invalid"):
        inspect_image(str(image))


@pytest.mark.parametrize(("change", "error"), [
    ("feature", UnsupportedError), ("l1", InvalidImageError), ("gone", NotFoundError), ("vm", InUseError)])
def test_the_fuse_export_of_an_image_changed_since_its_inspection(qcow2: Path, tmp_path: Path, change: str,
                                                                 error: type[MountdError]) -> None:
    """The export's qemu-storage-daemon meets what inspection did not (the image changed in between, as a
    hostile owner may make it): its failure is classed too, and nothing is left."""
    image = Path(shutil.copy(qcow2, tmp_path / "disk.qcow2"))
    if change == "feature":
        patched(qcow2, image, INCOMPATIBLE_FEATURES, struct.pack(">Q", 1 << 20))
    elif change == "l1":
        patched(qcow2, image, L1_TABLE_OFFSET, struct.pack(">Q", 12345))
    elif change == "gone":
        image.unlink()
    plan = planned("fuse", blockdev=f"driver=qcow2,file.driver=file,file.filename={image}",
                   export=str(tmp_path / "export.raw"), read_only=True, snapshot=None)
    vm = running_vm(f"file={image},format=qcow2") if change == "vm" else contextlib.nullcontext()
    with vm, pytest.raises(error) as caught, attached(plan):
        pass
    assert "file.driver" not in str(caught.value) and str(image) in str(caught.value)
    assert not (tmp_path / "export.raw").exists()

