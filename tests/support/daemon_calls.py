"""Small helpers of the daemon tests (tests/host/test_daemon_*.py): variants, image copies, mountpoints,
error replies, waiting for a process to exit."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbus_fast import Variant

from imgmount_testkit import images
from imgmount_testkit.client import Client, client
from imgmount_testkit.daemon import Daemon
from mountd.service.dbusapi import ERROR_PREFIX, MOUNT_IFACE

BIN = Path(sys.executable).parent
OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"


def v(signature: str, value: Any) -> Variant:
    return Variant(signature, value)


def copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def qcow2(src: Path, dst: Path) -> Path:
    images.convert(src, dst, "qcow2")
    dst.chmod(0o644)
    return dst


def mountpoint(c: Client, path: str) -> Path:
    return Path(c.prop(path, MOUNT_IFACE, "Volumes")[0][3])


def error(reply: Any, name: str) -> str:
    """Assert ``reply`` is the error ``name`` (short names are ours) and return its message."""
    full = name if "." in name else ERROR_PREFIX + name
    assert reply.error == full, f"expected {full}, got {reply.error}: {reply.body}"
    return str(reply.text)


def command(bus_address: str, *argv: str, user: list[str] | None = None, stdin: str | None = None,
            state_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of the commands against the bus at ``bus_address`` (as ``user``: a setpriv prefix); with
    ``state_dir``, in-process with that state directory."""
    env = {k: x for k, x in os.environ.items() if k != "IMGMOUNT_STATE_DIR"}
    env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    if state_dir is not None:
        env["IMGMOUNT_STATE_DIR"] = str(state_dir)
    return subprocess.run([*(user or []), str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=env, check=False, timeout=120, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@contextlib.contextmanager
def killed_and_restarted(daemon: Daemon) -> Iterator[tuple[Client, list[str]]]:
    """SIGKILL ``daemon`` and start it again; yield a client and the mounts, checked to be the same ones as
    before, republished and each verified "mounted"."""
    with client(daemon.bus.address) as c:
        paths = sorted(c.manager("ListMounts").value())
    assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    with client(daemon.bus.address) as c:
        assert sorted(c.manager("ListMounts").value()) == paths
        assert all(c.prop(p, MOUNT_IFACE, "State") == "mounted" for p in paths)
        yield c, paths


def wait_gone(pid: int) -> None:
    fd = os.pidfd_open(pid)
    try:
        assert select.select([fd], [], [], 30)[0], f"process {pid} did not exit"
    finally:
        os.close(fd)
