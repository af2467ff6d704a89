"""An in-process engine for a test: its own journal, and nothing left mounted after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal


@contextlib.contextmanager
def engine_in(state: Path) -> Iterator[Engine]:
    """An engine journalling under ``state``; what a failing test left mounted is unmounted after it (so the
    leftover check reports only real leaks)."""
    eng = Engine(Journal(str(state)))
    try:
        yield eng
    finally:
        for m in eng.mounts():
            eng.unmount(m.id, force=True)
