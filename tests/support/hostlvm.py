"""The host's own LVM event activation (Debian's 69-lvm.rules under the VM lane's real udevd), for tests that
start from it: wait for udev, and start and end as a freshly booted host would."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator

from imgmount_testkit import images


def settle() -> None:
    """Wait until udevd has handled every queued event, the LVM rule's vgchange included (bounded)."""
    images.run(["udevadm", "settle", "--timeout=60"])


#: How long a rule reload may be turned away while udevd is busy with another control client.
RELOAD_TIMEOUT = 60.0


def reload_rules() -> None:
    """``udevadm control --reload``, again while udevd turns the connection away: its control socket listens
    with a backlog of 0 and udevadm connects without blocking, so while another client (a settle's ping) waits
    for udevd's busy main loop, connecting fails with EAGAIN (systemd 252, udev-ctrl.c; seen in CI)."""
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        proc = subprocess.run(["udevadm", "control", "--reload"], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        if "temporarily unavailable" not in proc.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"udevadm control --reload failed ({proc.returncode}): {proc.stderr.strip()}")
        time.sleep(0.1)  # a retry's pause, not a wait for an event: udevd announces no free slot


@contextlib.contextmanager
def host_state_forgotten(vg: str) -> Iterator[None]:
    """Start as a freshly booted host would (LVM has not seen ``vg``), and leave no host activation behind."""
    images.forget_vg_online(vg)
    try:
        yield
    finally:
        settle()
        subprocess.run(["vgchange", "-q", "-an", vg], env={**os.environ, **images.LVM_ENV}, check=False,
                       capture_output=True)
        images.forget_vg_online(vg)
