"""A Windows data disk with BitLocker, as Windows 10 leaves it: GPT, p1 ext4 (something plain beside it),
p2 an NTFS volume with known files encrypted in place by the test kit's BitLocker writer
(:mod:`imgmount_testkit.bitlocker`: XTS-AES-128, a password and a recovery password protector)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from imgmount_testkit import bitlocker, images, windows
from imgmount_testkit.crypt_layouts import LINUX_FS, content
from tests.support.guests import Guest

PASSWORD = "BitLocker user password 42"
RECOVERY = bitlocker.new_recovery_password(42)
FILES = {
    "Documents/report.txt": b"quarterly report, BitLocker test marker\r\n" * 200,
    "Users/Public/R\u00e9sum\u00e9 \u2013 caf\u00e9.txt": "\u00e7a marche\r\n".encode(),
    "big.bin": hashlib.sha256(b"big").digest() * 50_000,
}


def bitlocker_guest(path: Path) -> Guest:
    raw = images.blank(path, 96 * images.MiB)
    images.partition(raw, f"label: gpt\nsize=24MiB, type={LINUX_FS}\nsize=64MiB, type={windows.BASIC}\n")
    (p1, p2) = [(p["start"] * 512, p["size"] * 512) for p in images.sfdisk_json(raw)["partitions"]]
    images.format_region(raw, *p1, "ext4", files=content("p1"))
    windows.format_volume(raw, *p2, "ntfs", FILES, label="Data")
    bitlocker.encrypt_volume(raw, *p2, password=PASSWORD, recovery_password=RECOVERY)
    return Guest(raw, {"p1": content("p1"), "p2": FILES}, {"p1": "ext4", "p2": "ntfs"})
