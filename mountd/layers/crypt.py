"""A LUKS volume opened by ``cryptsetup`` as a device-mapper crypt device (issue 10, "Unlocking").

The secrets come in as open files (:attr:`Layer.fds`: one memfd per passphrase or key file, tried in order)
and reach ``cryptsetup`` as its standard input (``--key-file=-``): never in an argument, the journal or a
log line. The record names the device by what we chose (``imgmount-<mount id>-<volume>``) and what
cryptsetup derives from the header (the dm uuid ``CRYPT-LUKS<n>-<LUKS uuid>-<name>``), so a restarted
daemon verifies or closes it without any secret. Verify reads sysfs, not ``dmsetup table``: the table of a
crypt device holds its key.

A read-only open also rests on the device below being read-only (every read-only mount's is): cryptsetup
would otherwise repair a damaged LUKS2 header copy in place.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from mountd.errors import (
    CommandError,
    FailedError,
    InvalidArgumentError,
    OperationTimeoutError,
    WrongKeyError,
)
from mountd.host import command
from mountd.host.dmlist import DmDevice, dm_devices
from mountd.host.dmsetup import (
    DM_TIMEOUT,
    release_host_activations,
    remove_past_udev,
    udev_mode,
)
from mountd.host.processes import entries, text_of
from mountd.host.udevprobe import let_udev_finish
from mountd.host.users import SYS_CLASS_BLOCK
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

#: cryptsetup's exit status for "no key available with this passphrase".
WRONG_KEY = 2
#: One key derivation, as a header asks: cryptsetup's own defaults take ~2 s where the volume was made (a
#: slower host, or emulation, takes several times that); it caps Argon2's memory at 4 GiB but not the time.
OPEN_TIMEOUT = 60.0
_NAME = re.compile(r"[A-Za-z0-9_+.-]{1,127}")
_LUKS_UUID = re.compile(r"[0-9A-Fa-f-]{1,40}")


@dataclass(frozen=True)
class CryptSpec(Spec):
    kind: ClassVar[str] = "crypt"

    device: str  # the block device holding the LUKS header
    name: str  # the dm name: imgmount-<mount id>-<volume>
    version: str  # "1" or "2", as blkid reads the header
    luks_uuid: str
    read_only: bool

    def identity(self) -> dict[str, Any]:
        return {"device": self.device, "name": self.name, "version": self.version,
                "luks_uuid": self.luks_uuid, "read_only": self.read_only}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> CryptSpec:
        try:
            return cls(str(identity["device"]), str(identity["name"]), str(identity["version"]),
                       str(identity["luks_uuid"]), bool(identity.get("read_only", True)))
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"bad crypt layer plan: {exc}") from None

    @property
    def dm_uuid(self) -> str:
        """The uuid cryptsetup gives the device: ``CRYPT-LUKS<n>-<LUKS uuid without dashes>-<name>``."""
        return f"CRYPT-LUKS{self.version}-{self.luks_uuid.replace('-', '')}-{self.name}"


class CryptLayer(Layer[DmDevice]):
    """One LUKS volume, unlocked.

    Identity in: ``device``, ``name``, ``version``, ``luks_uuid``, ``read_only``; the secrets as ``fds``. Out:
    ``node`` (``/dev/mapper/NAME``), ``devnum``, ``lower`` (the devnum of ``device``). Left behind on failure:
    nothing (cryptsetup removes a mapping it could not complete; :meth:`detach` closes by dm uuid whatever
    a crash left).
    """

    kind = CryptSpec.kind

    @property
    def _spec(self) -> CryptSpec:
        return CryptSpec.parse(self.identity)

    @property
    def _name(self) -> str:
        return self._spec.name

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = self._spec
        if not _NAME.fullmatch(spec.name) or not _LUKS_UUID.fullmatch(spec.luks_uuid):
            raise InvalidArgumentError(f"{spec.name!r}: not a device-mapper name, or no LUKS uuid")
        device = spec.device
        self._open_with_a_key(spec)
        found = self._present()
        if found is None:
            raise FailedError(f"cryptsetup opened {spec.name}, yet no device has uuid {spec.dm_uuid}")
        node = f"/dev/mapper/{self._name}"
        _ensure_node(self._name, node, found.devnum)
        _keep_host_lvm_off(found)
        return replace(self.record, identity={**self.identity, "node": node, "devnum": found.devnum,
                                              "lower": _devnum(device)})

    def _open_with_a_key(self, spec: CryptSpec) -> None:
        """Try each secret in turn; the first that opens the volume wins."""
        device = spec.device
        if not self.fds:
            raise WrongKeyError(f"{device} is locked and no passphrase or key file was given for it")
        argv = ["cryptsetup", "open", "--type", f"luks{spec.version}", "--key-file=-",
                "--disable-external-tokens", device, spec.name]
        if spec.read_only:
            argv.insert(2, "--readonly")
        for fd in self.fds:
            result = self._try(argv, fd)
            if result.status == 0:
                return
            if result.status != WRONG_KEY:
                raise FailedError(f"cryptsetup could not open {device}: "
                                  f"{CommandError(argv, result.status, result.stderr).message}")
        tried = f"none of the {len(self.fds)} given opens it" if len(self.fds) > 1 else "it does not open it"
        raise WrongKeyError(f"wrong passphrase or key file for volume {self._volume} "
                            f"(LUKS{spec.version} on {device}: {tried}): check it and try again")

    def _try(self, argv: list[str], secret: int) -> command.Result:
        """One ``cryptsetup open`` with the secret in the memfd ``secret`` as its standard input."""
        os.lseek(secret, 0, os.SEEK_SET)
        try:
            return command.run(argv, env=udev_mode()[0], stdin_fd=secret, check=False, timeout=OPEN_TIMEOUT)
        except OperationTimeoutError:
            raise OperationTimeoutError(
                f"unlocking volume {self._volume} took more than {OPEN_TIMEOUT:g} s: its key slots ask for "
                "more key derivation than a real volume does (a damaged or crafted header)") from None

    @property
    def _volume(self) -> str:
        return self.record.volume or "disk"

    def verify(self) -> bool:
        found = self._present()
        if found is None or found.devnum != self.identity.get("devnum"):
            return False
        if found.read_only != self._spec.read_only:
            return False
        below = entries(str(SYS_CLASS_BLOCK / found.sysname / "slaves"))
        return [text_of(str(SYS_CLASS_BLOCK / s / "dev")) for s in below] == [self.identity.get("lower")]

    def _present(self) -> DmDevice | None:
        spec = self._spec
        return next((d for d in dm_devices() if d.uuid == spec.dm_uuid and d.name == spec.name), None)

    def _release(self, device: DmDevice, *, force: bool) -> None:
        """Close the volume. ``force`` changes nothing: a device in use is never torn from its user."""
        env, _ = udev_mode()
        _keep_host_lvm_off(device)

        def close(name: str) -> None:
            command.run(["cryptsetup", "close", name], env=env, timeout=DM_TIMEOUT)

        remove_past_udev(device, self._present, close, busy_words=("busy", "in use"))
        if self._present() is not None:
            raise FailedError(f"{self._name} is still open after cryptsetup close")

    def _clean_up(self) -> None:
        if Path("/dev/mapper", self._name).exists():  # without udev, nobody else removes a stale node
            env, extra = udev_mode()
            command.run(["dmsetup", "mknodes", self._name, *extra], env=env, timeout=DM_TIMEOUT)


def _devnum(node: str) -> str:
    rdev = os.stat(node).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _ensure_node(name: str, node: str, devnum: str) -> None:
    """``/dev/mapper/NAME`` for ``devnum``: udev's, libdevmapper's, or made now."""
    with contextlib.suppress(OSError):
        if _devnum(node) == devnum:
            return
    env, extra = udev_mode()
    command.run(["dmsetup", "mknodes", name, *extra], env=env, timeout=DM_TIMEOUT)
    try:
        made = _devnum(node)
    except OSError:
        made = ""
    if made != devnum:
        raise FailedError(f"{node} is not the device cryptsetup opened")


def _keep_host_lvm_off(device: DmDevice) -> None:
    """Remove the LVs a host's LVM auto-activation (Debian's 69-lvm.rules, where 60-imgmount.rules is not
    installed) mapped on the unlocked volume: udev runs it while it processes the device's event."""
    let_udev_finish(device.sysname)
    release_host_activations([f"/dev/{device.sysname}"])
