"""scripts/demo's encrypted sample, on a kernel with dm-crypt (the only place it runs: this lane): the sample
the demo builds, mounted by the demo's own steps (scripts/demo-steps, through imgmountd on a private bus, the
passphrase it prints given on standard input), one file of each volume shown, and unmounted, leaving nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from imgmount_testkit import sample_encrypted
from imgmount_testkit.bus import REPO
from tests.support import leftovers


def test_the_demos_encrypted_sample_mounts_with_the_passphrase_it_prints(scratch: Path) -> None:
    image = sample_encrypted.build(scratch / "demo")
    before = leftovers.snapshot()
    env = {**os.environ, "DEMO_PASSPHRASE": sample_encrypted.PASSPHRASE}
    env.pop("IMGMOUNT_STATE_DIR", None)
    shown = subprocess.run([sys.executable, "-m", "imgmount_testkit.with_daemon", "bash", "scripts/demo-steps",
                            str(image)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                           check=False)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    for volume in ("p2", "vgubuntu/root"):  # /boot, and the root inside LUKS2 -> LVM
        assert any(line.startswith(f"{volume} ") and line.endswith(f"hello.txt: hello from {volume}")
                   for line in lines), shown.stdout
    assert leftovers.ours(leftovers.snapshot().new_since(before), image) == []
