"""Processes named by pid *and* start time (``/proc/PID/stat`` field 22), so a reused pid is never taken for
the process we started or were called by."""

from __future__ import annotations

import ctypes
import os
import signal
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


def kill(pid: int, started: int) -> bool:
    """SIGKILL the process with this pid and start time (stopped or not); False if it has gone. The pidfd is
    taken before the start time is checked, so a pid reused meanwhile is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not is_alive(pid, started):
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


SYS_KCMP = {"x86_64": 312, "aarch64": 272, "i686": 349, "armv7l": 378}.get(os.uname().machine)
KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def same_open_file(pid: int, fd: int, our_fd: int) -> bool:
    """``pid``'s ``fd`` is our own ``our_fd`` (the same open file description: kcmp(2)), e.g. a copy that a
    program we just started holds between its fork and its exec, which closes it. False where unknown."""
    if SYS_KCMP is None:
        return False
    return int(_libc.syscall(SYS_KCMP, os.getpid(), pid, KCMP_FILE, our_fd, fd)) == 0
