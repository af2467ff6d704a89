"""The encrypted sample of ``scripts/demo``: Ubuntu's "encrypt the disk" layout (ESP, /boot, LUKS2 ->
``vgubuntu`` -> ``root`` + ``swap_1``) in a qcow2. Filling the LUKS2 volume needs device-mapper (dm-crypt)."""

from __future__ import annotations

import sys
from pathlib import Path

from imgmount_testkit import images
from imgmount_testkit.crypt_layouts import ubuntu_encrypted

#: Printed by the demo, which types it in for you: a sample's passphrase is no secret.
PASSPHRASE = "imgmount demo passphrase"


def build(directory: Path) -> Path:
    """Build ``directory/encrypted.qcow2`` (and leave nothing else behind)."""
    directory.mkdir(parents=True, exist_ok=True)
    guest = ubuntu_encrypted(directory / "encrypted.raw", PASSPHRASE.encode(),
                             root_files={"etc/os-release": b'NAME="imgmount encrypted sample"\n'})
    try:
        return images.convert(guest.raw, directory / "encrypted.qcow2", "qcow2")
    finally:
        guest.raw.unlink()


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
