"""Attach layers bottom-up, journalling each before it touches the kernel; undo top-down on failure.

Detaching (rollback or unmount) walks the layers from the top and stops at the first that will not come off:
everything below it is still in use. The error lists exactly what is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from mountd.engine.journal import Journal, MountRecord
from mountd.errors import BusyError, FailedError, InvalidArgumentError, MountdError, OperationTimeoutError
from mountd.host.dmsetup import release_host_activations
from mountd.host.mddev import stop_host_arrays
from mountd.host.processes import kill
from mountd.layers.layer import FaultPoints, Layer, LayerRecord, layer_from_record
from mountd.model import MountState

log = logging.getLogger(__name__)


class MountStack:
    def __init__(self, journal: Journal, record: MountRecord, faults: FaultPoints | None = None) -> None:
        self.journal = journal
        self.record = record
        self.faults = faults or FaultPoints()
        self.cancelled = ""  # why the attach was cancelled, once it is

    def cancel(self, why: str) -> None:
        """Stop an attach from another thread: kill the programs it started (so a step that waits on their
        I/O fails at once) and make the next step fail; the rollback follows as for any failure."""
        self.cancelled = why
        for rec in self.record.layers:
            if (process := rec.process) is not None and kill(*process):
                log.warning("killed %s pid %d: %s", rec.kind, process[0], why)

    def _step(self, where: str) -> None:
        if self.cancelled:
            raise OperationTimeoutError(self.cancelled)
        self.faults.step(where)

    def _save(self, record: MountRecord) -> None:
        self.record = record
        self.journal.write(record)

    def push(self, planned: LayerRecord, fds: tuple[int, ...] = ()) -> Layer[Any]:
        """Journal ``planned``, attach it (with ``fds``, the caller's open files it needs), journal the
        result; a failed attach is undone before raising."""
        where = f"{planned.kind} {planned.volume or 'disk'}".strip()
        self._step(f"before {where}")
        self._save(self.record.with_layer(planned))
        layer = layer_from_record(planned)
        layer.fds = fds

        def progress(rec: LayerRecord) -> None:
            layer.record = rec
            self._save(self.record.with_layer(rec))
            self.journal.claim(rec.node)  # after the record: never a mark it does not name

        try:
            progress(layer.attach(progress))
            self._step(f"after {where}")
        except BaseException:
            self._undo(layer)
            raise
        log.debug("attached %s", layer.describe())
        return layer

    def _undo(self, layer: Layer[Any]) -> None:
        """Detach a layer whose attach failed part-way; keep its record if even that fails."""
        try:
            layer.detach(force=True)
        except MountdError as exc:
            log.warning("could not undo a failed %s: %s", layer.describe(), exc)
            return
        self.journal.release(layer.node)
        self._save(self.record.without_layer(layer.record))

    @contextmanager
    def building(self, deadline: float | None = None) -> Iterator[MountStack]:
        """Attach inside this block; on any failure, tear everything down and re-raise the first error.
        Past ``deadline`` seconds the attach is cancelled (:meth:`cancel`) and fails with Timeout."""
        watchdog = _Watchdog(self, deadline)
        try:
            yield self
            watchdog.disarm()
            if self.cancelled:  # it fired just as the attach completed: roll back all the same
                raise OperationTimeoutError(self.cancelled)
        except BaseException as exc:
            watchdog.disarm()
            try:
                self.teardown(force=True)
            except MountdError as undo:
                raise BusyError(f"{exc}; and undoing the partial mount failed: {undo}") from exc
            if self.cancelled and not isinstance(exc, OperationTimeoutError):
                log.info("cancelled mount %s failed with: %s", self.record.id, exc)
                raise OperationTimeoutError(self.cancelled) from exc
            raise
        finally:
            for rec in self.record.layers:
                layer_from_record(rec).unpin()
        self._save(replace(self.record, state=MountState.MOUNTED))

    def teardown(self, *, force: bool = False) -> None:
        """Detach every layer top-down; stop at the first that will not come off and say what is left."""
        self._save(replace(self.record, state=MountState.UNMOUNTING))
        nodes = [layer_from_record(r).node for r in self.record.layers]
        release_host_activations(nodes)
        stop_host_arrays(nodes)
        for rec in reversed(self.record.layers):
            layer = layer_from_record(rec)
            try:
                layer.detach(force=force)
            except MountdError as exc:
                self._save(replace(self.record, state=MountState.MOUNTED if not force else MountState.BROKEN))
                raise self._stuck(exc) from None
            self.journal.release(layer.node)
            self._save(self.record.without_layer(rec))
        self.journal.remove(self.record.id)

    def _stuck(self, exc: MountdError) -> MountdError:
        """``exc`` of a layer that would not come off, saying what is still in place."""
        left = ", ".join(layer_from_record(r).describe() for r in reversed(self.record.layers))
        if isinstance(exc, InvalidArgumentError):  # a teardown takes no caller input: its record is bad
            return FailedError(f"the journal's record of mount {self.record.id} is damaged ({exc.message}): "
                               f"what it names must be undone by hand (still in place: {left})")
        exc.message = f"{exc.message} (still in place: {left})"
        exc.args = (exc.message,)
        return exc


class _Watchdog:
    """Cancels a stack's attach once ``seconds`` have passed, unless disarmed first."""

    def __init__(self, stack: MountStack, seconds: float | None) -> None:
        self.stack = stack
        self.lock = threading.Lock()
        self.active = seconds is not None
        self.timer = threading.Timer(seconds or 0, self._fire)
        self.seconds = seconds
        if self.active:
            self.timer.daemon = True
            self.timer.start()

    def _fire(self) -> None:
        with self.lock:
            if self.active:
                self.active = False
                self.stack.cancel(f"the mount did not complete within {self.seconds:g} s: a program it waits "
                                  "for is stuck (a stopped QEMU, a slow or hung file server); nothing of it "
                                  "is left")

    def disarm(self) -> None:
        with self.lock:  # after this, _fire cancels nothing: a completed attach is never half-cancelled
            self.active = False
        self.timer.cancel()
