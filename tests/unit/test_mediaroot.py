"""``mountd.host.mediaroot``: the access ACL of a private mount root, byte for byte (the kernel's
``posix_acl_xattr`` format: u32 version 2, then u16 tag, u16 perm, u32 id per entry, little-endian), and
which directory names under the media base name a user."""

from __future__ import annotations

import pytest

from mountd.errors import InvalidArgumentError
from mountd.host import mediaroot
from mountd.host.mediaroot import acl_blob

NO_ID = "ffffffff"


def entry(tag: str, perm: str, ident: str = NO_ID) -> str:
    return tag + perm + ident


def test_a_user_gets_read_and_search_and_nobody_else_anything() -> None:
    expected = bytes.fromhex(
        "02000000"                        # version 2
        + entry("0100", "0700")           # user_obj rwx (root, the owner)
        + entry("0200", "0500", "e8030000")  # user:1000 r-x
        + entry("0400", "0500")           # group_obj r-x (root's group)
        + entry("1000", "0500")           # mask r-x
        + entry("2000", "0000"))          # other ---
    assert acl_blob(1000) == expected
    assert len(expected) == 4 + 5 * 8


def test_the_named_uid_is_little_endian_over_all_32_bits() -> None:
    blob = acl_blob(0x12345678)
    assert blob[4 + 8:4 + 16] == bytes.fromhex("0200" "0500" "78563412")
    assert acl_blob(0xFFFFFFFE)[4 + 8:4 + 16] == bytes.fromhex("0200" "0500" "feffffff")


def test_root_gets_the_minimal_acl_that_is_mode_0750() -> None:
    assert acl_blob(0) == bytes.fromhex("02000000" + entry("0100", "0700") + entry("0400", "0500")
                                        + entry("2000", "0000"))


def test_entries_are_in_the_order_the_kernel_demands() -> None:
    blob = acl_blob(4242)
    tags = [int.from_bytes(blob[i:i + 2], "little") for i in range(4, len(blob), 8)]
    assert tags == sorted(tags) == [0x01, 0x02, 0x04, 0x10, 0x20]


@pytest.mark.parametrize("uid", [-1, 0xFFFFFFFF, 1 << 32])
def test_impossible_uids_are_refused(uid: int) -> None:
    with pytest.raises(InvalidArgumentError, match="not a valid uid"):
        acl_blob(uid)


@pytest.mark.parametrize(("name", "uid"), [("root", 0), ("1000", 1000), ("4294967294", 0xFFFFFFFE),
                                           ("4294967295", None), ("no-such-user-x", None),
                                           ("\u0661\u0662", None)])  # Arabic-Indic digits: isdigit, not a uid
def test_directory_names_map_to_uids(name: str, uid: int | None) -> None:
    assert mediaroot._uid_of(name) == uid
