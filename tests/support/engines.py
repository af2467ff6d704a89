"""Engines for tests: whatever a failing test left mounted is unmounted afterwards, so that the leftover check
reports the failure once, not every mount it left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.model import MountRequest


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


@contextlib.contextmanager
def first_volume(image: Path, work: Path) -> Iterator[Path]:
    """``image`` mounted read-only in-process (its journal and mountpoints under ``work``): where its first
    volume is, to check what a mount before wrote into it."""
    with engine_in(work / "state") as eng:
        info = eng.mount(MountRequest(image=str(image), mount_root=str(work / "media")))
        yield Path(info.volumes[0].mountpoint)
