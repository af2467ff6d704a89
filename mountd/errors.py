"""One exception hierarchy for the whole engine.

Every error a caller can see is a :class:`MountdError` subclass whose ``dbus_name`` is one of the fixed D-Bus
error names of API v1 (design: "Errors"). Messages are one sentence naming the cause and, where there is one,
the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

ECHO_LIMIT = 200  # characters of caller input an error repeats: enough to recognise it, never a flood


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """Caller input as an error may repeat it: cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MountdError(Exception):
    """Base of every error the engine raises on purpose."""

    dbus_name = "Failed"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(MountdError):
    dbus_name = "InvalidArgument"
    exit_code = 2


class WrongKeyError(InvalidArgumentError):
    """None of the passphrases or key files given opens an encrypted volume (the message never holds one)."""


class NotFoundError(MountdError):
    dbus_name = "NotFound"
    exit_code = 3


class InvalidImageError(MountdError):
    """The image (or a table, volume or metadata inside it) is corrupt, crafted or unreadable."""

    dbus_name = "InvalidImage"
    exit_code = 4


class UnsupportedError(MountdError):
    dbus_name = "Unsupported"
    exit_code = 5


class InUseError(MountdError):
    dbus_name = "InUse"
    exit_code = 6


class BusyError(MountdError):
    dbus_name = "Busy"
    exit_code = 7


class NoFreeDeviceError(MountdError):
    dbus_name = "NoFreeDevice"
    exit_code = 8


class NotAuthorizedError(MountdError):
    dbus_name = "NotAuthorized"
    exit_code = 9


class OperationTimeoutError(MountdError):
    dbus_name = "Timeout"
    exit_code = 10


class FailedError(MountdError):
    dbus_name = "Failed"
    exit_code = 1


class CommandError(FailedError):
    """An external program failed: carries argv, exit status and the tail of stderr."""

    def __init__(self, argv: Sequence[str], status: int, stderr: str) -> None:
        self.argv = list(argv)
        self.status = status
        self.stderr = stderr
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        super().__init__(f"{argv[0]} failed with status {status}: {tail or 'no error output'}")


class ToolMissingError(UnsupportedError):
    """A program the engine needs is not installed."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(f"{program} is not installed: install the Debian package {package}")
        self.program = program
