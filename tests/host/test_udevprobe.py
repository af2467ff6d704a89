"""How a release waits out udev (mountd/host/udevprobe.py), on a real loop device held by real processes.

This host runs no udevd, so udev's worker is played by a copy of ``sleep`` named ``udevadm`` (the name Debian
gives udev's workers): a named fake for the holder only. The VM lane's test_udev_storm.py has the real udevd.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmount_testkit import images
from mountd.host.udevprobe import release_past_udev

HELD_FOR = 1.0


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    with images.loop(images.blank(tmp_path / "disk.raw", images.MiB), read_only=True) as dev:
        yield dev


def hold(program: Path, node: str, seconds: float) -> subprocess.Popen[bytes]:
    with open(node, "rb") as device:
        return subprocess.Popen([str(program), str(seconds)], stdin=device)


def test_a_udev_probe_is_waited_out(loop: str, tmp_path: Path) -> None:
    udevadm = tmp_path / "udevadm"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", udevadm)
    holder = hold(udevadm, loop, HELD_FOR)
    tries = 0

    def attempt() -> bool:
        nonlocal tries
        tries += 1
        return holder.poll() is not None

    assert release_past_udev(os_name(loop), attempt, timeout=30) is None
    assert tries > 1, "the first try already succeeded: the holder proved nothing"
    holder.wait()


def test_a_udev_probe_that_never_ends_is_named_after_the_timeout(loop: str, tmp_path: Path) -> None:
    udevadm = tmp_path / "udevadm"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", udevadm)
    holder = hold(udevadm, loop, 600)
    try:
        started = time.monotonic()
        users = release_past_udev(os_name(loop), lambda: False, timeout=HELD_FOR)
        assert users is not None and time.monotonic() - started >= HELD_FOR
        assert users.described() == [f"udevadm (pid {holder.pid}) has {loop} open"]
    finally:
        holder.kill()
        holder.wait()


def test_any_other_holder_stops_the_release_at_once(loop: str) -> None:
    holder = hold(Path(shutil.which("sleep") or "/bin/sleep"), loop, 600)
    try:
        started = time.monotonic()
        users = release_past_udev(os_name(loop), lambda: False, timeout=60)
        assert users is not None and time.monotonic() - started < 30, "a real user was waited for"
        assert users.described() == [f"sleep (pid {holder.pid}) has {loop} open"]
    finally:
        holder.kill()
        holder.wait()


def os_name(node: str) -> str:
    return Path(node).name
