"""Watch every process's command line for a secret while something runs: ``/proc/PID/cmdline`` is readable
by every user, so a passphrase in an argument is a passphrase given away."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class CmdlineWatch:
    secret: bytes
    seen: list[str] = field(default_factory=list)  # "pid: argv" of each process that showed it
    scans: int = 0  # how many times every process was looked at
    pids: set[int] = field(default_factory=set)  # every process seen during the watch

    def scan(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read()
            except OSError:
                continue
            self.pids.add(int(name))
            if self.secret in argv:
                shown = argv.replace(b"\0", b" ").decode(errors="replace")
                self.seen.append(f"{name}: {shown[:200]}")
        self.scans += 1


@contextlib.contextmanager
def watching_cmdlines(secret: bytes) -> Iterator[CmdlineWatch]:
    """Scan all command lines in a loop on a thread until the block ends (and once more after)."""
    watch = CmdlineWatch(secret)
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            watch.scan()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        done.set()
        thread.join(timeout=30)
        watch.scan()
