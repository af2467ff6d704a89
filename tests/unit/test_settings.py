"""The one place that reads imgmount's environment (issue 11 item 3): what each variable sets, and what a
bad value falls back to."""

from __future__ import annotations

from pathlib import Path

import pytest

from mountd.engine.engine import Engine, default_mount_root
from mountd.host.dmsetup import UDEV_SYNC, udev_mode
from mountd.settings import DEFAULT_DEADLINE, Settings, run_dir


def test_the_environment_sets_each_setting() -> None:
    env = {"IMGMOUNT_STATE_DIR": "/tmp/x", "IMGMOUNT_MOUNT_TIMEOUT": "8.5", "IMGMOUNT_FAULT_AT": "3",
           "IMGMOUNT_CRASH_AT": "7", "DM_DISABLE_UDEV": "1"}
    assert Settings.from_environment(env) == Settings(Path("/tmp/x"), 8.5, 3, 7, dm_udev=False)


def test_nothing_set_or_nonsense_gives_the_defaults() -> None:
    assert Settings.from_environment({}) == Settings()
    nonsense = {"IMGMOUNT_STATE_DIR": "", "IMGMOUNT_MOUNT_TIMEOUT": "soon", "IMGMOUNT_FAULT_AT": "-1",
                "IMGMOUNT_CRASH_AT": "2x", "DM_DISABLE_UDEV": "0"}
    assert Settings.from_environment(nonsense) == Settings()
    assert Settings.from_environment({"IMGMOUNT_MOUNT_TIMEOUT": "0"}).mount_deadline == DEFAULT_DEADLINE


def test_servers_go_under_a_state_directory_short_enough_for_a_socket(tmp_path: Path) -> None:
    assert run_dir(tmp_path, "servers") == tmp_path / "servers"
    assert (tmp_path / "servers").stat().st_mode & 0o777 == 0o700
    long_dir = tmp_path / ("x" * 80)
    assert run_dir(long_dir, "servers") == Path("/run/imgmount/servers")


def test_the_entry_points_engine_hands_the_udev_setting_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(UDEV_SYNC, "allowed", True)  # put back as the test run's entry point set it
    engine = Engine.started(Settings(dm_udev=False))
    assert engine.settings.dm_udev is False
    assert udev_mode() == ({"DM_DISABLE_UDEV": "1"}, ["--noudevsync"])
    Engine(settings=Settings())  # an engine made directly (a test's) leaves it as its process set it
    assert udev_mode() == ({"DM_DISABLE_UDEV": "1"}, ["--noudevsync"])


def test_mount_roots_go_under_the_media_root() -> None:
    assert Settings().media_root == Path("/run/media")
    assert default_mount_root(Path("/srv/media"), 0) == "/srv/media/root"
    assert default_mount_root(Path("/srv/media"), 2**31 - 7) == f"/srv/media/{2**31 - 7}"  # no such user
