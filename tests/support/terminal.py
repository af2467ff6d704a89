"""A command run with a pseudo-terminal as its controlling terminal: what a user at a terminal sees of it
(``getpass`` reads /dev/tty), and what she types."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import termios
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Terminal:
    proc: subprocess.Popen[bytes]
    master: int

    def read_until(self, end: bytes, timeout: float = 60.0) -> bytes:
        """What the terminal shows until ``end`` (or, for ``b""``, until ``timeout`` passes quietly)."""
        data, deadline = b"", time.monotonic() + timeout
        while (not end or end not in data) and (left := deadline - time.monotonic()) > 0:
            if not select.select([self.master], [], [], left)[0]:
                break
            try:
                data += os.read(self.master, 4096)
            except OSError:  # the other side closed
                break
        return data

    def type(self, line: bytes) -> None:
        os.write(self.master, line + b"\n")


@contextmanager
def at_terminal(argv: Sequence[str], env: Mapping[str, str]) -> Iterator[Terminal]:
    """``argv`` with a new pty as stdin, stderr and controlling terminal; its stdout a pipe."""
    master, slave = pty.openpty()
    # Only preexec_fn can make the pty the child's controlling terminal, between fork and exec; no other
    # thread of the calling test runs meanwhile.
    proc = subprocess.Popen(list(argv), stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=dict(env),
                            start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509
    os.close(slave)
    try:
        yield Terminal(proc, master)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
