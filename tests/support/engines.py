"""An in-process engine with a state directory of its own, for host tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal


@contextlib.contextmanager
def private_engine(state: Path) -> Iterator[Engine]:
    """An engine journalling under ``state``; a test that fails does not leave its mounts to the next."""
    eng = Engine(Journal(str(state)))
    try:
        yield eng
    finally:
        for m in eng.mounts():
            eng.unmount(m.id, force=True)
