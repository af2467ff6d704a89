"""What an entry point (imgmountd, a command working in-process, a test) sets up once and hands down: the
state directory, the mount deadline, where the users' mount roots go, whether device-mapper may wait for
udev, and the fault points the tests use. Nothing below the entry points reads the environment; this module
is light enough for the commands to import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/run/imgmount"
#: Where each user's mount root is made, ``<media root>/<user>``: where desktop file managers look.
DEFAULT_MEDIA_ROOT = "/run/media"
#: Seconds one mount may take before it is cancelled, rolled back and answered Timeout: far above what a real
#: image needs (seconds), so only a stuck program (a stopped QEMU, a hung file server) reaches it.
DEFAULT_DEADLINE = 300.0
STATE_DIR_ENV = "IMGMOUNT_STATE_DIR"  # tests, a second instance
DEADLINE_ENV = "IMGMOUNT_MOUNT_TIMEOUT"
FAULT_ENV = "IMGMOUNT_FAULT_AT"  # tests only: fail the N-th step of every attach
CRASH_ENV = "IMGMOUNT_CRASH_AT"  # tests only: SIGKILL this process at the N-th step, as a crash would
#: libdevmapper's own switch; "1" here also keeps our dmsetup from synchronising with udev (the VM lane)
DM_UDEV_ENV = "DM_DISABLE_UDEV"
#: A unix socket's path holds 108 bytes: a longer state directory (a test's) puts servers' sockets here.
MAX_RUN_DIR = 64


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    mount_deadline: float = DEFAULT_DEADLINE
    fault_at: int = 0
    crash_at: int = 0
    media_root: Path = Path(DEFAULT_MEDIA_ROOT)
    #: dmsetup may synchronise with udev where a udevd answers (False: never, as ``DM_DISABLE_UDEV=1`` asks)
    dm_udev: bool = True

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        deadline = env.get(DEADLINE_ENV, "")
        return cls(Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR),
                   float(deadline) if _is_number(deadline) else DEFAULT_DEADLINE,
                   _step(env.get(FAULT_ENV, "")), _step(env.get(CRASH_ENV, "")),
                   dm_udev=env.get(DM_UDEV_ENV) != "1")


def run_dir(state_dir: Path, sub: str) -> Path:
    """Where the servers' pid files and sockets go: under the state directory, unless its path is too long
    for a unix socket, as a test's temporary state directory may be."""
    found = (state_dir if len(str(state_dir)) <= MAX_RUN_DIR else Path(DEFAULT_STATE_DIR)) / sub
    found.mkdir(parents=True, exist_ok=True, mode=0o700)
    return found


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _step(text: str) -> int:
    return int(text) if text.isdigit() else 0
