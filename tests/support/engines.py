"""Engines for tests: whatever a failing test left mounted is unmounted afterwards, so that the leftover check
reports the failure once, not every mount it left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mountd.engine.engine import Engine


@contextlib.contextmanager
def cleaned(engine: Engine) -> Iterator[Engine]:
    try:
        yield engine
    finally:
        for m in engine.mounts():
            engine.unmount(m.id, force=True)
