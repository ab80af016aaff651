"""Persistent session state: one record per (principal, session id), saved after every turn.

A `SessionRecord` holds the gate chain's carried state for the session (one row of the state pytree, leading
axis 1, bit for bit) and the session's *facts*: what happened, independently of any policy (the chat history,
the protected spans with their labels, the ledger of executed tool calls, the escalation counters, notes).
The facts let `gate.session` rebuild the gate state when the policy changes (see there for the rule).

Encoding: msgpack (`msgpack`, which flax already depends on) of the record's fields; the state pytree is
described with the compiled-policy encoder of `gate.policy` (gate.* dataclasses, tuples, arrays: no pickle),
its arrays as dtype, shape and raw little-endian bytes, and the whole payload carries a sha256 that `load`
checks. So a state round-trips exactly: same tree, dtypes, shapes and bytes.

Two stores share the small `StateStore` interface (load, save, delete, sessions):

* `SQLiteStore` (the default): one table, WAL journal, synchronous=FULL; a save is one transaction (INSERT ...
  ON CONFLICT UPDATE), so a crash leaves either the old or the new record, never half of one. With
  `expect_turn`, a save fails (`StoreConflict`) unless the stored record is at that turn: two processes
  serving one session cannot silently overwrite each other.
* `FileStore` (for notebooks): one `.msgpack` file per session in a directory; a save writes a temporary
  file, fsyncs it, renames it over the old one (atomic on POSIX) and fsyncs the directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import sqlite3
import tempfile
import threading
from typing import Any, Protocol

import msgpack
import numpy as np

__all__ = ["FileStore", "SQLiteStore", "SessionRecord", "StateStore", "StoreConflict", "StoreError", "decode",
           "encode"]

_FORMAT, _VERSION = "aqjax-session", 1


class StoreError(ValueError):
    """A record that cannot be read (damaged, another format) or written."""


class StoreConflict(StoreError):
    """A save with `expect_turn` found the stored record at another turn (someone else advanced the session)."""


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """One session's saved state.

    Attributes:
      principal / session_id: the key.
      policy_hash: the hash of the policy the gate state was computed under.
      turn: the number of turns completed.
      gate_state: the chain's carried state for this session (a pytree of arrays, leading axis 1).
      facts: the session's policy-independent facts (JSON-like: dicts, lists, str, int, float, bool, None).
      saved_at: RFC 3339 UTC time of the save (set by the store).
    """

    principal: str
    session_id: str
    policy_hash: str
    turn: int
    gate_state: Any
    facts: dict
    saved_at: str = ""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def encode(record: SessionRecord) -> bytes:
    """The record as bytes (msgpack, sha256-sealed)."""
    from gate.policy import _encode

    arrays: dict[str, np.ndarray] = {}
    tree = _encode(record.gate_state, arrays)
    blobs = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        blobs[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    body = msgpack.packb({
        "format": _FORMAT, "version": _VERSION, "principal": record.principal, "session_id": record.session_id,
        "policy_hash": record.policy_hash, "turn": int(record.turn), "saved_at": record.saved_at,
        "facts": record.facts, "tree": tree, "arrays": blobs,
    }, use_bin_type=True)
    return msgpack.packb({"sha256": hashlib.sha256(body).hexdigest(), "body": body}, use_bin_type=True)


def decode(data: bytes) -> SessionRecord:
    """The record from `encode`'s bytes.

    Raises:
      StoreError: not a session record, another version, or damaged (the seal does not match).
    """
    from gate.policy import _decode

    try:
        outer = msgpack.unpackb(data, raw=False)
        body = outer["body"]
        if hashlib.sha256(body).hexdigest() != outer["sha256"]:
            raise StoreError("the record is damaged (sha256 mismatch)")
        d = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except StoreError:
        raise
    except Exception as e:  # msgpack raises several types on garbage
        raise StoreError(f"not a session record: {e}") from None
    if d.get("format") != _FORMAT or d.get("version") != _VERSION:
        raise StoreError(f"not a version-{_VERSION} {_FORMAT} record")
    arrays = {name: np.frombuffer(b["data"], np.dtype(b["dtype"])).reshape(b["shape"]).copy()
              for name, b in d["arrays"].items()}
    return SessionRecord(principal=d["principal"], session_id=d["session_id"], policy_hash=d["policy_hash"],
                         turn=d["turn"], gate_state=_decode(d["tree"], arrays), facts=d["facts"],
                         saved_at=d["saved_at"])


class StateStore(Protocol):
    """What `gate.session` needs from a store."""

    def load(self, principal: str, session_id: str) -> SessionRecord | None: ...

    def save(self, record: SessionRecord, *, expect_turn: int | None = None) -> SessionRecord: ...

    def delete(self, principal: str, session_id: str) -> None: ...

    def sessions(self, principal: str | None = None) -> list[tuple[str, str]]: ...


class SQLiteStore:
    """Session records in one SQLite table (WAL). Thread-safe; usable as a context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS sessions (principal TEXT NOT NULL, session_id TEXT NOT NULL, "
            "policy_hash TEXT NOT NULL, turn INTEGER NOT NULL, saved_at TEXT NOT NULL, record BLOB NOT NULL, "
            "PRIMARY KEY (principal, session_id))")

    def load(self, principal: str, session_id: str) -> SessionRecord | None:
        """The saved record, or None."""
        with self._lock:
            row = self._db.execute("SELECT record FROM sessions WHERE principal = ? AND session_id = ?",
                                   (principal, session_id)).fetchone()
        return None if row is None else decode(row[0])

    def save(self, record: SessionRecord, *, expect_turn: int | None = None) -> SessionRecord:
        """Saves atomically (one transaction); returns the record as saved (with saved_at).

        Args:
          expect_turn: when given, the stored record must be at this turn (None stored = turn 0), else
            StoreConflict and nothing is written.
        """
        record = dataclasses.replace(record, saved_at=_now())
        blob = encode(record)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if expect_turn is not None:
                    row = db.execute("SELECT turn FROM sessions WHERE principal = ? AND session_id = ?",
                                     (record.principal, record.session_id)).fetchone()
                    stored = 0 if row is None else row[0]
                    if stored != expect_turn:
                        raise StoreConflict(f"session ({record.principal!r}, {record.session_id!r}) is at turn "
                                            f"{stored}, expected {expect_turn}")
                db.execute(
                    "INSERT INTO sessions (principal, session_id, policy_hash, turn, saved_at, record) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (principal, session_id) DO UPDATE SET "
                    "policy_hash = excluded.policy_hash, turn = excluded.turn, saved_at = excluded.saved_at, "
                    "record = excluded.record",
                    (record.principal, record.session_id, record.policy_hash, record.turn, record.saved_at, blob))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return record

    def delete(self, principal: str, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE principal = ? AND session_id = ?", (principal, session_id))

    def sessions(self, principal: str | None = None) -> list[tuple[str, str]]:
        """(principal, session id) of every saved session (of one principal when given), sorted."""
        with self._lock:
            if principal is None:
                rows = self._db.execute("SELECT principal, session_id FROM sessions ORDER BY 1, 2").fetchall()
            else:
                rows = self._db.execute("SELECT principal, session_id FROM sessions WHERE principal = ? ORDER BY 2",
                                        (principal,)).fetchall()
        return [tuple(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileStore:
    """Session records as one msgpack file each under a directory (for notebooks)."""

    SUFFIX = ".msgpack"

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, principal: str, session_id: str) -> str:
        # hex of the key: any principal / session id is a safe, unique file name
        name = principal.encode().hex() + "_" + session_id.encode().hex()
        return os.path.join(self.directory, name + self.SUFFIX)

    def load(self, principal: str, session_id: str) -> SessionRecord | None:
        try:
            with open(self._path(principal, session_id), "rb") as f:
                return decode(f.read())
        except FileNotFoundError:
            return None

    def save(self, record: SessionRecord, *, expect_turn: int | None = None) -> SessionRecord:
        """Saves atomically (temporary file, fsync, rename, fsync of the directory)."""
        record = dataclasses.replace(record, saved_at=_now())
        blob = encode(record)
        path = self._path(record.principal, record.session_id)
        with self._lock:
            if expect_turn is not None:
                old = self.load(record.principal, record.session_id)
                stored = 0 if old is None else old.turn
                if stored != expect_turn:
                    raise StoreConflict(f"session ({record.principal!r}, {record.session_id!r}) is at turn {stored}, "
                                        f"expected {expect_turn}")
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=self.SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return record

    def delete(self, principal: str, session_id: str) -> None:
        try:
            os.unlink(self._path(principal, session_id))
        except FileNotFoundError:
            pass

    def sessions(self, principal: str | None = None) -> list[tuple[str, str]]:
        out = []
        for name in os.listdir(self.directory):
            if name.endswith(self.SUFFIX) and not name.startswith(".tmp-"):
                p, _, s = name[: -len(self.SUFFIX)].partition("_")
                key = (bytes.fromhex(p).decode(), bytes.fromhex(s).decode())
                if principal is None or key[0] == principal:
                    out.append(key)
        return sorted(out)
