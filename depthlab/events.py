"""What a training cell reports while it runs, and how those reports cross a process boundary.

A local worker process and a Ray task forward their cell's events the same way: `ForwardedEvents` turns each call
into a message, (event name, *arguments), and hands it to a `send` (the worker's pipe, or the driver's Ray actor);
the sweep's side calls `deliver` on each message it receives. Standard library only.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol


class CellEvents(Protocol):
    """What a training cell reports while it runs (the sweep forwards it to a display)."""

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None: ...
    def epoch_done(self, cell_id: str, row: dict) -> None: ...
    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None: ...


class RunEvents(CellEvents, Protocol):
    """Cell events, and the end of each cell's last attempt (what a pool or an executor reports)."""

    def cell_ended(self, cell_id: str, summary: dict | None, error: str | None) -> None: ...


CELL_EVENTS = ("cell_started", "epoch_done", "epoch_progress")  # the methods of CellEvents, and the messages' names


class ForwardedEvents:
    """CellEvents sent as messages through `send`, for `deliver` to replay on the other side."""

    def __init__(self, send: Callable[[tuple], Any]):
        self.send = send

    def cell_started(self, cell_id: str, total_epochs: int, done_epochs: int) -> None:
        self.send(("cell_started", cell_id, total_epochs, done_epochs))

    def epoch_done(self, cell_id: str, row: dict) -> None:
        self.send(("epoch_done", cell_id, row))

    def epoch_progress(self, cell_id: str, epoch: int, iterations: int, per_epoch: int) -> None:
        self.send(("epoch_progress", cell_id, epoch, iterations, per_epoch))


def deliver(message: tuple, events: CellEvents) -> None:
    """Replay a ForwardedEvents message on `events`."""
    name, *arguments = message
    if name not in CELL_EVENTS:
        raise ValueError(f"not a cell event: {name!r}")
    getattr(events, name)(*arguments)
