"""Watching for a secret where every user could read it: each process's command line and environment,
scanned again and again by a thread for as long as a block runs (a mount, say), and files (journals, logs)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.support.background import repeated


def _scan_once(secrets: list[bytes], found: set[str]) -> None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for what in ("cmdline", "environ"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes()
            except OSError:
                continue
            if any(s in data for s in secrets):
                found.add(f"pid {pid} {what}: {data[:200]!r}")


@contextlib.contextmanager
def scanning_processes(secrets: Iterable[bytes]) -> Iterator[set[str]]:
    """Yield the set of sightings of any of ``secrets`` in ``/proc/*/cmdline`` or ``/proc/*/environ``,
    filled by a thread that scans every process until the block ends (and once more after)."""
    wanted, found = list(secrets), set[str]()
    with repeated(lambda: _scan_once(wanted, found)) as scans:
        yield found
    _scan_once(wanted, found)
    assert scans[0] > 0, "the process scan never ran"


def files_holding(secrets: Iterable[bytes], roots: Iterable[Path]) -> list[str]:
    """The files under ``roots`` (journals, logs) that contain any of ``secrets``."""
    wanted = list(secrets)
    hits = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and any(s in path.read_bytes() for s in wanted):
                    hits.append(str(path))
    return hits


def key_memfds() -> dict[str, int]:
    """Every process's descriptor on an imgmount key memfd (``/memfd:imgmount-key``), and its size now."""
    found = {}
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("/memfd:imgmount-key"):
                found[str(fd)] = fd.stat().st_size
    return found
