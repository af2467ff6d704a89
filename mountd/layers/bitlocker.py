"""A BitLocker volume unlocked by ``dislocker-fuse``: a FUSE mount whose ``dislocker-file`` is the decrypted
volume, which a loop device above then exposes (issue 10, "Unlocking").

Why dislocker and not libbde's ``bdemount`` (both packaged by Debian 12): bdemount 20190102 takes the password
and the recovery password only as arguments (``-p``, ``-r``), which every user reads in ``/proc/PID/cmdline``,
and reads only; libbde calls itself alpha. dislocker 0.7.3 (upstream still merging in 2026) reads a user
password from standard input (``-u`` without a value, since 2019: "make it possible to read passwords from
pipes"), mounts read-only (``-r``) or read-write, and logs the password only at its debug verbosity, which
we never ask for. Its recovery password is read from an argument or the terminal (``/dev/tty``) only, so
dislocker gets a pseudo-terminal of its own with the digits waiting in it
(:func:`mountd.host.command.run_typing`).

Each secret is tried in turn: one shaped like a recovery password (48 digits) as that, then as a user
password (a memfd as standard input, one line); "Unable to grab VMK or FVEK" is dislocker's word for a key
that does not open the volume.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mountd.errors import BusyError, FailedError, InvalidArgumentError, InvalidImageError, WrongKeyError
from mountd.host import command
from mountd.host.loopdev import loops_backed_by
from mountd.host.mountinfo import mountinfo
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

WRONG_KEY = "Unable to grab VMK or FVEK"
#: A BitLocker recovery password as Windows shows it: eight groups of six digits (hyphens optional).
RECOVERY_PASSWORD = re.compile(rb"[0-9]{6}(-?[0-9]{6}){7}")
#: The longest secret read back from its memfd: a recovery password and its line end.
LONGEST_RECOVERY_PASSWORD = 56
#: The user password's key derivation is 2^20 SHA-256 rounds: seconds, even under emulation.
OPEN_TIMEOUT = 120.0
DECRYPTED = "dislocker-file"


@dataclass(frozen=True)
class BitLockerSpec(Spec):
    kind: ClassVar[str] = "bitlocker"

    device: str  # the block device holding the BitLocker volume
    mountpoint: str  # a root-only directory of the state directory, where dislocker-fuse mounts
    read_only: bool

    def identity(self) -> dict[str, Any]:
        return {"device": self.device, "mountpoint": self.mountpoint, "read_only": self.read_only}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> BitLockerSpec:
        try:
            return cls(str(identity["device"]), str(identity["mountpoint"]),
                       bool(identity.get("read_only", True)))
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"bad bitlocker layer plan: {exc}") from None


class BitLockerLayer(Layer[str]):
    """One BitLocker volume, unlocked.

    Identity in: ``device``, ``mountpoint``, ``read_only``; the secrets as ``fds``. Out: ``node`` (the
    decrypted file). Left behind on failure: nothing (dislocker exits before mounting when a key fails;
    :meth:`detach` unmounts and removes the directory whatever a crash left).
    """

    kind = BitLockerSpec.kind

    @property
    def _spec(self) -> BitLockerSpec:
        return BitLockerSpec.parse(self.identity)

    @property
    def _mountpoint(self) -> str:
        return self._spec.mountpoint

    def _attach(self, progress: Progress) -> LayerRecord:
        device = self._spec.device
        os.makedirs(self._mountpoint, mode=0o700, exist_ok=True)
        if not self.fds:
            raise WrongKeyError(f"{device} is locked and no password was given for it")
        for result in self._tries(device):
            if result.status == 0:
                break
            said = _last_words(result.stdout + result.stderr)
            if WRONG_KEY not in result.stdout + result.stderr:
                raise InvalidImageError(f"dislocker could not open the BitLocker volume on {device}: {said}")
        else:
            raise WrongKeyError(f"wrong password for volume {self.record.volume or 'disk'} (BitLocker on "
                                f"{device}): check it and try again")
        node = os.path.join(self._mountpoint, DECRYPTED)
        if _fuse_at(self._mountpoint) is None or not os.path.isfile(node):
            raise FailedError(f"dislocker-fuse succeeded, yet {node} is not there")
        return replace(self.record, identity={**self.identity, "node": node})

    def _tries(self, device: str) -> Iterator[command.Result]:
        """dislocker run once a way of using each secret, until one opens the volume."""
        argv = ["dislocker-fuse", "-V", device]
        if self._spec.read_only:
            argv.insert(1, "-r")
        for fd in self.fds:
            secret = os.pread(fd, LONGEST_RECOVERY_PASSWORD + 1, 0).strip()
            if is_recovery_password(secret):
                yield _without_prompt(command.run_typing([*argv, "-p", "--", self._mountpoint], secret,
                                                         timeout=OPEN_TIMEOUT))
            os.lseek(fd, 0, os.SEEK_SET)
            yield command.run([*argv, "-u", "--", self._mountpoint], stdin_fd=fd, check=False,
                              timeout=OPEN_TIMEOUT)

    def verify(self) -> bool:
        return _fuse_at(self._mountpoint) is not None

    def _present(self) -> str | None:
        return _fuse_at(self._mountpoint)

    def _release(self, fstype: str, *, force: bool) -> None:
        """Unmount the FUSE filesystem (dislocker-fuse then exits). A loop device on the decrypted file
        keeps it: that is named, whatever ``force`` says."""
        users = loops_backed_by(os.path.join(self._mountpoint, DECRYPTED))
        if users:
            raise BusyError(f"the unlocked BitLocker volume {self._mountpoint} is still used by loop device "
                            f"{', '.join(users)}: detach it first")
        command.run(["umount", self._mountpoint], timeout=60)

    def _clean_up(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self._mountpoint)


def _without_prompt(result: command.Result) -> command.Result:
    """dislocker's output without its prompt, which it redraws with the digits typed so far."""
    shown = "\n".join(line for line in result.stdout.replace("\r", "\n").splitlines()
                      if "recovery password:" not in line)
    return replace(result, stdout=shown)


def is_recovery_password(secret: bytes) -> bool:
    """Whether ``secret`` is a recovery password dislocker accepts (its ``valid_block``: each block a multiple
    of 11 below 2^16 * 11, its last digit the alternating sum of the others modulo 11). dislocker's prompt
    waits for more digits after an invalid block, so only a valid one is typed to it."""
    if not RECOVERY_PASSWORD.fullmatch(secret):
        return False
    digits = secret.replace(b"-", b"").decode()
    return all(_valid_block(digits[i:i + 6]) for i in range(0, 48, 6))


def _valid_block(block: str) -> bool:
    d = [int(c) for c in block]
    return int(block) % 11 == 0 and int(block) < 720896 and (d[0] - d[1] + d[2] - d[3] + d[4]) % 11 == d[5]


def _fuse_at(path: str) -> str | None:
    """The FUSE mount on ``path``, if any (from mountinfo: never stat a possibly dead mount)."""
    return next((e.fstype for e in mountinfo()
                 if e.mountpoint == path and (e.fstype == "fuse" or e.fstype.startswith("fuse."))), None)


def _last_words(output: str) -> str:
    """dislocker's last message, without its timestamp, level and prompt."""
    lines = [line.split("] ", 1)[-1].strip() for line in output.splitlines() if line.strip()]
    return lines[-1].replace("Enter the user password: ", "") if lines else "no message"
