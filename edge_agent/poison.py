"""Poison pills: a file that was being decoded when the agent died is not decoded a third time.

If a file can kill the whole agent (an out-of-memory kill of the service, a
decoder bug that takes the process down), the agent restarts, finds the file
still in the inbox, decodes it again and dies again, until systemd gives up.
The decode workers (decode_worker.py) write the file on the table into a small
journal next to the database (`<db>-decoding.<slot>`) and clear it when the
decode returns. At start-up `recover()` turns the entries left by a dead agent
into strikes, kept in `<db>-suspects.json` by content hash (a poison file
copied under another name is the same poison).

One strike is not proof: the agent may have been killed for an unrelated
reason (a power cut, `kill -9`, an OOM kill caused by something else) while an
innocent image happened to be decoding, and that image is simply screened
again. A file that was being decoded at STRIKES consecutive deaths is
quarantined (`crashed_decoder`) without being decoded again; a suspect that
decodes is cleared. Under systemd's StartLimitBurst=5 that leaves room.

Files, not database tables: the journal is written on every decode by the
worker processes, which do not open the database; the database may be the
thing that is broken at start-up.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STRIKES = 2
MAX_SUSPECTS = 1000
_SHA = re.compile(r"^[0-9a-f]{64}$")


class PoisonJournal:
    """Strikes against file contents that were being decoded when the agent died."""

    def __init__(self, db_path: Path) -> None:
        db_path = Path(db_path)
        self.journal = db_path.with_name(db_path.name + "-decoding")  # + ".<slot>", written by the workers
        self.suspects_path = db_path.with_name(db_path.name + "-suspects.json")
        self.suspects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def slot_files(self) -> list[Path]:
        prefix = self.journal.name + "."
        try:
            return sorted(p for p in self.journal.parent.iterdir()
                          if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())
        except OSError:
            return []

    def recover(self) -> None:
        """At start-up, before any decode: the dead agent's journal entries become strikes."""
        self.suspects = self._load()
        struck = []
        for slot in self.slot_files():
            try:
                text = slot.read_text(encoding="utf-8", errors="replace").strip()
                slot.unlink()
            except OSError:
                continue
            try:
                entry = json.loads(text) if text else None
            except ValueError:
                entry = None
            if not isinstance(entry, dict) or not _SHA.match(str(entry.get("sha256", ""))):
                continue
            sha = entry["sha256"]
            s = self.suspects.setdefault(sha, {"name": str(entry.get("name", ""))[:300], "strikes": 0})
            s["strikes"] = int(s.get("strikes", 0)) + 1
            struck.append((sha, s))
        for sha, s in struck:
            if s["strikes"] >= STRIKES:
                log.error("%r was being decoded when the agent died, %d times in a row: it will be quarantined "
                          "without decoding it again", s["name"], s["strikes"])
            else:
                log.warning("%r was being decoded when the agent stopped unexpectedly; it will be decoded again "
                            "(if the agent dies on it again, it is quarantined)", s["name"])
        if struck:
            self._save()

    def condemned(self, sha256: str) -> dict[str, Any] | None:
        """The suspect entry if this content has had its STRIKES: quarantine it, do not decode it."""
        with self._lock:
            s = self.suspects.get(sha256)
            return dict(s) if s and int(s.get("strikes", 0)) >= STRIKES else None

    def cleared(self, sha256: str) -> None:
        """The content got an outcome (decoded, rejected or quarantined): no longer a suspect."""
        with self._lock:
            if sha256 not in self.suspects:
                return
            del self.suspects[sha256]
            self._save()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.suspects_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s (%s)", self.suspects_path, e)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if _SHA.match(k) and isinstance(v, dict)}

    def _save(self) -> None:
        """Atomically (write, fsync, rename): strikes must survive exactly the kind of death they count."""
        items = list(self.suspects.items())[-MAX_SUSPECTS:]
        self.suspects = dict(items)
        tmp = self.suspects_path.with_name(self.suspects_path.name + ".tmp")
        try:
            if not items:
                self.suspects_path.unlink(missing_ok=True)
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.suspects, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.suspects_path)
        except OSError as e:
            log.warning("cannot record decode suspects in %s (%s); a file that crashes the agent may be "
                        "decoded again", self.suspects_path, e)
