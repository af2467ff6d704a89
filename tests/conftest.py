"""Test lanes and the leftover check.

Lanes are chosen by directory: ``tests/unit`` (pure, no root), ``tests/host`` (root on this machine: real loop
devices, QEMU processes, files), ``tests/vm`` (a real kernel with nbd and dm-mod: only inside the VM lane).
A lane that cannot run fails under ``CI=true`` instead of skipping (see :func:`require`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mountd.host.dmsetup import allow_udev
from mountd.settings import Settings
from tests.support import leftovers

LANES = ("unit", "host", "vm")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        lane = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if lane in LANES:
            item.add_marker(getattr(pytest.mark, lane))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI a test that skips fails: what it would check is missing on that machine (e.g. the Windows tests
    on a kernel with vfat, whose FUSE drivers then go untested), and a skip would hide it."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the run if it leaves loop/nbd devices, device-mapper tables, mounts or QEMU processes behind."""
    before = leftovers.snapshot()
    yield
    left = leftovers.snapshot().new_since(before)
    if left:
        pytest.fail("the test run left these behind:\n  " + "\n  ".join(left), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def entry_point() -> None:
    """The tests are an entry point too: what their environment sets for the floors below (the VM lane's
    ``DM_DISABLE_UDEV=1``) is handed down as imgmountd's start-up does (:meth:`Engine.started`)."""
    allow_udev(Settings.from_environment().dm_udev)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory on a real filesystem (tmp_path lives under /tmp, which is fine for images)."""
    return tmp_path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
