"""The real ``imgmountd`` on a private bus (:mod:`.bus`), as the daemon tests run it.

- :class:`Daemon`: the executable beside this interpreter with a state directory of its own; started,
  killed, stopped and restarted like systemd would; whatever it leaves mounted is cleaned up in-process.
- :func:`tmpfs`: a tmpfs for state directories, as /run is.
- :func:`serving`: a private bus, the daemon on it and a client, all ended after.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imgmount_testkit.bus import Bus, private_bus
from imgmount_testkit.client import Client, client
from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.service.dbusapi import BUS_NAME

BIN = Path(sys.executable).parent
# Importing the daemon takes 0.2 s here and 12-18 s in the VM lane (software emulation, a cold 9p root): the
# start is bounded by this, not by a call's TIMEOUT.
START_TIMEOUT = 120.0


@contextlib.contextmanager
def tmpfs() -> Iterator[Path]:
    """A tmpfs of our own, for state directories: /run/imgmount is a tmpfs, where the journal's fsyncs cost
    nothing (on this machine's disk, they would be most of a test's time). Not /dev/shm: the engine takes
    paths under /dev/ for device nodes."""
    path = Path(tempfile.mkdtemp(prefix="imgmount-run-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "imgmount-test", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


class Daemon:
    """``imgmountd --bus ADDRESS`` with a state directory of its own under ``run`` (a tmpfs, as /run is);
    the log is kept in a file next to it."""

    def __init__(self, bus: Bus, run: Path, *, debug: bool = False, **extra_env: str) -> None:
        self.bus = bus
        self.debug = debug  # log every command line (imgmountd --debug)
        self.extra_env = extra_env
        self.home = Path(tempfile.mkdtemp(prefix="imgmountd-", dir=run))
        self.state = self.home / "state"
        self.logfile = self.home / "imgmountd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.status: int | None = None  # once it has exited

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "IMGMOUNT_STATE_DIR": str(self.state), **self.extra_env}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        with open(self.logfile, "ab") as log:
            argv = [str(BIN / "imgmountd"), "--bus", self.bus.address, *(["--debug"] if self.debug else [])]
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log)
        with client(self.bus.address) as c:
            try:
                ready = c.wait_owner(BUS_NAME, timeout=START_TIMEOUT, unless_exits=self.pid)
            except TimeoutError:
                ready = False
        if not ready:
            printed = self.log()
            self.close()  # else its state directory, on the caller's tmpfs, stays busy
            status = self.exit_status
            why = (f"exited (status {status}) before taking its name" if status is not None
                   else f"did not take its name within {START_TIMEOUT:.0f} s")
            raise RuntimeError(f"imgmountd {why}:\n{printed}")
        return self

    @property
    def exit_status(self) -> int | None:
        return self.proc.poll() if self.proc is not None else self.status

    def signal(self, signum: int) -> int:
        """Send ``signum`` and wait for the daemon to exit; its exit status (negative: killed)."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.wait()

    def wait(self, timeout: float = 120) -> int:
        """Wait for the daemon to exit (a signal sent already); its exit status (negative: killed)."""
        assert self.proc is not None
        self.status = self.proc.wait(timeout=timeout)
        self.proc = None
        return self.status

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def memory_kib(self, field: str = "VmRSS") -> int:
        """The daemon's resident memory now (``VmRSS``), or its peak so far (``VmHWM``), in KiB."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:")))

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def holds(self, path: Path) -> list[int]:
        """The daemon's descriptors open on the file ``path`` (compared by device and inode)."""
        want = os.stat(path)
        found = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                st = os.stat(f"/proc/{self.pid}/fd/{name}")
                if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                    found.append(int(name))
        return found

    def close(self, *, quiet: bool = False) -> None:
        """Stop the daemon (SIGTERM unmounts everything); whatever is still recorded is undone in-process.
        Its log is printed for pytest (shown when the test failed), unless ``quiet``."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        engine = Engine(Journal(str(self.state)))
        for m in engine.mounts():
            with contextlib.suppress(Exception):
                engine.unmount(m.id, force=True)
        if not quiet:
            print(self.log())
        shutil.rmtree(self.home, ignore_errors=True)


@contextlib.contextmanager
def serving(run: Path) -> Iterator[tuple[Bus, Daemon, Client]]:
    """A private bus, the real daemon on it (its state under ``run``) and a client, all ended after."""
    with private_bus() as bus:
        daemon = Daemon(bus, run).start()
        try:
            with client(bus.address) as cl:
                yield bus, daemon, cl
        finally:
            daemon.close()
