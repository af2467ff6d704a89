"""An in-process engine for a test, which unmounts whatever a failing test left mounted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal


def engine_at(state: Path) -> Iterator[Engine]:
    """For ``yield from`` in a fixture: an engine journalling under ``state``; its mounts undone after."""
    engine = Engine(Journal(str(state)))
    yield engine
    for m in engine.mounts():  # a failing test must not leave its mounts to the leftover check
        engine.unmount(m.id, force=True)
