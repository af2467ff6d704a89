"""A private system-like bus, the real imgmountd on it, real clients and a real polkitd, for the daemon tests.

- :func:`private_bus`: ``dbus-daemon`` with ``system-bus.conf`` beside this file (the system bus's default
  policy plus the policy files it is given: by default the checkout's; polkit's own always), its socket in a
  world-searchable directory so callers of other uids can connect, listing the activation files of a service
  directory. A configuration dbus-daemon refuses is a :class:`BusStartError` naming why.
- :class:`Daemon`: the ``imgmountd`` executable on that bus with a state directory of its own; started,
  killed, stopped and restarted like systemd would; whatever it leaves mounted is cleaned up in-process.
- :class:`Client`: a blocking dbus-fast client that also records the signals the daemon emits.
- :func:`polkitd`: Debian's polkitd on the bus, in a mount namespace of its own where our polkit actions and
  the test's JavaScript rules are bind-mounted over ``/usr/share/polkit-1/actions`` and
  ``/etc/polkit-1/rules.d``, so the host's polkit configuration is neither read nor touched.
- :func:`name_owner`: a stand-in owner of a bus name as root, to see what the bus policy lets through.
- :func:`as_user`: run a command as another uid (``setpriv``), e.g. :mod:`imgmount_testkit.busclient`.

Every process started here is stopped by the context manager or the ``close`` that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from mountd.engine.engine import Engine
from mountd.engine.journal import Journal
from mountd.service.dbusapi import BUS_NAME, MANAGER_IFACE, MANAGER_PATH

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = Path(__file__).with_name("system-bus.conf")
POLICY = REPO / "systemd" / f"{BUS_NAME}.conf"
POLKIT_ACTIONS = REPO / "systemd" / "io.github.imgmount.policy"
POLKITD = "/usr/lib/polkit-1/polkitd"
TIMEOUT = 20.0


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
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def _first_line(proc: subprocess.Popen[str], what: str) -> str:
    """The first line ``proc`` prints once it is ready, waited for at most TIMEOUT; else it is stopped."""
    assert proc.stdout is not None and proc.stderr is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if not line:
        _stop(proc)
        raise BusStartError(f"{what} did not start: {proc.stderr.read().strip() or 'no output'}")
    return line.strip()


def _stop(proc: subprocess.Popen[Any]) -> None:
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
        _stop(proc)


# --- clients ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    error: str | None  # the D-Bus error name
    body: list[Any]

    @property
    def text(self) -> str:
        return str(self.body[0]) if self.error and self.body else ""

    def value(self) -> Any:
        assert self.error is None, f"{self.error}: {self.text}"
        return self.body[0] if self.body else None


def reply_of(msg: Message | None) -> Reply:
    assert msg is not None
    return Reply(msg.error_name if msg.message_type is MessageType.ERROR else None, list(msg.body))


def call_message(path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = (),
                 fds: Sequence[int] = ()) -> Message:
    return Message(destination=BUS_NAME, path=path, interface=interface, member=member, signature=signature,
                   body=list(body), unix_fds=list(fds))


async def connect(address: str) -> MessageBus:
    """A client connection (dbus-fast wants a running loop already to make one)."""
    return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()


@dataclass
class Client:
    """A blocking client on its own event loop; ``signals`` collects what the daemon emits."""

    address: str
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    signals: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bus: MessageBus = self.run(connect(self.address))
        self.bus.add_message_handler(self._on_message)
        self._waiters: list[tuple[Callable[[Message], bool], asyncio.Future[Message]]] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()

    def call(self, path: str, interface: str, member: str, signature: str = "", body: Sequence[Any] = (),
             fds: Sequence[int] = ()) -> Reply:
        return reply_of(self.run(self.bus.call(call_message(path, interface, member, signature, body, fds))))

    def manager(self, member: str, signature: str = "", *body: Any) -> Reply:
        return self.call(MANAGER_PATH, MANAGER_IFACE, member, signature, body)

    def mount(self, image: str | Path, **options: Variant) -> Reply:
        return self.manager("Mount", "sa{sv}", str(image), options)

    def props(self, path: str, interface: str) -> dict[str, Any]:
        found = self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface]).value()
        return {k: v.value for k, v in found.items()}

    def prop(self, path: str, interface: str, name: str) -> Any:
        found = self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name]).value()
        return found.value

    def driver(self, member: str, signature: str = "", *body: Any) -> Any:
        msg = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                      interface="org.freedesktop.DBus", member=member, signature=signature, body=list(body))
        return reply_of(self.run(self.bus.call(msg))).value()

    def watch(self) -> None:
        """Record every signal the daemon sends from now on."""
        self.driver("AddMatch", "s", f"type='signal',sender='{BUS_NAME}'")

    def wait_signal(self, match: Callable[[Message], bool]) -> Message:
        """The first recorded signal that ``match``es, waiting for it if it has not come yet."""
        for msg in self.signals:
            if match(msg):
                return msg
        future: asyncio.Future[Message] = self.loop.create_future()
        self._waiters.append((match, future))
        result: Message = self.run(future)
        return result

    def wait_owner(self, name: str, *, owned: bool = True) -> None:
        """Until ``name`` has an owner (or none): the readiness systemd's Type=dbus waits for."""
        self.driver("AddMatch", "s", f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',"
                                     f"arg0='{name}'")
        if bool(self.driver("NameHasOwner", "s", name)) == owned:
            return
        future: asyncio.Future[Message] = self.loop.create_future()
        self._waiters.append((lambda m: m.member == "NameOwnerChanged" and bool(m.body[2]) == owned, future))
        self.run(future)

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        self.signals.append(msg)
        for match, future in list(self._waiters):
            if not future.done() and match(msg):
                future.set_result(msg)
                self._waiters.remove((match, future))


@contextlib.contextmanager
def client(address: str) -> Iterator[Client]:
    c = Client(address)
    try:
        yield c
    finally:
        c.close()


# --- the daemon -------------------------------------------------------------------------------------------


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

    def __init__(self, bus: Bus, run: Path, **extra_env: str) -> None:
        self.bus = bus
        self.extra_env = extra_env
        self.home = Path(tempfile.mkdtemp(prefix="imgmountd-", dir=run))
        self.state = self.home / "state"
        self.logfile = self.home / "imgmountd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "IMGMOUNT_STATE_DIR": str(self.state), **self.extra_env}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "imgmountd"), "--bus", self.bus.address], env=self.env,
                                         stdout=log, stderr=log)
        with client(self.bus.address) as c:
            try:
                c.wait_owner(BUS_NAME)
            except TimeoutError:
                raise RuntimeError(f"imgmountd did not take its name:\n{self.log()}") from None
        return self

    def signal(self, signum: int) -> int:
        """Send ``signum`` and wait for the daemon to exit; its exit status (negative: killed)."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        status = self.proc.wait(timeout=120)
        self.proc = None
        return status

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def close(self) -> None:
        """Stop the daemon (SIGTERM unmounts everything); whatever is still recorded is undone in-process."""
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        engine = Engine(Journal(str(self.state)))
        for m in engine.mounts():
            with contextlib.suppress(Exception):
                engine.unmount(m.id, force=True)
        print(self.log())  # pytest shows it when the test failed
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


# --- other users and polkit ---------------------------------------------------------------------------


def as_user(uid: int, gid: int, groups: Sequence[int] = ()) -> list[str]:
    """The ``setpriv`` prefix that runs a command as ``uid``/``gid`` with exactly ``groups`` besides."""
    extra = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", *extra]


SPARE_GID = 64999  # for the group imgmount where /etc cannot change


class OtherUser:
    """A client process of another uid (:mod:`imgmount_testkit.busclient` under ``setpriv``), kept for many
    calls; ``close`` ends it."""

    def __init__(self, bus: Bus, uid: int, gid: int, groups: Sequence[int] = ()) -> None:
        argv = [*as_user(uid, gid, groups), sys.executable, "-m", "imgmount_testkit.busclient", bus.address]
        self.uid = uid
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={"PATH": os.environ["PATH"]})

    def call(self, path: str, interface: str, member: str, signature: str = "", *args: Any) -> Reply:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([path, interface, member, signature, list(args)]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the client process of uid {self.uid} died"
        out = json.loads(line)
        return Reply(out["error"], out["body"])

    def mount(self, image: Path, **options: tuple[str, Any]) -> Reply:
        return self.call(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", str(image), options)

    def inspect(self, image: Path) -> Reply:
        return self.call(MANAGER_PATH, MANAGER_IFACE, "Inspect", "sa{sv}", str(image), {})

    def unmount(self, path: str) -> Reply:
        return self.call(path, f"{BUS_NAME}.Mount", "Unmount", "a{sv}", {})

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


@contextlib.contextmanager
def polkitd(bus: Bus, rules: str = "", actions: Sequence[Path] = (POLKIT_ACTIONS,)) -> Iterator[None]:
    """polkitd on ``bus`` knowing only the polkit ``actions`` files and ``rules`` (JavaScript), in a private
    mount namespace. The bus must include polkit's own policy file (``private_bus`` always does)."""
    home = world_dir("imgmount-polkit-")
    (home / "actions").mkdir(mode=0o755)
    (home / "rules").mkdir(mode=0o755)
    for policy in actions:
        shutil.copy(policy, home / "actions" / policy.name)
    if rules:
        (home / "rules" / "50-imgmount-test.rules").write_text(rules)
    for f in [*(home / "actions").iterdir(), *(home / "rules").iterdir()]:
        f.chmod(0o644)
    script = ('mount --bind "$1/actions" /usr/share/polkit-1/actions && '
              'mount --bind "$1/rules" /etc/polkit-1/rules.d && exec "$2" --no-debug')
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                             str(home), POLKITD], env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with client(bus.address) as c:
            try:
                c.wait_owner("org.freedesktop.PolicyKit1")
            except TimeoutError:
                _stop(proc)
                assert proc.stderr is not None
                raise BusStartError(f"polkitd did not start: {proc.stderr.read().strip()}") from None
        yield
    finally:
        _stop(proc)
        with client(bus.address) as c:  # gone from the bus, so the next test sees no polkit
            c.wait_owner("org.freedesktop.PolicyKit1", owned=False)
        shutil.rmtree(home, ignore_errors=True)


def servers_of(uid: int) -> list[dict[str, str]]:
    """The qemu-storage-daemon processes running as ``uid`` (not zombies: where pid 1 never reaps, an orphan
    that has exited stays one): their /proc status lines."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            status = dict(x.split(":\t", 1) for x in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":\t" in x)
        except OSError:
            continue
        if comm == "qemu-storage-da" and status["Uid"].split()[0] == str(uid) and status["State"][0] != "Z":
            found.append(status)
    return found


@contextlib.contextmanager
def imgmount_group() -> Iterator[int]:
    """The group ``imgmount``, whose members may call the daemon where no polkitd runs: the host's, else one
    made for the block and removed after. Where /etc is read-only (the VM lane shares the host's root), a
    copy of /etc/group with the group is bind-mounted over it instead."""
    try:
        yield grp.getgrnam("imgmount").gr_gid
        return
    except KeyError:
        pass
    if os.access("/etc/group", os.W_OK) and subprocess.run(
            ["groupadd", "--system", "imgmount"], capture_output=True, check=False).returncode == 0:
        try:
            yield grp.getgrnam("imgmount").gr_gid
        finally:
            subprocess.run(["groupdel", "imgmount"], check=True, capture_output=True)
        return
    with tempfile.TemporaryDirectory(prefix="imgmount-group-") as tmp:
        copy = Path(tmp) / "group"
        copy.write_text(Path("/etc/group").read_text() + f"imgmount:x:{SPARE_GID}:\n")
        subprocess.run(["mount", "--bind", str(copy), "/etc/group"], check=True)
        try:
            yield SPARE_GID
        finally:
            subprocess.run(["umount", "/etc/group"], check=True)
