"""Stopping a helper process (qemu-nbd, qemu-storage-daemon, dislocker) that will not exit: a real process that
ignores SIGTERM, with the deadline shortened. The error says where its threads wait in the kernel, so a stuck
helper names what it is stuck on."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from mountd.errors import OperationTimeoutError
from mountd.host import processes
from mountd.host.processes import has_exited, stop

IGNORES_SIGTERM = "import signal, select; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); " \
                  "select.select([], [], [], 600)"


@pytest.fixture
def stubborn(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A pidfd of a process that ignores SIGTERM and waits in select(); the stop deadline is 1 s."""
    monkeypatch.setattr(processes, "STOP_TIMEOUT", 1.0)
    proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"\n"  # its handler is in place
    pidfd = os.pidfd_open(proc.pid)
    try:
        yield pidfd
    finally:
        proc.kill()
        proc.wait()
        os.close(pidfd)


def test_a_process_that_ignores_sigterm_is_named_with_where_it_waits(stubborn: int) -> None:
    with pytest.raises(OperationTimeoutError) as caught:
        stop(stubborn, "the helper (pid 1)", force=False)
    message = str(caught.value)
    assert message.startswith("the helper (pid 1) did not exit within 1 s of SIGTERM (waiting in ")
    assert "select" in message or "poll" in message, message  # the kernel's wait channel of select()
    assert not has_exited(stubborn)


def test_forced_it_is_killed(stubborn: int) -> None:
    stop(stubborn, "the helper (pid 1)", force=True)
    assert has_exited(stubborn)
