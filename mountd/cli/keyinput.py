"""The keys ``imgmount`` gives for a mount: ``--passphrase-stdin`` (one passphrase read from standard input),
``--key-file FILE`` (opened by the command, as the user who runs it), either tried on every locked volume and
on an image QEMU encrypted; else, on a terminal, a question (no echo) for each locked volume to be mounted.

A key never goes into an argument: the daemon gets passphrases in the Mount call's ``passphrases`` and the
key for everywhere as the content of a memfd passed as the ``key-file`` descriptor
(:func:`everywhere_fd`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO

from mountd.errors import InvalidArgumentError
from mountd.keys import IMAGE, NO_KEYS, Keys

#: cryptsetup's default limit for a key file; a passphrase from stdin is held to the same.
MAX_KEY_SIZE = 8 << 20
#: (volume name, what locks it), as :func:`mountd.engine.unlocking.lock_kind` names it; "image" for QEMU's.
Locked = list[tuple[str, str]]


def add_key_options(p: argparse.ArgumentParser) -> None:
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--passphrase-stdin", action="store_true",
                      help="read one passphrase from standard input and try it on every locked volume and "
                           "on an image QEMU encrypted")
    keys.add_argument("--key-file", metavar="FILE",
                      help="try the content of FILE (read as you) on every locked volume and encrypted image")


def keys_from_args(args: argparse.Namespace, locked: Callable[[], Locked]) -> Keys:
    """The keys the command line gives; with none given and a terminal on stdin, the ones typed for each of
    the volumes ``locked`` names (asked only then: finding them means inspecting the image)."""
    if args.passphrase_stdin:
        return Keys(everywhere=_passphrase(sys.stdin.buffer))
    if args.key_file:
        return Keys(everywhere=_key_file(args.key_file))
    if not sys.stdin.isatty():
        return NO_KEYS
    typed = {name: _ask(name, kind) for name, kind in locked()}
    return Keys(typed) if typed else NO_KEYS


def _passphrase(stream: BinaryIO) -> bytes:
    """One passphrase: the first line of standard input, without its line end (as cryptsetup reads one)."""
    data = stream.read(MAX_KEY_SIZE + 1)
    if len(data) > MAX_KEY_SIZE:
        raise InvalidArgumentError(f"the passphrase on standard input is over {MAX_KEY_SIZE >> 20} MiB long")
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise InvalidArgumentError("no passphrase on standard input (--passphrase-stdin)")
    return line


def _key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_SIZE + 1)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_SIZE:
        raise InvalidArgumentError(f"the key file {path} is larger than {MAX_KEY_SIZE >> 20} MiB")
    if not data:
        raise InvalidArgumentError(f"the key file {path} is empty")
    return data


def _ask(name: str, kind: str) -> bytes:
    import getpass  # noqa: PLC0415 - only on a terminal: the commands' start-up is most of their cost

    what = f"the image ({kind})" if name == IMAGE else f"volume {name} ({kind})"
    typed = getpass.getpass(f"Passphrase for {what}: ").encode()
    if not typed:
        raise InvalidArgumentError(f"no passphrase given for {what}")
    return typed


@contextlib.contextmanager
def everywhere_fd(keys: Keys) -> Iterator[int]:
    """The key for everywhere in a memfd at the descriptor yielded (-1 if there is none), to pass to the
    daemon as the ``key-file`` option."""
    if keys.everywhere is None:
        yield -1
        return
    fd = os.memfd_create("imgmount-key", os.MFD_CLOEXEC)
    try:
        os.write(fd, keys.everywhere)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def passphrases(keys: Keys) -> dict[str, str]:
    """The named passphrases as D-Bus strings (UTF-8, which a typed passphrase is)."""
    try:
        return {name: secret.decode() for name, secret in keys.by_volume.items()}
    except UnicodeDecodeError:
        raise InvalidArgumentError("a passphrase that is not UTF-8 can only come by --key-file") from None
