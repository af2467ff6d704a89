"""Callers of other uids, for the daemon tests: who may call, and what runs as whom.

- :func:`as_user`: the ``setpriv`` prefix that runs a command as another uid, e.g.
  :mod:`imgmount_testkit.busclient`; :class:`OtherUser` keeps such a client process for many calls.
- :func:`imgmount_group`: the group ``imgmount``, made for the test where the host has none.
- :func:`servers_of`: the qemu-storage-daemon processes running as a uid.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from imgmount_testkit.bus import REPO, TIMEOUT, Bus
from imgmount_testkit.client import Reply
from mountd.service.dbusapi import BUS_NAME, MANAGER_IFACE, MANAGER_PATH


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
        self.uid, self.gid, self.groups = uid, gid, tuple(groups)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={"PATH": os.environ["PATH"]})

    def call(self, path: str, interface: str, member: str, signature: str = "", *args: Any,
             files: Sequence[str] = ()) -> Reply:
        """A call; ``files``: opened by the client process (as its uid) and sent as the call's unix fds."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = json.dumps([path, interface, member, signature, list(args), list(files)])
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the client process of uid {self.uid} died"
        out = json.loads(line)
        return Reply(out["error"], out["body"])

    def mount(self, image: Path, files: Sequence[str] = (), /, **options: tuple[str, Any]) -> Reply:
        """``options``: the call's a{sv}, each as (signature, value); ``image`` and ``files`` are positional
        only, so every keyword (a ``**`` dict of option names, too) is an option."""
        return self.call(MANAGER_PATH, MANAGER_IFACE, "Mount", "sa{sv}", str(image), options, files=files)

    def inspect(self, image: Path) -> Reply:
        return self.call(MANAGER_PATH, MANAGER_IFACE, "Inspect", "sa{sv}", str(image), {})

    def unmount(self, path: str) -> Reply:
        return self.call(path, f"{BUS_NAME}.Mount", "Unmount", "a{sv}", {})

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


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
