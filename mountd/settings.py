"""Where imgmount keeps its state, and the variable that moves it (tests, a second instance): light enough for
the commands to import without the journal."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STATE_DIR = "/run/imgmount"
STATE_DIR_ENV = "IMGMOUNT_STATE_DIR"


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)
