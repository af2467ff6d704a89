"""A mount is a stack of layers (design: "A mount is a stack of layers").

Each layer is rebuilt from its journal record alone (``layer_from_record``), so any process (another
``imgmount``, the daemon after a restart) can verify or detach what another one made.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar, Generic, TypeVar

from mountd.errors import FailedError


class LayerState(StrEnum):
    ATTACHING = "attaching"  # the kernel object (or process) may exist: the identity says how to find it
    ATTACHED = "attached"


@dataclass(frozen=True)
class LayerRecord:
    """What one layer made or is about to make; ``state`` is "attaching" until the kernel object exists."""

    kind: str  # "server" | "nbd" | "fuse" | "loop" | "dm" | "partition" | "mount"
    volume: str  # the volume it serves ("" for the whole disk)
    state: LayerState
    identity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRecord:
        return cls(str(data["kind"]), str(data["volume"]), LayerState(data["state"]),
                   dict(data.get("identity", {})))

    # What every kind records once its attach knows it (its spec's ``parse`` reads what it was planned with):

    @property
    def node(self) -> str:
        """What the layer exposes to the one above (a device node, a file or a mountpoint); "" until known."""
        return str(self.identity.get("node", ""))

    @property
    def process(self) -> tuple[int, int] | None:
        """The program the layer started (a QEMU server, a FUSE driver), by pid and start time, once known."""
        pid, started = self.identity.get("pid"), self.identity.get("start_time")
        return (pid, started) if isinstance(pid, int) and isinstance(started, int) else None


class Spec(ABC):
    """A layer kind's plan: the identity its attach starts from, typed. Each kind writes (:meth:`identity`)
    and reads (its ``parse``) its own keys, so no caller spells them."""

    kind: ClassVar[str]

    @abstractmethod
    def identity(self) -> dict[str, Any]: ...

    def plan(self, volume: str = "") -> LayerRecord:
        """The record a stack pushes: this plan, for ``volume`` ("" for the whole disk), not yet attached."""
        return LayerRecord(self.kind, volume, LayerState.ATTACHING, self.identity())


Progress = Callable[[LayerRecord], None]
REGISTRY: dict[str, type[Layer[Any]]] = {}
#: What a kind's :meth:`Layer._present` finds of its object, handed to its :meth:`Layer._release`.
Found = TypeVar("Found")


class Layer(ABC, Generic[Found]):
    """One step of a mount stack, a template as blivet's devices are (``setup`` -> ``_pre_setup``,
    ``_setup``, ``_post_setup``): each kind writes only its own steps.

    ``attach`` creates the kernel object (or process) and returns the record with its full identity; when the
    identity becomes known part-way (e.g. which loop device was taken), the kind calls ``progress`` first so
    the journal names the object before anything else can fail. ``detach`` is idempotent and copes with a
    half-done attach (a record still in state "attaching"). ``verify`` checks identity, not names.
    """

    kind: ClassVar[str]
    #: Descriptors handed to this attach in memory (a caller's open files), never through the journal.
    fds: tuple[int, ...] = ()

    def __init__(self, record: LayerRecord) -> None:
        self.record = record

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    @property
    def identity(self) -> dict[str, Any]:
        return self.record.identity

    @property
    def node(self) -> str:
        """What this layer exposes to the one above: a device node, a file or a mountpoint."""
        return self.record.node

    def attach(self, progress: Progress) -> LayerRecord:
        """The kind's own steps (:meth:`_attach`); the record comes back attached."""
        self.record = replace(self._attach(progress), state=LayerState.ATTACHED)
        return self.record

    def detach(self, *, force: bool = False) -> None:
        """:meth:`_present` looks for what this layer made (nothing: never made, gone already, or no longer
        ours, which is never touched); :meth:`_release` takes it down, refusing while others use it, unless
        ``force`` lets the kind do what it safely can; :meth:`_clean_up` removes what the kind keeps beside
        it (pid files, sockets, directories, stale nodes), whether the object was there or not."""
        found = self._present()
        if found is not None:
            self._release(found, force=force)
        self._clean_up()

    @abstractmethod
    def verify(self) -> bool: ...

    @abstractmethod
    def _attach(self, progress: Progress) -> LayerRecord: ...

    @abstractmethod
    def _present(self) -> Found | None: ...

    @abstractmethod
    def _release(self, found: Found, *, force: bool) -> None: ...

    def _clean_up(self) -> None:
        """What the kind keeps beside its object; nothing by default."""

    def unpin(self) -> None:
        """The mount is built, or given up: let go of what kept this layer steady while the layers above it
        were made (they hold it now). Nothing by default."""

    def describe(self) -> str:
        return f"{self.kind} {self.node or self.identity}"


def layer_from_record(record: LayerRecord) -> Layer[Any]:
    try:
        return REGISTRY[record.kind](record)
    except KeyError:
        raise FailedError(f"the journal names an unknown layer kind {record.kind!r}") from None


class InjectedFault(FailedError):
    """A failure injected by the tests (``IMGMOUNT_FAULT_AT=N``) at the N-th step of an attach."""


class FaultPoints:
    """Counts the steps of one attach; fails the ``fail_at``-th, and kills the process at the ``crash_at``-th
    (tests only: ``IMGMOUNT_FAULT_AT``, ``IMGMOUNT_CRASH_AT``; 0 for neither)."""

    def __init__(self, fail_at: int = 0, crash_at: int = 0) -> None:
        self._target = fail_at
        self._crash = crash_at
        self.count = 0

    def step(self, where: str) -> None:
        self.count += 1
        if self.count == self._crash:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.count == self._target:
            raise InjectedFault(f"injected fault at step {self.count} ({where})")

