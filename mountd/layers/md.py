"""An md RAID array assembled read-only from imgmount's own member devices (design: "A mount is a stack of
layers"; issue 10, md RAID).

``mdadm --assemble /dev/mdN --config=none --uuid=U --readonly MEMBER...``: no configuration
file (the host's ``mdadm.conf`` may name DEVICE patterns or arrays), the array's uuid, and our member devices
listed one by one, so mdadm looks at nothing of the host's. ``--readonly`` starts it read-only (no resync,
no superblock update): the members' bytes stay as they are. Only arrays whose every member is in the image
are assembled (without ``--run`` mdadm starts none that is newly degraded); a mirror missing a member is
read from one member instead.

We choose the array's number ourselves (from :data:`FIRST_MINOR` up, where nothing else allocates), so the
journal names it, and the engine claims it for systemd/60-imgmount.rules, before mdadm creates it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from mountd.errors import BusyError, CommandError, FailedError, InvalidArgumentError
from mountd.host import command
from mountd.host.mddev import (
    MD_TIMEOUT,
    array_on,
    array_state,
    ensure_md_module,
    md_devices,
    slaves,
    stop,
    stop_host_arrays,
    sysname,
)
from mountd.host.processes import text_of
from mountd.host.udevprobe import release_past_udev
from mountd.host.users import SYS_CLASS_BLOCK, block_users
from mountd.layers.layer import Layer, LayerRecord, Progress, Spec

log = logging.getLogger(__name__)

#: md numbers we try: above what mdadm's own allocation (md127 down) and distributions' configs use.
FIRST_MINOR, LAST_MINOR = 200, 255
TRIES = 4  # another mount may take a number between our look and mdadm's create
READ_ONLY_STATES = ("readonly", "read-auto")


@dataclass(frozen=True)
class MdSpec(Spec):
    kind: ClassVar[str] = "md"

    uuid: str  # the array's, as mdadm prints it
    members: tuple[str, ...]  # our device nodes, one per member
    read_only: bool = True

    def identity(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "members": list(self.members), "read_only": self.read_only}

    @classmethod
    def parse(cls, identity: dict[str, Any]) -> MdSpec:
        try:
            return cls(str(identity["uuid"]), tuple(str(m) for m in identity["members"]),
                       bool(identity.get("read_only", True)))
        except (KeyError, TypeError) as exc:
            raise InvalidArgumentError(f"bad md layer plan: {exc}") from None


class MdLayer(Layer[str]):
    """An array assembled from our member devices; found again by those devices (its ``slaves``).

    Identity in: ``uuid``, ``members``, ``read_only``. Out: ``node`` (``/dev/mdN``, journalled before mdadm
    creates it) and ``devnum``. Left behind on failure: nothing (mdadm stops an array it could not
    start; :meth:`detach` stops whatever a crash left on our members).
    """

    kind = MdSpec.kind

    @property
    def _spec(self) -> MdSpec:
        return MdSpec.parse(self.identity)

    @property
    def _members(self) -> set[str]:
        return {sysname(m) for m in self._spec.members}

    def _attach(self, progress: Progress) -> LayerRecord:
        spec = self._spec
        ensure_md_module()
        stop_host_arrays(spec.members)  # the host's incremental assembly got there first (no udev rule)
        for _ in range(TRIES):
            node = _free_node()
            record = replace(self.record, identity={**self.identity, "node": node})
            progress(record)  # journalled and claimed before the kernel object exists
            self.record = record
            try:
                command.run(_assemble_argv(node, spec), timeout=MD_TIMEOUT)
            except CommandError as exc:
                if f"{node} is already in use" in exc.stderr:
                    continue  # another took the number between our look and mdadm's create
                raise FailedError(f"mdadm could not assemble the array {spec.uuid} from "
                                  f"{', '.join(spec.members)}: {exc.message.split(': ', 1)[-1]}") from None
            md = array_on(self._members)
            if md is None or f"/dev/{md}" != node:
                raise FailedError(f"mdadm assembled {node} without {self._held_elsewhere()}")
            return replace(record, identity={**record.identity, "devnum": _devnum(md)})
        raise FailedError(f"md device numbers from md{FIRST_MINOR} on were taken {TRIES} times while mdadm "
                          "started: try again")

    def _held_elsewhere(self) -> str:
        """The members missing from our array, and who holds them."""
        ours = slaves(sysname(self.node))
        return "; ".join(f"/dev/{m} ({'; '.join(block_users(m).described()) or 'not in the array'})"
                         for m in sorted(self._members - ours))

    def verify(self) -> bool:
        md = array_on(self._members)
        if md is None or f"/dev/{md}" != self.node or _devnum(md) != self.identity.get("devnum"):
            return False
        return (array_state(md) in READ_ONLY_STATES) == self._spec.read_only

    def _present(self) -> str | None:
        """Our array, whole or (a member was taken from under mdadm) partly assembled on our number."""
        found = array_on(self._members)
        if found is None and self.node:
            held = slaves(sysname(self.node))
            found = sysname(self.node) if held and held <= self._members else None
        return found

    def _release(self, md: str, *, force: bool) -> None:
        """Stop the array. ``force`` changes nothing: an array in use is never stopped from under its user."""
        def attempt() -> bool:
            if block_users(md):
                return False
            try:
                stop(md)
            except CommandError as exc:
                if _busy_words(exc.stderr):  # opened since we looked: udev's event, most often
                    return False
                raise self._busy(md, [exc.message.split(": ", 1)[-1]]) from None
            return True

        users = release_past_udev(md, attempt)
        if users is not None:
            raise self._busy(md, users.described() or ["held open by no process visible here"])
        if array_on(self._members) is not None:
            raise FailedError(f"/dev/{md} is still assembled after mdadm --stop")

    @staticmethod
    def _busy(md: str, holders: list[str]) -> BusyError:
        return BusyError(f"/dev/{md} is in use ({'; '.join(holders)}): unmount or close it first")


def _busy_words(stderr: str) -> bool:
    """mdadm's words for an array someone opened: no O_EXCL open, or STOP_ARRAY's EBUSY."""
    return any(w in stderr for w in ("exclusive access", "Device or resource busy", "Device is busy"))


def _assemble_argv(node: str, spec: MdSpec) -> list[str]:
    mode = ["--readonly"] if spec.read_only else []
    return ["mdadm", "--assemble", node, "--config=none", f"--uuid={spec.uuid}", *mode,
            *spec.members]


def _free_node() -> str:
    taken = set(md_devices())
    free = next((n for n in range(FIRST_MINOR, LAST_MINOR + 1) if f"md{n}" not in taken), None)
    if free is None:
        raise FailedError(f"no free md device number from md{FIRST_MINOR} to md{LAST_MINOR}")
    return f"/dev/md{free}"


def _devnum(md: str) -> str:
    return text_of(str(SYS_CLASS_BLOCK / md / "dev"))
