"""The host's own LVM event activation (Debian's 69-lvm.rules under the VM lane's real udevd), for tests that
start from it: wait for udev, and start and end as a freshly booted host would."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from imgmount_testkit import images


def settle() -> None:
    """Wait until udevd has handled every queued event, the LVM rule's vgchange included (bounded)."""
    images.run(["udevadm", "settle", "--timeout=60"])


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
