"""Real QEMU virtual machines holding image files, for tests of "who holds this image".

A VM here is ``qemu-system-x86_64 -machine pc -S``: a paused PC whose every drive is attached to a
virtio-blk device. The device matters: a drive with no device (``-machine none``) never asks for the write
permission, so QEMU opens a raw image O_RDONLY and locks byte 100 only, unlike any real VM. Paused (``-S``), it
runs no guest code and starts in about 0.1 s.

Readiness is an event, not a sleep: we listen on the QMP socket and QEMU connects to it as a client; QEMU
dispatches QMP commands from its main loop only, which starts after every drive is open and every device is
realized, so the answer to a command means the images are open and locked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
TIMEOUT = 30.0


@dataclass(frozen=True)
class Vm:
    pid: int
    argv: tuple[str, ...]


@contextlib.contextmanager
def running_vm(*drives: str, timeout: float = TIMEOUT) -> Iterator[Vm]:
    """A paused VM with one virtio-blk device per ``-drive`` spec (``file=IMG,format=raw[,readonly=on]``),
    yielded once QEMU answers on QMP; killed (and reaped) on exit, whatever happens."""
    with tempfile.TemporaryDirectory(prefix="vm-") as tmp:
        sock_path = os.path.join(tmp, "qmp.sock")
        argv = [QEMU, "-machine", "pc,accel=tcg", "-S", "-nodefaults", "-display", "none", "-m", "16",
                "-qmp", f"unix:{sock_path}"]
        for i, drive in enumerate(drives):
            argv += ["-drive", f"{drive},if=none,id=d{i}", "-device", f"virtio-blk-pci,drive=d{i}"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
                open(os.path.join(tmp, "stderr"), "w+b") as err:
            listener.bind(sock_path)
            listener.listen(1)
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            try:
                try:
                    _wait_ready(proc, listener, timeout)
                except (OSError, ValueError, RuntimeError) as exc:
                    proc.kill()
                    proc.wait(timeout=timeout)
                    err.seek(0)
                    raise RuntimeError(f"{QEMU} did not start ({exc}): "
                                       f"{err.read().decode(errors='replace').strip()}") from None
                yield Vm(proc.pid, tuple(argv))
            finally:
                proc.kill()
                proc.wait(timeout=timeout)


def _wait_ready(proc: subprocess.Popen[bytes], listener: socket.socket, timeout: float) -> None:
    pidfd = os.pidfd_open(proc.pid)  # readable when QEMU exits: no waiting out the timeout for a dead QEMU
    try:
        ready, _, _ = select.select([listener.fileno(), pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if listener.fileno() not in ready:
        raise RuntimeError("exited" if ready else f"no QMP connection within {timeout:g} s")
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(timeout)
        stream = conn.makefile("rwb")
        _message(stream)  # the greeting
        for command in ("qmp_capabilities", "query-status"):
            stream.write(json.dumps({"execute": command}).encode() + b"\n")
            stream.flush()
            answer = _message(stream)
            if "return" not in answer:
                raise RuntimeError(f"{QEMU} refused {command}: {answer}")


def _message(stream: io.BufferedIOBase) -> dict[str, Any]:
    """The next QMP message that is not an asynchronous event."""
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"{QEMU} closed its QMP connection")
        message: dict[str, Any] = json.loads(line)
        if "event" not in message:
            return message


@dataclass(frozen=True)
class Opener:
    pid: int


@contextlib.contextmanager
def process_holding(path: Path, flags: Sequence[str] = ("O_RDWR",), timeout: float = TIMEOUT) -> Iterator[Opener]:
    """A plain ``python3`` process with ``path`` open (``os.open`` with ``flags``), no locks; yielded once it
    says so on stdout. It exits when its stdin closes."""
    code = ("import os, sys; fd = os.open(sys.argv[1], " + " | ".join(f"os.{f}" for f in flags) + ")\n"
            "print('open', flush=True); sys.stdin.read()")
    proc = subprocess.Popen(["python3", "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()  # a line, or EOF if it died: either way no waiting beyond that
        if line.strip() != b"open":
            raise RuntimeError(f"python3 could not open {path}")
        yield Opener(proc.pid)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
