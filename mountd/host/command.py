"""The one place that runs external programs.

(Plain ``subprocess``, not the ``sh`` library: sh's timeout support costs ~100 ms per program, and a mount
runs tens of programs.)

Every program runs with a fixed environment (``LC_ALL=C``), no tty, a timeout, and is killed if the caller is
interrupted. A failure raises :class:`CommandError` carrying argv, exit status and the tail of stderr, so the
layers can translate it into a domain error where the meaning is known.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tty
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mountd.errors import CommandError, OperationTimeoutError, ToolMissingError
from mountd.host.programs import package_of

log = logging.getLogger(__name__)

BASE_ENV = {
    "LC_ALL": "C",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    # LVM: no udev synchronisation where no udevd runs (it would wait for ever), no fd-leak noise.
    "LVM_SUPPRESS_FD_WARNINGS": "1",
}

DEFAULT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    stdout: str
    stderr: str
    status: int = 0


def which(program: str) -> str:
    """Absolute path of ``program``, or :class:`ToolMissingError` naming the package to install."""
    found = shutil.which(program, path=BASE_ENV["PATH"])
    if found is None:
        raise ToolMissingError(program, package_of(program))
    return found


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    input_text: str | None = None,
    pass_fds: Sequence[int] = (),
    stdin_fd: int | None = None,
) -> Result:
    """Run ``argv`` to completion and return its output; raise :class:`CommandError` on failure.
    ``stdin_fd``: an open file for its standard input (a secret in a memfd: never in argv or our memory's
    copies more than needed)."""
    full_env = dict(BASE_ENV)
    if env:
        full_env.update(env)
    log.debug("run: %s", " ".join(argv))
    try:
        # subprocess.run kills and reaps the child on a timeout or any exception (KeyboardInterrupt too).
        proc = subprocess.run(
            [which(argv[0]), *argv[1:]],
            input=input_text.encode() if input_text is not None else None,
            stdin=None if input_text is not None else subprocess.DEVNULL if stdin_fd is None else stdin_fd,
            capture_output=True,
            env=full_env,
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except subprocess.TimeoutExpired:
        raise OperationTimeoutError(f"{argv[0]} did not finish within {timeout:g} s") from None
    result = Result(tuple(argv), _text(proc.stdout), _text(proc.stderr), proc.returncode)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, result.stderr)
    return result


def run_typing(argv: Sequence[str], typed: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Run ``argv`` (not checked) with a pseudo-terminal of its own as its controlling terminal and standard
    input, ``typed`` already waiting there: for a program that reads a secret only from ``/dev/tty``. The
    terminal is raw (no echo, no line editing), so nothing typed comes back; only this process holds its
    master side, and the secret is in no command line."""
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        os.write(master, typed)
        # setsid makes the program a session leader; --ctty makes its standard input (the slave) its terminal.
        return run(["setsid", "--ctty", *argv], stdin_fd=slave, timeout=timeout, check=False)
    finally:
        os.close(slave)
        os.close(master)


def _text(data: bytes | str) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def have(program: str) -> bool:
    return shutil.which(program, path=BASE_ENV["PATH"]) is not None


def is_root() -> bool:
    return os.geteuid() == 0
