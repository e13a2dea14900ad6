"""Translate watchdog file-system events into intake observations.

Events only make intake faster; they are never the sole source of truth
(inotify queues overflow, network shares send nothing), which is why the
daemon also rescans periodically. The handler runs on watchdog's thread and
only enqueues; the main loop applies the events, so intake decisions happen
in one place. Symlinks are not followed (watchdog's default), so a link
cannot pull a folder outside the inbox into the watch.
"""
from __future__ import annotations

import logging
import os
import queue
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent, FileDeletedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from .intake import Intake

log = logging.getLogger(__name__)

# (kind, path, dest) with kind in: closed, changed, moved, deleted, dir
WatchEvent = tuple[str, str, str]


class _Handler(FileSystemEventHandler):
    def __init__(self, sink: "queue.SimpleQueue[WatchEvent]") -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if event.dest_path else ""
        if isinstance(event, FileClosedEvent):
            self.sink.put(("closed", src, ""))
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self.sink.put(("changed", src, ""))
        elif isinstance(event, (FileMovedEvent, DirMovedEvent)):
            self.sink.put(("moved" if not event.is_directory else "dir_moved", src, dest))
        elif isinstance(event, FileDeletedEvent):
            self.sink.put(("deleted", src, ""))
        elif isinstance(event, DirCreatedEvent):
            self.sink.put(("dir", src, ""))


class InboxWatcher:
    """A recursive watchdog observer on the inbox feeding a queue the main loop drains."""

    EVENTS = [FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent,
              DirCreatedEvent, DirMovedEvent]

    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox
        self.events: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        obs: BaseObserver
        try:
            from watchdog.observers.inotify import InotifyObserver

            # Full events report a rename from outside the inbox as a move (complete file), not a create.
            obs = InotifyObserver(generate_full_events=True)
        except (ImportError, OSError):  # not Linux, or inotify unavailable: the platform default
            obs = Observer()
        obs.schedule(_Handler(self.events), str(self.inbox), recursive=True, event_filter=self.EVENTS)
        obs.daemon = True
        obs.start()
        self._observer = obs

    def alive(self) -> bool:
        return self._observer is None or self._observer.is_alive()

    def stop(self) -> None:
        if self._observer is not None:
            # watchdog logs a harmless "called when the thread is inactive" race while stopping
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None


def apply(event: WatchEvent, intake: Intake) -> None:
    """Feed one event to intake. A close-write or a rename into place means the file is complete."""
    kind, src, dest = event
    if kind == "closed":
        intake.observe(src, confirmed=True)
    elif kind == "changed":
        intake.observe(src)
    elif kind == "moved":
        if src:
            intake.forget(src)
        if dest:  # renamed into place, from inside or outside the inbox: complete by construction
            intake.observe(dest, confirmed=True)
    elif kind == "deleted":
        intake.forget(src)
    elif kind in ("dir", "dir_moved"):
        # A folder moved in brings its files without per-file events.
        target = dest if kind == "dir_moved" else src
        if target and intake.rel_of(target) is not None and os.path.isdir(target):
            intake.scan(under=Path(target), confirmed=kind == "dir_moved")
