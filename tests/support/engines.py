"""Engines for tests: whatever a failing test left mounted is unmounted afterwards, so that the leftover check
reports the failure once, not every mount it left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal


@contextlib.contextmanager
def cleaned(engine: Engine) -> Iterator[Engine]:
    try:
        yield engine
    finally:
        for m in engine.mounts():
            engine.unmount(m.id, force=True)


@contextlib.contextmanager
def engine_in(state: Path) -> Iterator[Engine]:
    """An engine journalling under ``state``."""
    with cleaned(Engine(Journal(str(state)))) as eng:
        yield eng
