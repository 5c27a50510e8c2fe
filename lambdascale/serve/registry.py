"""Model registrations in SQLite, so restarting the gateway loses none.

One row per model: the name and its :class:`DeploySpec` as JSON. Every write is its own
transaction (SQLite's journal makes it atomic on crash); the connection is shared by the
gateway's threads behind a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from pydantic import ValidationError

from lambdascale.errors import LambdaScaleError, ModelNotFoundError
from lambdascale.serve.schemas import DeploySpec, UpdateSpec


class RegistryError(LambdaScaleError):
    """The registry file cannot be opened or holds a row that no longer validates."""


class ModelRegistry:
    """Deployments by name, persisted in ``path`` (``":memory:"`` for a throwaway one)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL" if self.path != ":memory:" else "PRAGMA journal_mode=MEMORY")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS deployments (name TEXT PRIMARY KEY, spec TEXT NOT NULL, "
                "created REAL NOT NULL DEFAULT (julianday('now')))"
            )
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"cannot open model registry {self.path}: {e}") from e
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def list(self) -> list[DeploySpec]:
        with self._lock:
            rows = self._db.execute("SELECT name, spec FROM deployments ORDER BY created, name").fetchall()
        out = []
        for name, spec in rows:
            try:
                out.append(DeploySpec.model_validate_json(spec))
            except ValidationError as e:
                raise RegistryError(f"registry {self.path}: row {name!r} is invalid: {e}") from None
        return out

    def get(self, name: str) -> DeploySpec | None:
        with self._lock:
            row = self._db.execute("SELECT spec FROM deployments WHERE name = ?", (name,)).fetchone()
        return DeploySpec.model_validate_json(row[0]) if row else None

    def put(self, spec: DeploySpec) -> bool:
        """Insert or replace; returns True when the name was new."""
        with self._lock:
            existed = self._db.execute("SELECT 1 FROM deployments WHERE name = ?", (spec.name,)).fetchone()
            if existed:
                self._db.execute("UPDATE deployments SET spec = ? WHERE name = ?", (spec.model_dump_json(), spec.name))
            else:
                self._db.execute("INSERT INTO deployments (name, spec) VALUES (?, ?)", (spec.name, spec.model_dump_json()))
        return not existed

    def update(self, name: str, patch: UpdateSpec) -> DeploySpec:
        """Apply a partial update; raises :class:`ModelNotFoundError` or ``ValueError`` (bounds)."""
        current = self.get(name)
        if current is None:
            raise ModelNotFoundError(f"model {name!r} is not deployed; deployed: {[s.name for s in self.list()]}")
        merged = current.model_dump() | patch.model_dump(exclude_none=True)
        spec = DeploySpec.model_validate(merged)  # re-checks min <= max after the merge
        self.put(spec)
        return spec

    def delete(self, name: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM deployments WHERE name = ?", (name,))
        return cur.rowcount > 0
