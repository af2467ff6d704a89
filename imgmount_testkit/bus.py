"""A private system-like bus for the daemon tests: ``dbus-daemon`` with ``system-bus.conf`` beside this file.

- :func:`private_bus`: the system bus's default policy plus the policy files it is given (by default the
  checkout's; polkit's own always), its socket in a world-searchable directory so callers of other uids can
  connect, listing the activation files of a service directory. A configuration dbus-daemon refuses is a
  :class:`BusStartError` naming why.
- :func:`name_owner`: a stand-in owner of a bus name as root, to see what the bus policy lets through.
- :func:`stop`: ends a process of the bus (also polkitd's, :mod:`.polkit`).

Every process started here is stopped by the context manager that started it.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mountd.service.dbusapi import BUS_NAME

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).with_name("system-bus.conf")
POLICY = REPO / "systemd" / f"{BUS_NAME}.conf"
# How long a test waits for one step (a reply, a process's first line). Under the VM lane's software
# emulation, Python runs 50-100 times slower than here (a daemon import: 0.25 s here, 15-20 s there).
SLOWDOWN = 6 if os.environ.get("IMGMOUNT_VM_LANE") else 1
TIMEOUT = 20.0 * SLOWDOWN


def world_dir(prefix: str) -> Path:
    """A fresh directory that every uid may enter (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@dataclass(frozen=True)
class Bus:
    address: str
    home: Path  # world-searchable; holds the socket and services/


class BusStartError(RuntimeError):
    """A process of the bus (dbus-daemon, polkitd, a name owner) did not come up; the message says why."""


@contextlib.contextmanager
def private_bus(includes: Sequence[Path] = (POLICY,), servicedir: Path | None = None) -> Iterator[Bus]:
    """A system-like bus with the policy files ``includes`` and the activation files of ``servicedir``
    (default: ``home/services``, empty)."""
    home = world_dir("imgmount-bus-")
    (home / "services").mkdir()
    conf = home / "bus.conf"
    conf.write_text(CONFIG.read_text()
                    .replace("@BUSDIR@", str(home))
                    .replace("@SERVICEDIR@", str(servicedir or home / "services"))
                    .replace("@INCLUDES@", "\n  ".join(f"<include>{p}</include>" for p in includes)))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield Bus(_first_line(proc, "dbus-daemon"), home)
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def _first_line(proc: subprocess.Popen[str], what: str) -> str:
    """The first line ``proc`` prints once it is ready, waited for at most TIMEOUT; else it is stopped."""
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        stop(proc)
        raise BusStartError(f"{what} did not start: {proc.stderr.read().strip() or 'no output'}")
    return line.strip()


def stop(proc: subprocess.Popen[Any]) -> None:
    """End ``proc`` if it still runs: SIGTERM, then SIGKILL after TIMEOUT."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Owns a bus name as root and answers on one object, so that tests can see what the bus policy lets
# through to it. dbus-fast adds Introspectable, Properties, Peer and ObjectManager by itself.
_OWNER = """
import asyncio, sys
from dbus_fast.aio import MessageBus
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

address, name, path, interfaces = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

def make(iface):
    class Answering(ServiceInterface):
        @method()
        def Ping(self) -> 's':
            return iface

        @dbus_property(access=PropertyAccess.READ)
        def Version(self) -> 's':
            return '0'
    return Answering(iface)

async def main():
    bus = await MessageBus(bus_address=address).connect()
    for iface in interfaces:
        bus.export(path, make(iface))
    await bus.request_name(name)
    print('ready', flush=True)
    await bus.wait_for_disconnect()

asyncio.run(main())
"""


@contextlib.contextmanager
def name_owner(bus: Bus, name: str, path: str, interfaces: Sequence[str]) -> Iterator[None]:
    """Own ``name`` as root on ``bus`` and answer ``Ping() -> s`` on each of ``interfaces`` at ``path``."""
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, bus.address, name, path, *interfaces],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _first_line(proc, f"the owner of {name}")
        yield
    finally:
        stop(proc)
