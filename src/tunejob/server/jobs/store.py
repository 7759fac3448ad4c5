"""The server's state: files, jobs, events and checkpoints in SQLite, file bytes on disk.

Everything a restart needs lives here, under one data directory:
    DATA_DIR/tunejob.sqlite3   rows (owners are HMAC-SHA256 digests of API keys, never the keys)
    DATA_DIR/server.secret     the HMAC key of those digests (mode 0600, created once)
    DATA_DIR/files/<file_id>   uploaded bytes (stored under the id, never under a client's name)
    DATA_DIR/jobs/<job_id>/    the job spec and its run directory
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT, filename TEXT, purpose TEXT, bytes INTEGER,
  created_at INTEGER, status TEXT, status_details TEXT);
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, owner TEXT, created_at INTEGER, data TEXT);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, job_id TEXT, created_at INTEGER,
  level TEXT, message TEXT, type TEXT, data TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (id TEXT PRIMARY KEY, job_id TEXT, created_at INTEGER, step INTEGER, data TEXT);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id, seq);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    def __init__(self, data_dir: Path):
        self.dir = Path(data_dir)
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "tunejob.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()  # writes (and reads that decide a write) go one at a time
        # Reads take a connection of their own thread, outside the lock: WAL lets readers run beside
        # the writer, and 32 clients listing jobs no longer queue behind one connection (issue 31, 12).
        self._readers = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._secret = _server_secret(self.dir / "server.secret")
        self._sweep_files()

    def owner_of(self, key: str) -> str:
        """The owner id of an API key: HMAC-SHA256 under this server's secret, so a leaked database
        alone cannot be matched against a list of candidate keys (a plain hash could)."""
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def adopt_legacy_owner(self, key: str) -> None:
        """Rows written before the HMAC digests (unsalted sha256[:32]) move to the key's new id."""
        old, new = hashlib.sha256(key.encode()).hexdigest()[:32], self.owner_of(key)
        for table in ("files", "jobs"):
            self._q(f"UPDATE {table} SET owner=? WHERE owner=?", (new, old))

    def _sweep_files(self) -> None:
        """Delete what a server killed mid-upload left in files/: a `.file-*.part` being written, or
        a complete file whose row was never added (killed while validating it). Neither was ever
        acknowledged to a client, and no file id can reach either, so they are only used disk."""
        known = {r[0] for r in self._q("SELECT id FROM files")}
        for path in (self.dir / "files").iterdir():
            if path.is_file() and path.name not in known:
                path.unlink(missing_ok=True)

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.fetchall()

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """A SELECT on this thread's own connection. Every write is committed when its statement
        ends (autocommit), so a read sees all writes that came before it."""
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.dir / "tunejob.sqlite3", check_same_thread=False, isolation_level=None)
            self._readers.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn.execute(sql, args).fetchall()

    # ------------------------------------------------------------ files

    def file_path(self, file_id: str) -> Path:
        # ids are generated here (hex), so the path cannot leave files/ whatever the client sent
        return self.dir / "files" / file_id

    def add_file(self, owner: str, filename: str, purpose: str, size: int, status: str, details: str | None, file_id: str) -> dict:
        now = int(time.time())
        self._q("INSERT INTO files VALUES (?,?,?,?,?,?,?,?)", (file_id, owner, filename, purpose, size, now, status, details))
        return self.get_file(owner, file_id)

    def get_file(self, owner: str, file_id: str) -> dict | None:
        rows = self._read("SELECT id, filename, purpose, bytes, created_at, status, status_details FROM files WHERE id=? AND owner=?", (file_id, owner))
        return _file_obj(rows[0]) if rows else None

    def list_files(self, owner: str, purpose: str | None = None) -> list[dict]:
        sql = "SELECT id, filename, purpose, bytes, created_at, status, status_details FROM files WHERE owner=?"
        args: tuple = (owner,)
        if purpose:
            sql, args = sql + " AND purpose=?", (owner, purpose)
        return [_file_obj(r) for r in self._read(sql + " ORDER BY created_at DESC, id", args)]

    def delete_file(self, owner: str, file_id: str) -> bool:
        if not self.get_file(owner, file_id):
            return False
        self._q("DELETE FROM files WHERE id=? AND owner=?", (file_id, owner))
        self.file_path(file_id).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------ jobs

    def add_job(self, owner: str, job: dict) -> dict:
        self._q("INSERT INTO jobs VALUES (?,?,?,?)", (job["id"], owner, job["created_at"], json.dumps(job)))
        return job

    def get_job(self, owner: str | None, job_id: str) -> dict | None:
        if owner is None:
            rows = self._read("SELECT data FROM jobs WHERE id=?", (job_id,))
        else:
            rows = self._read("SELECT data FROM jobs WHERE id=? AND owner=?", (job_id, owner))
        return json.loads(rows[0][0]) if rows else None

    def job_owner(self, job_id: str) -> str | None:
        rows = self._read("SELECT owner FROM jobs WHERE id=?", (job_id,))
        return rows[0][0] if rows else None

    def update_job(self, job_id: str, **fields) -> dict:
        """Fields beside a job's state; `status` and `control` change only through transition()."""
        if {"status", "control"} & fields.keys():
            raise ValueError("status and control change through Store.transition (server/jobs/lifecycle.py)")
        with self._lock:
            job = self.get_job(None, job_id)
            job.update(fields)
            self._q("UPDATE jobs SET data=? WHERE id=?", (json.dumps(job), job_id))
            return job

    def transition(self, job_id: str, decide) -> dict | None:
        """One conditional update: `decide` sees the job as it is now and returns the fields to
        write (None: no change); the UPDATE applies only if the row is still what was decided on
        (its status included), so a concurrent move is never overwritten. Returns the new job, or
        None when decide declined. Moves are checked against lifecycle.MOVES."""
        from tunejob.server.jobs.lifecycle import check_move

        with self._lock:
            while True:
                rows = self._q("SELECT data FROM jobs WHERE id=?", (job_id,))
                if not rows:
                    return None
                old = rows[0][0]
                job = json.loads(old)
                fields = decide(job)
                if fields is None:
                    return None
                if fields.get("status", job["status"]) != job["status"]:
                    check_move(job["status"], fields["status"])
                new = json.dumps({**job, **fields})
                cur = self._db.execute("UPDATE jobs SET data=? WHERE id=? AND json_extract(data, '$.status')=? AND data=?",
                                       (new, job_id, job["status"], old))
                if cur.rowcount == 1:  # else another process moved it in between: read again, decide again
                    return json.loads(new)

    def list_jobs(self, owner: str | None = None, status: str | None = None) -> list[dict]:
        rows = self._read("SELECT data FROM jobs" + (" WHERE owner=?" if owner else "") + " ORDER BY created_at DESC, id DESC", (owner,) if owner else ())
        jobs = [json.loads(r[0]) for r in rows]
        return [j for j in jobs if status is None or j["status"] == status]

    # ------------------------------------------------------------ events and checkpoints

    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> dict:
        event_id = new_id("ftevent")
        now = int(time.time())
        self._q("INSERT INTO events (id, job_id, created_at, level, message, type, data) VALUES (?,?,?,?,?,?,?)",
                (event_id, job_id, now, level, message, type, json.dumps(data) if data is not None else None))
        return {"id": event_id, "object": "fine_tuning.job.event", "created_at": now, "level": level, "message": message, "type": type, "data": data or {}}

    def list_events(self, job_id: str) -> list[dict]:
        """Newest first, as OpenAI returns them."""
        rows = self._read("SELECT id, created_at, level, message, type, data FROM events WHERE job_id=? ORDER BY seq DESC", (job_id,))
        return [{"id": r[0], "object": "fine_tuning.job.event", "created_at": r[1], "level": r[2], "message": r[3], "type": r[4],
                 "data": json.loads(r[5]) if r[5] else {}} for r in rows]  # OpenAI's schema: an object, {} for a message

    def has_event(self, job_id: str, message: str) -> bool:
        return bool(self._read("SELECT 1 FROM events WHERE job_id=? AND message=? LIMIT 1", (job_id, message)))

    def add_checkpoint(self, job_id: str, step: int, data: dict) -> None:
        if self._q("SELECT 1 FROM checkpoints WHERE job_id=? AND step=?", (job_id, step)):
            return
        ckpt_id = new_id("ftckpt")
        data = {**data, "id": ckpt_id, "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()), "step_number": step, "fine_tuning_job_id": job_id}
        self._q("INSERT INTO checkpoints VALUES (?,?,?,?,?)", (ckpt_id, job_id, data["created_at"], step, json.dumps(data)))

    def list_checkpoints(self, job_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in self._read("SELECT data FROM checkpoints WHERE job_id=? ORDER BY step DESC", (job_id,))]

    def close(self) -> None:
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._db.close()


def _file_obj(r) -> dict:
    # OpenAI's OpenAIFile: status_details is a string when present, never null
    f = {"id": r[0], "object": "file", "filename": r[1], "purpose": r[2], "bytes": r[3], "created_at": r[4], "status": r[5]}
    return {**f, "status_details": r[6]} if r[6] is not None else f


def _server_secret(path: Path) -> bytes:
    """32 random bytes kept in the data dir (0600): created once, read on every start after."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def safe_filename(name: str | None) -> str:
    """A display name only: no directory parts, no control characters."""
    base = os.path.basename((name or "upload.jsonl").replace("\\", "/"))
    cleaned = "".join(c for c in base if c.isprintable())[:200]
    return cleaned if cleaned not in ("", ".", "..") else "upload.jsonl"
