"""Debian's polkitd on a private bus (:mod:`.bus`), for the daemon tests: in a mount namespace of its own
where our polkit actions and the test's JavaScript rules are bind-mounted over
``/usr/share/polkit-1/actions`` and ``/etc/polkit-1/rules.d``, so the host's polkit configuration is neither
read nor touched. Leaving :func:`polkitd`'s block stops it and waits for it to leave the bus.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from imgmount_testkit.bus import REPO, Bus, BusStartError, stop, world_dir
from imgmount_testkit.client import client

POLKIT_ACTIONS = REPO / "systemd" / "io.github.imgmount.policy"
POLKITD = "/usr/lib/polkit-1/polkitd"


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
                stop(proc)
                assert proc.stderr is not None
                raise BusStartError(f"polkitd did not start: {proc.stderr.read().strip()}") from None
        yield
    finally:
        stop(proc)
        with client(bus.address) as c:  # gone from the bus, so the next test sees no polkit
            c.wait_owner("org.freedesktop.PolicyKit1", owned=False)
        shutil.rmtree(home, ignore_errors=True)
