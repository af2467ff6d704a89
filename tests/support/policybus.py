"""A private dbus-daemon that behaves like the system bus, and a real polkitd on it, for tests.

The bus applies the default policy of Debian's ``/usr/share/dbus-1/system.conf`` (nobody may own a name or
send a method call unless a policy file allows it), then includes the policy files it is given, and lists
the activation files of a service directory. Its socket is in a world-searchable directory so that callers
of other uids (``setpriv``) can connect. Every process started here is stopped by the context manager that
started it.
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
from pathlib import Path

POLKITD = "/usr/lib/polkit-1/polkitd"
START_TIMEOUT = 10.0

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  {servicedir}
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  {includes}
</busconfig>
"""

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


class BusStartError(RuntimeError):
    """A daemon did not come up; the message is its stderr."""


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _first_line(proc: subprocess.Popen[str], what: str) -> str:
    """The first line the process prints, waited for by readiness of its stdout, at most START_TIMEOUT."""
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=START_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        _stop(proc)
        raise BusStartError(f"{what} did not start: {proc.stderr.read().strip() or 'no output'}")
    return line.strip()


def _world_searchable_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def private_bus(includes: Sequence[Path], servicedir: Path | None = None) -> Iterator[str]:
    """Run a system-like bus that includes the policy files ``includes``; yields its address."""
    home = _world_searchable_dir("imgmount-bus-")
    conf = home / "bus.conf"
    conf.write_text(_CONFIG.format(
        socket=home / "socket",
        servicedir=f"<servicedir>{servicedir}</servicedir>" if servicedir else "",
        includes="\n  ".join(f"<include>{p}</include>" for p in includes)))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield _first_line(proc, "dbus-daemon")
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def name_owner(address: str, name: str, path: str, interfaces: Sequence[str]) -> Iterator[None]:
    """Own ``name`` as root on ``address`` and answer ``Ping() -> s`` on each of ``interfaces``."""
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, address, name, path, *interfaces],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _first_line(proc, f"the owner of {name}")
        yield
    finally:
        _stop(proc)


@contextlib.contextmanager
def polkitd(address: str, policies: Sequence[Path]) -> Iterator[None]:
    """Run the real polkitd on the bus at ``address``, knowing only the actions in ``policies``.

    polkitd reads its actions from a fixed directory, so it runs in a mount namespace of its own where a
    directory holding copies of ``policies`` is bind-mounted over it; the host's mounts are not touched.
    The bus must include polkit's own policy file, which lets user polkitd own org.freedesktop.PolicyKit1.
    """
    actions = _world_searchable_dir("imgmount-polkit-")
    for policy in policies:
        shutil.copy(policy, actions / policy.name)
        (actions / policy.name).chmod(0o644)
    script = f'mount --bind "$1" /usr/share/polkit-1/actions && exec {POLKITD} --no-debug'
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             str(actions)], env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        waited = subprocess.run(["gdbus", "wait", "--address", address, "--timeout", str(int(START_TIMEOUT)),
                                 "org.freedesktop.PolicyKit1"], capture_output=True, text=True, check=False)
        if waited.returncode != 0:
            _stop(proc)
            assert proc.stderr is not None
            raise BusStartError(f"polkitd did not start: {proc.stderr.read().strip() or waited.stderr}")
        yield
    finally:
        _stop(proc)
        shutil.rmtree(actions, ignore_errors=True)
