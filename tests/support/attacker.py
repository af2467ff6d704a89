"""A local attacker for the privilege-boundary tests: a process of the attacker's uid (``setpriv``) that
watches her own directory with inotify and changes her own files at the moment the daemon opens them.

    python -m tests.support.attacker

Everything it does to the file system it does with its own credentials, as a real attacker would: it can
only rename, link, write and make what the attacker may. The test drives it with one JSON request per line on
stdin and reads one JSON answer per line on stdout:

- ``{"op": "do", "steps": [STEP, ...]}``: do the steps now; answer ``{"ok": true}`` (or the error).
- ``{"op": "arm", "watch": DIR, "name": NAME, "k": K, "steps": [STEP, ...]}``: watch ``DIR`` with inotify;
  answer ``{"ok": true}`` once the watch is in place (the test makes its call only then); after the K-th
  ``IN_OPEN`` event on ``NAME`` in ``DIR``, do the steps at once (K = 0: never, a dry run that only counts).
- ``{"op": "stop"}``: stop watching; answer what was seen: ``opens`` (``IN_OPEN`` events on ``NAME``, the
  attacker's own opens not counted), ``fired`` (the steps were done), ``events`` (the event names in order).

A STEP is a list: ``["rename", src, dst]`` (rename(2): atomically replaces ``dst``), ``["exchange", a, b]``
(renameat2 ``RENAME_EXCHANGE``: swaps two names atomically, a directory for a symlink too), ``["symlink",
target, path]``, ``["link", src, dst]``, ``["unlink", path]``, ``["mkfifo", path]``, ``["mkdir", path]``,
``["overwrite", path, src]`` (the bytes of ``src`` written over ``path`` in place, ``path`` truncated to
their length: the same inode, a new header) and ``["chmod", path, mode]``. For ``overwrite`` in ``arm``, the
new bytes are read when arming, so firing is one open, one pwrite, one ftruncate.

No sleeps: the process waits in ``select`` on stdin and the inotify descriptor together.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import select
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_OPEN | IN_CLOSE_NOWRITE | IN_CLOSE_WRITE | IN_MODIFY | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE \
    | IN_DELETE
EVENT_NAMES = {IN_OPEN: "OPEN", IN_CLOSE_NOWRITE: "CLOSE_NOWRITE", IN_CLOSE_WRITE: "CLOSE_WRITE",
               IN_MODIFY: "MODIFY", IN_MOVED_FROM: "MOVED_FROM", IN_MOVED_TO: "MOVED_TO", IN_CREATE: "CREATE",
               IN_DELETE: "DELETE", IN_IGNORED: "IGNORED"}
EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len
AT_FDCWD = -100
RENAME_EXCHANGE = 2
MAX_EVENTS_KEPT = 200

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def renameat2_exchange(a: str, b: str) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE),
           f"renameat2({a}, {b}, RENAME_EXCHANGE)")


class Inotify:
    """A minimal inotify watcher (ctypes: inotify_init1, inotify_add_watch; events parsed from read)."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def add(self, path: str, mask: int = WATCH_MASK) -> int:
        return _check(_libc.inotify_add_watch(self.fd, os.fsencode(path), mask), f"inotify_add_watch({path})")

    def read(self) -> list[tuple[int, str]]:
        """The events queued now (mask, name), without waiting."""
        out: list[tuple[int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            pos = 0
            while pos + EVENT_HEADER.size <= len(data):
                _wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, pos)
                raw = data[pos + EVENT_HEADER.size: pos + EVENT_HEADER.size + length]
                out.append((mask, os.fsdecode(raw.split(b"\0", 1)[0])))
                pos += EVENT_HEADER.size + length

    def close(self) -> None:
        os.close(self.fd)


def _overwrite(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def prepare(step: Sequence[Any]) -> Callable[[], None]:
    """A step as a call with everything read in advance (so doing it is as quick as a syscall or three)."""
    kind, *args = step
    if kind == "rename":
        return lambda: os.rename(args[0], args[1])
    if kind == "exchange":
        return lambda: renameat2_exchange(args[0], args[1])
    if kind == "symlink":
        return lambda: os.symlink(args[0], args[1])
    if kind == "link":
        return lambda: os.link(args[0], args[1])
    if kind == "unlink":
        return lambda: os.unlink(args[0])
    if kind == "mkfifo":
        return lambda: os.mkfifo(args[0], 0o644)
    if kind == "mkdir":
        return lambda: os.mkdir(args[0], 0o755)
    if kind == "chmod":
        return lambda: os.chmod(args[0], int(args[1]), follow_symlinks=False)
    if kind == "overwrite":
        data = Path(args[1]).read_bytes()
        return lambda: _overwrite(args[0], data)
    raise ValueError(f"unknown step {kind!r}")


def opens_of_step(step: Sequence[Any], name: str) -> int:
    """How many IN_OPEN events on ``name`` doing ``step`` causes itself (overwrite opens its target)."""
    return 1 if step[0] == "overwrite" and os.path.basename(step[1]) == name else 0


class Session:
    def __init__(self) -> None:
        self.watcher: Inotify | None = None
        self.name = ""
        self.k = 0
        self.steps: list[Callable[[], None]] = []
        self.own_opens = 0
        self.opens = 0
        self.fired = False
        self.fire_error: str | None = None
        self.events: list[str] = []

    def arm(self, watch: str, name: str, k: int, steps: list[list[Any]]) -> None:
        self.disarm()
        self.name, self.k = name, k
        self.steps = [prepare(s) for s in steps]
        self.own_opens = sum(opens_of_step(s, name) for s in steps)
        self.opens, self.fired, self.fire_error, self.events = 0, False, None, []
        self.watcher = Inotify()
        self.watcher.add(watch)

    def on_events(self) -> None:
        assert self.watcher is not None
        for mask, name in self.watcher.read():
            if len(self.events) < MAX_EVENTS_KEPT:
                kinds = [n for bit, n in EVENT_NAMES.items() if mask & bit]
                self.events.append(f"{'|'.join(kinds)} {name}")
            if name != self.name or not mask & IN_OPEN:
                continue
            self.opens += 1
            if self.opens == self.k and not self.fired:
                self.fire()

    def fire(self) -> None:
        self.fired = True
        try:
            for step in self.steps:
                step()
        except OSError as exc:
            self.fire_error = str(exc)

    def stop(self) -> dict[str, Any]:
        if self.watcher is not None:
            self.on_events()  # whatever is queued still counts
        opens = self.opens - (self.own_opens if self.fired else 0)
        result = {"opens": opens, "fired": self.fired, "fire_error": self.fire_error, "events": self.events}
        self.disarm()
        return result

    def disarm(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None


def _answer(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _handle(session: Session, request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "do":
        for step in request["steps"]:
            prepare(step)()
        return {"ok": True}
    if op == "arm":
        session.arm(request["watch"], request["name"], int(request["k"]), request["steps"])
        return {"ok": True}
    if op == "stop":
        return session.stop()
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    session = Session()
    pending = b""
    while True:
        fds = [0] + ([session.watcher.fd] if session.watcher is not None else [])
        ready, _, _ = select.select(fds, [], [])
        if session.watcher is not None and session.watcher.fd in ready:
            session.on_events()
        if 0 not in ready:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                answer = _handle(session, json.loads(line))
            except (OSError, ValueError, KeyError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _answer(answer)


# --- the test's side ----------------------------------------------------------------------------------------


class Attacker:
    """The attacker process, started with ``prefix`` (e.g. :func:`imgmount_testkit.users.as_user`)."""

    def __init__(self, prefix: Sequence[str], cwd: Path) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "tests.support.attacker"], cwd=cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={"PATH": os.environ["PATH"]})

    def _request(self, **request: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request, default=str) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the attacker process died"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, f"the attacker could not {request['op']}: {answer['error']}"
        return answer

    def do(self, *steps: Sequence[Any]) -> None:
        self._request(op="do", steps=[list(s) for s in steps])

    def arm(self, watch: Path | str, name: str, k: int, *steps: Sequence[Any]) -> None:
        self._request(op="arm", watch=str(watch), name=name, k=k, steps=[list(s) for s in steps])

    def stop(self) -> dict[str, Any]:
        return self._request(op="stop")

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(timeout=20)


if __name__ == "__main__":
    main()
