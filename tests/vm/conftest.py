"""The VM lane: these tests run only inside the guest that ``scripts/vm-run`` boots (a real kernel with nbd,
partition scanning and device-mapper). Anywhere else they fail, never skip: a lane that cannot run must
show up as a failure, not as a quietly green run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from tests.support import guests, nbd, raid, thin_guest
from tests.support.guests import Guest

RUN_THEM = "run them with scripts/vm-run -- .venv/bin/pytest tests/vm"


@pytest.fixture(scope="session", autouse=True)
def vm_lane() -> Path:
    """The guest's writable work directory (shared with the host), after checking we are really in the lane."""
    work = os.environ.get("IMGMOUNT_VM_WORK", "")
    if os.environ.get("IMGMOUNT_VM_LANE") != "1" or not work:
        pytest.fail(f"tests/vm run only inside the VM lane (a real kernel with nbd and dm-mod): {RUN_THEM}",
                    pytrace=False)
    for module in ("nbd", "dm_mod"):
        if not Path("/sys/module", module).is_dir():
            pytest.fail(f"the {module} module is not loaded in this kernel: {RUN_THEM}", pytrace=False)
    max_part = Path("/sys/module/nbd/parameters/max_part").read_text().strip()
    if max_part == "0":
        pytest.fail("nbd was loaded with max_part=0 (no partition nodes): the VM lane loads it with "
                    "max_part=16", pytrace=False)
    return Path(work)


@pytest.fixture
def scratch(tmp_path: Path, vm_lane: Path) -> Path:
    """A directory for images in the guest's own tmpfs for them (the guest root is read-only)."""
    where = Path(os.environ.get("IMGMOUNT_VM_SCRATCH", vm_lane))
    assert tmp_path.is_relative_to(where), f"the test's directory is not in the lane's {where}: {tmp_path}"
    return tmp_path


@pytest.fixture
def free_nbd() -> Iterator[str]:
    """A free ``/dev/nbdN`` (no ``pid``, size 0); checked free again afterwards."""
    free = nbd.free_devices()
    assert free, "no free nbd device in the guest"
    device = f"/dev/{free[0]}"
    yield device
    assert nbd.is_free(free[0]), f"{device} is still attached after the test"


@pytest.fixture
def engine(scratch: Path) -> Iterator[Engine]:
    """An engine with its state in the scratch directory; whatever a test leaves mounted is unmounted."""
    eng = Engine(Journal(str(scratch / "state")))
    yield eng
    for m in eng.mounts():
        eng.unmount(m.id, force=True)


# --- the guests: each built once per lane run, then only read (every test converts or attaches it read-only) ---


@pytest.fixture(scope="session")
def udevd() -> None:
    """The lane's real udevd (virtme-ng starts one), for tests of what udev's events do."""
    ping = subprocess.run(["udevadm", "control", "--ping"], capture_output=True, check=False)
    assert ping.returncode == 0, "no udevd runs in the VM lane (virtme-ng starts one)"


@pytest.fixture(scope="session")
def gpt(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """GPT with ext4, xfs and btrfs partitions and an LVM PV (VG ``guestvg``, LV ``root``)."""
    return guests.gpt_guest(tmp_path_factory.mktemp("gpt") / "gpt.raw")


@pytest.fixture(scope="session")
def thin(tmp_path_factory: pytest.TempPathFactory, udevd: None) -> Guest:
    """Fedora's layout: /boot and a thin pool with thin LVs ``root`` (xfs) and ``home`` (ext4)."""
    return thin_guest.thin_guest(tmp_path_factory.mktemp("thin") / "fedora.raw")


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """An md mirror made by mdadm, both members partitions of one image."""
    return raid.mdadm_guest(tmp_path_factory.mktemp("pair") / "pair.raw")
