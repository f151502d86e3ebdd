"""The teacher engine's durable request cache: one sqlite row per answer, keyed by request."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from distillery.tasks.teacher.base import ChatResult


class RequestCache:
    """Durable, content-addressed store of teacher answers; one row is committed per answer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Autocommit + WAL + synchronous=NORMAL: each insert is durable against a killed process
        # (it is in the WAL) without an fsync per answer.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, result TEXT NOT NULL, "
            "created_at REAL NOT NULL)"
        )
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> dict[str, ChatResult]:
        found: dict[str, ChatResult] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, result FROM responses WHERE key IN ({marks})", chunk
                )
                for key, blob in rows:
                    found[key] = ChatResult(**json.loads(blob))
        return found

    def put(self, key: str, result: ChatResult) -> None:
        blob = json.dumps(asdict(result))
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, blob, time.time())
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
