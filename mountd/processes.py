"""Processes named by pid *and* start time (``/proc/PID/stat`` field 22), so a reused pid is never taken for
the process we started or were called by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcState:
    start_time: int  # /proc/PID/stat field 22: clock ticks after boot
    state: str  # R, S, D, Z, ...


def proc_state(pid: int) -> ProcState | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # comm may hold spaces and parentheses
    return ProcState(int(fields[19]), fields[0])


def start_time(pid: int) -> int | None:
    """The start time of ``pid``, or None when there is no such process."""
    found = proc_state(pid)
    return found.start_time if found else None


def is_alive(pid: int, start_time: int) -> bool:
    """The process that had this start time still runs (a zombie does not: nothing reaps a daemon whose
    parent, pid 1 in some containers, never waits)."""
    found = proc_state(pid)
    return found is not None and found.start_time == start_time and found.state not in ("Z", "X")
