"""The job store: every API job tunejob submits, recorded in SQLite under TUNEJOB_HOME.

A record is written before anything is sent (with the idempotency tag the remote job will carry)
and updated with the remote id the moment it is known, so a killed CLI loses nothing: `tunejob
jobs` lists them, `tunejob watch ID` re-attaches, and a create retried after a timeout finds the
job by its tag instead of making a second one. No secret is stored: keys stay in the environment.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunejob.errors import TunejobError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, backend TEXT, name TEXT, tag TEXT, remote_id TEXT, status TEXT,
  spec TEXT, run_dir TEXT, last_event TEXT, created_at REAL, updated_at REAL, detail TEXT);
"""


def home() -> Path:
    return Path(os.environ.get("TUNEJOB_HOME") or Path.home() / ".tunejob")


@dataclass
class JobRecord:
    id: str
    backend: str
    name: str
    tag: str
    remote_id: str | None
    status: str
    spec: str  # resolved YAML
    run_dir: str
    last_event: str | None
    created_at: float
    updated_at: float
    detail: dict

    def to_dict(self) -> dict:
        return asdict(self)


class JobStore:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else home() / "jobs.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def create(self, backend: str, name: str, spec_yaml: str, run_dir: Path) -> JobRecord:
        now = time.time()
        job_id = f"tj-{secrets.token_hex(6)}"
        tag = f"tunejob-{secrets.token_hex(8)}"
        self._db.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                         (job_id, backend, name, tag, None, "submitting", spec_yaml, str(run_dir), None, now, now, "{}"))
        return self.get(job_id)

    def update(self, job_id: str, **fields) -> JobRecord:
        if "detail" in fields:
            fields["detail"] = json.dumps({**self.get(job_id).detail, **fields["detail"]})
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self._db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRecord:
        row = self._db.execute("SELECT * FROM jobs WHERE id=? OR remote_id=?", (job_id, job_id)).fetchone()
        if row is None:
            raise TunejobError(f"no job {job_id!r} in {self.path}; `tunejob jobs` lists the known ones")
        return JobRecord(*row[:11], detail=json.loads(row[11] or "{}"))

    def list(self) -> list[JobRecord]:
        rows = self._db.execute("SELECT * FROM jobs ORDER BY created_at DESC").fetchall()
        return [JobRecord(*r[:11], detail=json.loads(r[11] or "{}")) for r in rows]
