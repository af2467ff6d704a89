"""Starting ``qemu-nbd --fork``: judged by its pid file and the live server, not by its exit status.

qemu-nbd's parent copies whatever the forked server prints on stderr while it sets up, and then exits 1 if
that was anything at all, although the server runs (qemu-nbd.c: ``exit(errors)``). Debian 12's QEMU prints
"module block-block-dmg-bz2 not found" (and ``-lzfse``) on every DMG open, because those optional modules
are not built, so every DMG failed. The server writes its pid file only once it has opened the image, listens
on its socket and has set up its export, and it keeps the pid file open while it runs: a live process that
holds the pid file is a server that is up, whatever the exit status says. Its warnings go to the log.

(``qemu-storage-daemon --daemonize`` needs none of this: its parent exits with the status the daemon reports,
not by what it printed.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from mountd.errors import CommandError
from mountd.host import command
from mountd.host.processes import proc_state

log = logging.getLogger(__name__)

#: A line QEMU prints when an optional module is not installed: a warning, never the cause of a failure.
MISSING_MODULE = re.compile(r"^(\S+: )?module \S+ not found\b.*$", re.MULTILINE)


def run_forked(argv: Sequence[str], pid_file: str | Path, *, timeout: float,
               pass_fds: Sequence[int] = ()) -> command.Result:
    """Run ``qemu-nbd --fork ... --pid-file pid_file``; fail only if no server holds ``pid_file``.

    A real failure raises :class:`CommandError` whose stderr is QEMU's without the missing-module lines, so
    that its last line names the cause.
    """
    result = command.run(argv, timeout=timeout, check=False, pass_fds=pass_fds)
    pid = serving_pid(pid_file)
    if result.status != 0 and pid is None:
        raise CommandError(argv, result.status, without_module_warnings(result.stderr))
    report_output(f"{argv[0]} (pid {pid})", result.stderr)
    return result


def report_output(server: str, stderr: str) -> None:
    """Log what a server that started said on stderr: a missing optional module (routine on Debian) at INFO,
    anything else at WARNING."""
    if stderr.strip():
        level = logging.WARNING if without_module_warnings(stderr) else logging.INFO
        log.log(level, "%s started, and said: %s", server, " | ".join(stderr.strip().splitlines()[-6:]))


def without_module_warnings(stderr: str) -> str:
    return MISSING_MODULE.sub("", stderr).strip()


def serving_pid(pid_file: str | Path) -> int | None:
    """The pid the pid file names, if that process runs and holds the file open (so it is the server that
    wrote it, not a process that reused its pid)."""
    try:
        pid = int(Path(pid_file).read_text().strip())
    except (OSError, ValueError):
        return None
    found = proc_state(pid) if pid > 0 else None
    if found is None or found.state in ("Z", "X") or not holds_open(pid, str(pid_file)):
        return None
    return pid


def holds_open(pid: int, path: str) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd_dir / fd) == path for fd in os.listdir(fd_dir))
    return False
