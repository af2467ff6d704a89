"""Run a command with ``imgmountd`` serving on a private system-like bus (for scripts/demo where systemd is
not PID 1): the real daemon, the real bus policy, D-Bus activation not needed. The command sees the bus as
``DBUS_SYSTEM_BUS_ADDRESS``; the daemon gets SIGTERM afterwards (unmounting anything still mounted)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from imgmount_testkit.bus import private_bus
from imgmount_testkit.daemon import Daemon


def main(argv: list[str]) -> int:
    run = Path("/run/imgmount-demo")
    run.mkdir(mode=0o700, exist_ok=True)
    with private_bus() as bus:
        daemon = Daemon(bus, run).start()
        try:
            env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
            env.pop("IMGMOUNT_STATE_DIR", None)  # the commands must talk to the daemon
            return subprocess.run(argv, env=env, check=False).returncode
        finally:
            daemon.signal(signal.SIGTERM)
            shutil.rmtree(daemon.home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
