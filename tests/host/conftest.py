"""Fixtures of the host lane's daemon tests: a private bus, a state tmpfs, the real imgmountd, a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bus import Bus, Client, Daemon, client, imgmount_group, private_bus, tmpfs


@pytest.fixture(scope="module")
def bus() -> Iterator[Bus]:
    with private_bus() as b:
        yield b


@pytest.fixture(scope="module")
def run() -> Iterator[Path]:
    """Where daemons keep their state: a tmpfs, as /run is."""
    with tmpfs() as path:
        yield path


@pytest.fixture
def daemon(bus: Bus, run: Path) -> Iterator[Daemon]:
    d = Daemon(bus, run).start()
    yield d
    d.close()


@pytest.fixture
def c(bus: Bus, daemon: Daemon) -> Iterator[Client]:
    with client(bus.address) as cl:
        yield cl


@pytest.fixture(scope="module")
def group() -> Iterator[int]:
    """The group ``imgmount`` (created for the module if the host has none, and removed again)."""
    with imgmount_group() as gid:
        yield gid


@pytest.fixture(scope="module", autouse=True)
def media_cleanup() -> Iterator[None]:
    """Mounts without a mount root go under /run/media/<user>, which the engine leaves in place (like
    udisks): remove the ones a module made, once empty."""
    media = Path("/run/media")
    before = {p.name for p in media.iterdir()} if media.is_dir() else None
    yield
    if not media.is_dir():
        return
    for root in media.iterdir():
        if root.name not in (before or set()) and root.is_dir() and not any(root.iterdir()):
            root.rmdir()
    if before is None and not any(media.iterdir()):
        media.rmdir()
