"""What an entry point (imgmountd, a command working in-process, a test) sets up once and hands down: the
state directory, the mount deadline, and the fault points the tests use. Nothing below the entry points
reads the environment; this module is light enough for the commands to import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = "/run/imgmount"
#: Seconds one mount may take before it is cancelled, rolled back and answered Timeout: far above what a real
#: image needs (seconds), so only a stuck program (a stopped QEMU, a hung file server) reaches it.
DEFAULT_DEADLINE = 300.0
STATE_DIR_ENV = "IMGMOUNT_STATE_DIR"  # tests, a second instance
DEADLINE_ENV = "IMGMOUNT_MOUNT_TIMEOUT"
FAULT_ENV = "IMGMOUNT_FAULT_AT"  # tests only: fail the N-th step of every attach
CRASH_ENV = "IMGMOUNT_CRASH_AT"  # tests only: SIGKILL this process at the N-th step, as a crash would
#: A unix socket's path holds 108 bytes: a longer state directory (a test's) puts servers' sockets here.
MAX_RUN_DIR = 64


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    mount_deadline: float = DEFAULT_DEADLINE
    fault_at: int = 0
    crash_at: int = 0

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        deadline = env.get(DEADLINE_ENV, "")
        return cls(Path(env.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR),
                   float(deadline) if _is_number(deadline) else DEFAULT_DEADLINE,
                   _step(env.get(FAULT_ENV, "")), _step(env.get(CRASH_ENV, "")))


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
