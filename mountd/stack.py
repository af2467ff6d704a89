"""Attach layers bottom-up, journalling each before it touches the kernel; undo top-down on failure.

Detaching (rollback or unmount) walks the layers from the top and stops at the first that will not come off:
everything below it is still in use. The error lists exactly what is left.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from .dm import release_host_activations
from .errors import BusyError, MountdError
from .journal import Journal, LayerRecord, MountRecord
from .layer import FaultPoints, Layer, layer_from_record

log = logging.getLogger(__name__)


class MountStack:
    def __init__(self, journal: Journal, record: MountRecord) -> None:
        self.journal = journal
        self.record = record
        self.faults = FaultPoints()

    def _save(self, record: MountRecord) -> None:
        self.record = record
        self.journal.write(record)

    def push(self, planned: LayerRecord, fds: tuple[int, ...] = ()) -> Layer:
        """Journal ``planned``, attach it (with ``fds``, the caller's open files it needs), journal the
        result; a failed attach is undone before raising."""
        where = f"{planned.kind} {planned.volume or 'disk'}".strip()
        self.faults.step(f"before {where}")
        self._save(self.record.with_layer(planned))
        layer = layer_from_record(planned)
        layer.fds = fds

        def progress(rec: LayerRecord) -> None:
            layer.record = rec
            self.journal.claim(rec.identity.get("node"))
            self._save(self.record.with_layer(rec))

        try:
            progress(layer.attach(progress))
            self.faults.step(f"after {where}")
        except BaseException:
            self._undo(layer)
            raise
        log.debug("attached %s", layer.describe())
        return layer

    def _undo(self, layer: Layer) -> None:
        """Detach a layer whose attach failed part-way; keep its record if even that fails."""
        try:
            layer.detach(force=True)
        except MountdError as exc:
            log.warning("could not undo a failed %s: %s", layer.describe(), exc)
            return
        self.journal.release(layer.node)
        self._save(self.record.without_layer(layer.record))

    @contextmanager
    def building(self) -> Iterator[MountStack]:
        """Attach inside this block; on any failure, tear everything down and re-raise the first error."""
        try:
            yield self
        except BaseException as exc:
            try:
                self.teardown(force=True)
            except MountdError as undo:
                raise BusyError(f"{exc}; and undoing the partial mount failed: {undo}") from exc
            raise
        self._save(replace(self.record, state="mounted"))

    def teardown(self, *, force: bool = False) -> None:
        """Detach every layer top-down; stop at the first that will not come off and say what is left."""
        self._save(replace(self.record, state="unmounting"))
        release_host_activations(layer_from_record(r).node for r in self.record.layers)
        for rec in reversed(self.record.layers):
            layer = layer_from_record(rec)
            try:
                layer.detach(force=force)
            except MountdError as exc:
                self._save(replace(self.record, state="mounted" if not force else "broken"))
                left = ", ".join(layer_from_record(r).describe() for r in reversed(self.record.layers))
                exc.message = f"{exc.message} (still in place: {left})"
                exc.args = (exc.message,)
                raise
            self.journal.release(layer.node)
            self._save(self.record.without_layer(rec))
        self.journal.remove(self.record.id)
