"""QEMU start failures are told apart by what QEMU says (issue 9 #6: every failure used to be "in use")."""

from __future__ import annotations

from mountd.errors import (
    CommandError,
    FailedError,
    InvalidImageError,
    NotAuthorizedError,
    NotFoundError,
    UnsupportedError,
)
from mountd.host.qemulocks import QEMU_LOCK_FAILURE
from mountd.layers.fuse import ExportSpec, _start_error

PREFIX = "qemu-storage-daemon: --blockdev node-name=disk,read-only=on,driver=qcow2,file.filename=/x.qcow2: "


def spec() -> ExportSpec:
    return ExportSpec("driver=qcow2,file.driver=file,file.filename=/nonexistent/x.qcow2", "/run/x.raw", True,
                      "", 0)


def test_qemus_lock_messages_are_lock_failures() -> None:
    assert QEMU_LOCK_FAILURE.search(PREFIX + 'Failed to get "write" lock')
    assert QEMU_LOCK_FAILURE.search(PREFIX + 'Failed to get shared "write" lock')
    assert QEMU_LOCK_FAILURE.search(PREFIX + 'Failed to get "consistent read" lock')


def test_other_failures_are_not_in_use_although_blockdev_says_lock() -> None:
    """Each is the error of its class, in QEMU's words with the file's name, never its option string."""
    for reason, error in (("Could not open '/x.qcow2': Permission denied", NotAuthorizedError),
                          ("Image is not in qcow2 format", InvalidImageError),
                          ("Unsupported qcow2 feature(s): Unknown incompatible feature: 8", UnsupportedError),
                          ("Could not open '/nonexistent/x.qcow2': No such file or directory", NotFoundError),
                          ("Out of memory", FailedError)):
        exc = CommandError(["qemu-storage-daemon"], 1, PREFIX + reason)
        assert not QEMU_LOCK_FAILURE.search(exc.stderr)
        got = _start_error(exc, spec())
        assert type(got) is error and reason.split(": ")[-1] in got.message
        assert "--blockdev" not in got.message and "/nonexistent/x.qcow2" in got.message
