"""Processes named by pid *and* start time (``/proc/PID/stat`` field 22), so a reused pid is never taken for
the process we started or were called by."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from mountd.errors import OperationTimeoutError

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0  # flushing a large write-back cache to slow storage takes a while
KILL_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProcState:
    start_time: int  # /proc/PID/stat field 22: clock ticks after boot
    state: str  # R, S, D, Z, ...
    ppid: int = 0


def proc_state(pid: int) -> ProcState | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # comm may hold spaces and parentheses
    return ProcState(int(fields[19]), fields[0], int(fields[1]))


def entries(path: str) -> list[str]:
    """``os.listdir``, or nothing once the process (or device) is gone or is not ours to look at."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def link_target(path: str) -> str:
    """``os.readlink``, or "" once the process or fd is gone or is not ours to look at."""
    try:
        return os.readlink(path)
    except OSError:
        return ""


def text_of(path: str) -> str:
    """A /proc or sysfs file's text, stripped, or "" once what it describes is gone."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def program_name(pid: int) -> str | None:
    """Basename of the executable (``comm`` is cut at 15 characters), or None once the process is gone."""
    name = os.path.basename(link_target(f"/proc/{pid}/exe").removesuffix(" (deleted)"))
    return name or text_of(f"/proc/{pid}/comm") or None


def start_time(pid: int) -> int | None:
    """The start time of ``pid``, or None when there is no such process."""
    found = proc_state(pid)
    return found.start_time if found else None


def not_yet_execed_child(pid: int) -> bool:
    """``pid`` is a child of ours that still runs our own program with our own command line: a program
    another thread is starting, between its fork and its exec. It holds copies of every fd we had open at
    the fork, ones closed since included, and its exec closes them all (close_fds): it is no user of
    anything. (A Python program we start has our executable too, but its own command line.)"""
    found = proc_state(pid)
    if found is None or found.ppid != os.getpid():
        return False
    try:
        theirs, ours = os.stat(f"/proc/{pid}/exe"), os.stat("/proc/self/exe")
        same_program = (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
        return same_program and _read_bytes(f"/proc/{pid}/cmdline") == _read_bytes("/proc/self/cmdline")
    except OSError:
        return False


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_alive(pid: int, start_time: int) -> bool:
    """The process that had this start time still runs (a zombie does not: nothing reaps a daemon whose
    parent, pid 1 in some containers, never waits)."""
    found = proc_state(pid)
    return found is not None and found.start_time == start_time and found.state not in ("Z", "X")


def kill(pid: int, started: int) -> bool:
    """SIGKILL the process with this pid and start time (stopped or not); False if it has gone."""
    pidfd = open_process(pid, started)
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


# ---- the stop policy of our servers (qemu-storage-daemon, qemu-nbd) -----------------------------------


def open_process(pid: int, started: int | None) -> int | None:
    """A pidfd on ``pid`` while it is the process that started at ``started`` (never a reused pid): the
    start time is checked after the pidfd is taken, and the pidfd pins the process."""
    if started is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    if not is_alive(pid, started):
        os.close(pidfd)
        return None
    return pidfd


def has_exited(pidfd: int, timeout: float = 0.0) -> bool:
    """A pidfd turns readable when its process exits, child of ours or not."""
    ready, _, _ = select.select([pidfd], [], [], timeout)
    return bool(ready)


def stop_process(pid: int, started: int, name: str, *, force: bool, grace: float | None = None) -> None:
    """:func:`stop` the process with this pid and start time, if it still runs."""
    pidfd = open_process(pid, started)
    if pidfd is not None:
        try:
            stop(pidfd, f"{name} (pid {pid})", force=force, grace=grace)
        finally:
            os.close(pidfd)


def stop(pidfd: int, what: str, *, force: bool, grace: float | None = None) -> None:
    """SIGTERM the process and wait ``grace`` s (default :data:`STOP_TIMEOUT`) for it to exit; SIGKILL after
    that only if ``force``."""
    grace = STOP_TIMEOUT if grace is None else grace
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    if has_exited(pidfd, grace):
        return
    stuck = waiting_in(pidfd)
    if not force:
        raise OperationTimeoutError(f"{what} did not exit within {grace:g} s of SIGTERM{stuck}: "
                                    "retry, or force (unflushed writes are lost)")
    log.warning("%s ignored SIGTERM%s: killing it", what, stuck)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if not has_exited(pidfd, KILL_TIMEOUT):
        raise OperationTimeoutError(f"{what} survived SIGKILL for {KILL_TIMEOUT:g} s")


def waiting_in(pidfd: int) -> str:
    """Where a process that will not exit waits, for its error: " (waiting in fuse_dev_do_read x2, ...)",
    its threads' kernel wait channels; "" if it is gone or the kernel does not say."""
    pid = next((int(line.split()[1]) for line in text_of(f"/proc/self/fdinfo/{pidfd}").splitlines()
                if line.startswith("Pid:")), 0)
    tasks = entries(f"/proc/{pid}/task") if pid > 0 else []
    channels = Counter(_wait_channel(f"/proc/{pid}/task/{t}/wchan") for t in tasks)
    shown = ", ".join(f"{c} x{n}" if n > 1 else c for c, n in sorted(channels.items()))
    return f" (waiting in {shown}{_sigterm_state(pid)})" if shown else ""


def _sigterm_state(pid: int) -> str:
    """"; SIGTERM blocked" or "; SIGTERM ignored" when the process cannot have acted on it."""
    status = dict(line.split(":", 1) for line in text_of(f"/proc/{pid}/status").splitlines() if ":" in line)
    bit = 1 << (signal.SIGTERM - 1)
    for field, state in (("SigBlk", "blocked"), ("SigIgn", "ignored")):
        with contextlib.suppress(ValueError):
            if int(status.get(field, "0").strip(), 16) & bit:
                return f"; SIGTERM {state}"
    return ""


def _wait_channel(path: str) -> str:
    channel = text_of(path)
    return "running" if channel in ("", "0") else channel
