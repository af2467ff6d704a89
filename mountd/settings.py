"""Where imgmount keeps its state, and the variable that moves it (tests, a second instance): light enough for
the commands to import without the journal."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = "/run/imgmount"
STATE_DIR_ENV = "IMGMOUNT_STATE_DIR"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def run_dir(sub: str = "nbd") -> Path:
    """Where the servers' pid files and sockets go: under the state directory, unless its path is too long
    for a unix socket (108 bytes), as a test's temporary state directory may be."""
    root = state_dir()
    found = (root if len(str(root)) <= 64 else Path(DEFAULT_STATE_DIR)) / sub
    found.mkdir(parents=True, exist_ok=True, mode=0o700)
    return found
