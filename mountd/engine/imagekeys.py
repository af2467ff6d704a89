"""Which of the keys a caller gave opens an encrypted image or volume: each is tried by the QEMU that opens
it, handed over in a memfd (:mod:`mountd.host.qemusecret`). Those given for a name come first, then the one
for everywhere (:meth:`mountd.keys.Keys.for_volume`). A key that opens nothing is QEMU's "Invalid password";
whatever the attempt made is undone by the attempt itself (a stack push undoes a failed layer) before the
next key is tried, so a wrong key leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mountd.errors import InvalidArgumentError, MountdError, WrongKeyError
from mountd.host.qemusecret import is_wrong_key, secret_fd
from mountd.image.imageinfo import ImageInfo
from mountd.keys import IMAGE, Keys

T = TypeVar("T")
HOW_TO_GIVE = ("imgmount asks for it on a terminal, or takes --passphrase-stdin or --key-file; over D-Bus, "
               "the Mount option passphrases or key-file")


class KeyNeededError(InvalidArgumentError):
    """An encrypted image or volume was to be opened and no key was given for it."""


def with_each_key(secrets: list[bytes], what: str, attempt: Callable[[int], T]) -> T:
    """``attempt(key_fd)`` with each secret in turn until one is not refused as QEMU's wrong password."""
    for secret in secrets:
        with secret_fd(secret) as fd:
            try:
                return attempt(fd)
            except MountdError as exc:
                if not is_wrong_key(str(exc)):
                    raise
    raise WrongKeyError(f"wrong passphrase for {what}")


def image_key_needed(info: ImageInfo) -> KeyNeededError:
    return KeyNeededError(f"{info.top.path} is encrypted by QEMU ({info.encryption}): give its passphrase "
                          f"({HOW_TO_GIVE}; the D-Bus name for it is {IMAGE!r})")


def with_image_key(info: ImageInfo, keys: Keys, attempt: Callable[[int], T]) -> T:
    """``attempt(key_fd)`` with the key that opens an image QEMU encrypted (``-1``: it is not encrypted)."""
    if not info.encryption:
        return attempt(-1)
    secrets = keys.for_volume(IMAGE)
    if not secrets:
        raise image_key_needed(info)
    return with_each_key(secrets, "the image", attempt)
