"""Tamper-evident audit records: one JSON line per governed turn, hash-chained.

Each record carries the SHA-256 of its predecessor (`prev_hash`, 64 zeros for the first) and its own hash over
its canonical JSON without the `hash` field. The canonical form is UTF-8 JSON with sorted keys and no
whitespace, floats rounded to 6 significant digits first (so a value that went through float32 on one
machine and float64 on another hashes the same), and every line of the file is exactly the canonical form of
its record, `hash` included. So `verify` catches:

* a changed byte anywhere: the line no longer parses, or is not canonical, or its hash no longer matches;
* a deleted, inserted or reordered record: `seq` (the 0-based position) or the `prev_hash` link breaks there;
* a modified hash: it no longer matches the content, or the next record's `prev_hash`;
* a truncated file: the last line is torn (no final newline).

Removing whole records from the *end* leaves a shorter chain that is valid on its own; no file-only check can
tell. That is what `head()` is for: publish or store (seq, hash) elsewhere and pass it back as `anchor`, and
`verify` fails when the anchored record is missing or differs.

Writes are append-only: `AuditLog` holds an exclusive `flock` on the file for its lifetime (one writer), reads
the head once when it opens, and writes each record with one `write` on an O_APPEND descriptor followed by
fsync. A crash mid-write leaves at most a torn last line; `AuditLog` then refuses to append (a record after
it would be unverifiable) until `python -m gate.audit repair FILE` drops it, which it does only when every
record before it verifies.

Command line:

    python -m gate.audit verify FILE [--anchor SEQ:HASH]   exit 0 "OK: N records, head HASH", else exit 1
    python -m gate.audit head FILE                         prints "SEQ HASH" (-1 and zeros when empty)
    python -m gate.audit show FILE [--id RECORD_ID]        records as indented JSON
    python -m gate.audit repair FILE                       drops a torn last line (only that)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import struct
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from gate.core import Action, Verdict

__all__ = [
    "EVENT_FIELDS",
    "RECORD_FIELDS",
    "ZERO_HASH",
    "AuditError",
    "AuditLog",
    "AuditRecord",
    "VerifyResult",
    "canonical_json",
    "read_head",
    "read_records",
    "repair",
    "state_hash",
    "verify",
]

ZERO_HASH = "0" * 64
EVENT_FIELDS = (
    "step", "token", "token_text", "action", "rule", "rule_text", "verdict", "entropy", "admissible_mass",
)
RECORD_FIELDS = (
    "record_id", "seq", "prev_hash", "time", "policy_hash", "state_hash_before", "state_hash_after", "principal",
    "session", "events", "final_verdict", "confidence", "finish_reason", "hash",
)
# What `append` computes itself; `record_id` and `time` may be given, the rest must be.
_COMPUTED = ("seq", "prev_hash", "hash")
_OPTIONAL_INPUT = ("record_id", "time", "principal", "session")

_HEX = re.compile(r"[0-9a-f]*")
_RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NONFINITE = {"NaN", "Infinity", "-Infinity"}


class AuditError(ValueError):
    """A record with bad fields, or a log that cannot be appended to (torn, damaged, locked)."""


# --------------------------------------------------------------------------------------------------------------
# Hashing.


def _round6(x: float) -> float | str:
    if not math.isfinite(x):  # JSON has no NaN / Infinity; keep them as distinct, stable strings
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return float(f"{x:.6g}")


def canonical_json(value) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace (the form records are hashed and stored in)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def state_hash(tree) -> str:
    """sha256 (hex) over every leaf of a pytree, in tree order: its dtype, its shape and its bytes.

    Leaves are copied to the host (this synchronizes with the device). Bytes are taken little-endian and
    C-contiguous, so the hash does not depend on the machine or on the array's layout.
    """
    import jax
    import numpy as np

    leaves = jax.tree.leaves(tree)
    h = hashlib.sha256(b"aqjax-state-v1\0")
    h.update(struct.pack("<q", len(leaves)))
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header = f"{a.dtype.name}[{','.join(map(str, a.shape))}]".encode()
        h.update(struct.pack("<q", len(header)))
        h.update(header)
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Records.


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _scalar(value):
    """numpy / jax scalars and 0-d arrays -> Python scalars; everything else unchanged."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _text(value, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise AuditError(f"{where}: expected a string, got {type(value).__name__}")
    return _SURROGATE.sub("\ufffd", value)  # lone surrogates cannot be written as UTF-8


def _int(value, where: str) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise AuditError(f"{where}: expected an integer, got {type(value).__name__}")
    return value


def _float(value, where: str) -> float | str:
    value = _scalar(value)
    if isinstance(value, str) and value in _NONFINITE:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AuditError(f"{where}: expected a number, got {type(value).__name__}")
    return _round6(float(value))


def _enum_name(value, cls: type[enum.IntEnum], where: str, *, optional: bool = False) -> str | None:
    value = _scalar(value)
    if value is None and optional:
        return None
    if isinstance(value, str) and value.upper() in cls.__members__:
        return value.upper()
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return cls(value).name
        except ValueError:
            pass
    raise AuditError(f"{where}: {value!r} is not a {cls.__name__} (one of {', '.join(cls.__members__)})")


def _hex(value, where: str, digits: int = 64) -> str:
    if not isinstance(value, str) or len(value) != digits or not _HEX.fullmatch(value):
        raise AuditError(f"{where}: expected {digits} lowercase hex digits, got {value!r}")
    return value


def _check_names(d: Mapping, expected: tuple[str, ...], where: str) -> None:
    missing = [k for k in expected if k not in d]
    extra = [str(k) for k in d if k not in expected]
    problems = [f"missing {', '.join(missing)}"] if missing else []
    problems += [f"unknown {', '.join(extra)}"] if extra else []
    if problems:
        raise AuditError(f"{where}: {'; '.join(problems)}")


def _event(e, where: str) -> dict:
    if not isinstance(e, Mapping):
        raise AuditError(f"{where}: an event must be a mapping, got {type(e).__name__}")
    _check_names(e, EVENT_FIELDS, where)
    return {
        "step": _int(e["step"], f"{where}.step"),
        "token": _int(e["token"], f"{where}.token"),
        "token_text": _text(e["token_text"], f"{where}.token_text"),
        "action": _enum_name(e["action"], Action, f"{where}.action", optional=True),
        "rule": _int(e["rule"], f"{where}.rule"),
        "rule_text": _text(e["rule_text"], f"{where}.rule_text", optional=True),
        "verdict": _enum_name(e["verdict"], Verdict, f"{where}.verdict"),
        "entropy": _float(e["entropy"], f"{where}.entropy"),
        "admissible_mass": _float(e["admissible_mass"], f"{where}.admissible_mass"),
    }


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One governed turn.

    Attributes:
      record_id: uuid4 hex.
      seq: 0-based position in the chain.
      prev_hash: the previous record's hash (ZERO_HASH for the first).
      time: RFC 3339 UTC, e.g. 2025-01-31T12:00:00.123456Z.
      policy_hash: the compiled policy's hash.
      state_hash_before, state_hash_after: `state_hash` of the gate state at the start and end of the turn.
      principal, session: who and which conversation (optional).
      events: one dict per governed step, keys EVENT_FIELDS (`verdict` and `action` are names).
      final_verdict: the turn's verdict name.
      confidence: the turn's reported confidence.
      finish_reason: why the turn ended ("stop", "length", "refused", ...).
      hash: sha256 of the canonical JSON of every other field.
    """

    record_id: str
    seq: int
    prev_hash: str
    time: str
    policy_hash: str
    state_hash_before: str
    state_hash_after: str
    principal: str | None
    session: str | None
    events: tuple[dict, ...]
    final_verdict: str
    confidence: float | str
    finish_reason: str
    hash: str

    def to_dict(self) -> dict:
        d = {f: getattr(self, f) for f in RECORD_FIELDS}
        d["events"] = [dict(e) for e in self.events]
        return d

    def canonical(self) -> bytes:
        """The record's line in the log (without the newline)."""
        return canonical_json(self.to_dict())

    def compute_hash(self) -> str:
        d = self.to_dict()
        del d["hash"]
        return hashlib.sha256(canonical_json(d)).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping) -> AuditRecord:
        """Validates and canonicalizes a record's fields (numbers rounded, enums as names).

        Raises:
          AuditError: a field is missing, unknown or of the wrong type.
        """
        if not isinstance(d, Mapping):
            raise AuditError(f"a record must be a JSON object, got {type(d).__name__}")
        _check_names(d, RECORD_FIELDS, "record")
        return cls(**_fields(d, hash_=_hex(d["hash"], "hash")))


def _fields(d: Mapping, *, hash_: str) -> dict:
    events = d["events"]
    if isinstance(events, (str, bytes, Mapping)) or not hasattr(events, "__iter__"):
        raise AuditError(f"events: expected a list, got {type(events).__name__}")
    seq = _int(d["seq"], "seq")
    if seq < 0:
        raise AuditError(f"seq: {seq} is negative")
    time = _text(d["time"], "time")
    if not _RFC3339_UTC.fullmatch(time):
        raise AuditError(f"time: {time!r} is not RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.ffffff]Z)")
    return dict(
        record_id=_hex(d["record_id"], "record_id", 32),
        seq=seq,
        prev_hash=_hex(d["prev_hash"], "prev_hash"),
        time=time,
        policy_hash=_hex(d["policy_hash"], "policy_hash"),
        state_hash_before=_hex(d["state_hash_before"], "state_hash_before"),
        state_hash_after=_hex(d["state_hash_after"], "state_hash_after"),
        principal=_text(d["principal"], "principal", optional=True),
        session=_text(d["session"], "session", optional=True),
        events=tuple(_event(e, f"events[{i}]") for i, e in enumerate(events)),
        final_verdict=_enum_name(d["final_verdict"], Verdict, "final_verdict"),
        confidence=_float(d["confidence"], "confidence"),
        finish_reason=_text(d["finish_reason"], "finish_reason"),
        hash=hash_,
    )


def _time(value) -> str:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise AuditError("time: a naive datetime is ambiguous; give it a timezone")
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


# --------------------------------------------------------------------------------------------------------------
# Checking one line.


class _Bad(Exception):
    pass


def _check_line(line: bytes, k: int, prev_hash: str | None) -> AuditRecord:
    """The record on line k (0-based), or raises _Bad(reason).

    `prev_hash` is the hash of record k - 1; None skips the chain checks (seq and prev_hash).
    """
    if not line.endswith(b"\n"):
        raise _Bad(f"torn last line: {len(line)} bytes without a newline (a crash mid-write, or the file was "
                   "truncated)")
    body = line[:-1]
    if not body:
        raise _Bad("empty line")
    try:
        d = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _Bad(f"not a JSON record ({e})") from None
    try:
        rec = AuditRecord.from_dict(d)
    except AuditError as e:
        raise _Bad(f"malformed record: {e}") from None
    if rec.canonical() != body:
        raise _Bad("not in canonical form (the line was edited)")
    if rec.compute_hash() != rec.hash:
        raise _Bad("hash mismatch: the record's content does not match its hash (modified)")
    if prev_hash is None:
        return rec
    if rec.seq != k:
        raise _Bad(f"seq is {rec.seq} where {k} was expected: records before it are missing, inserted or reordered")
    if rec.prev_hash != prev_hash:
        which = "ZERO_HASH (it is the first record)" if k == 0 else f"the hash of record {k - 1}"
        raise _Bad(f"prev_hash is not {which}: the chain is broken here")
    return rec


def _lines(f) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line with its newline) for each line of a binary file."""
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


# --------------------------------------------------------------------------------------------------------------
# Verifying.


class VerifyResult(NamedTuple):
    """What `verify` found.

    Attributes:
      ok: every record verifies (and the anchor, if given, is in the chain).
      n_records: lines in the file (a torn last line counts).
      first_bad: 0-based index (= expected seq; its line is first_bad + 1) of the first record that fails,
        or None.
      reason: why it fails ("" when ok).
      head: hash of the last record when ok (ZERO_HASH for an empty log), else None.
    """

    ok: bool
    n_records: int
    first_bad: int | None
    reason: str
    head: str | None = None


def _parse_anchor(anchor) -> tuple[int, str] | None:
    if anchor is None:
        return None
    if isinstance(anchor, str):
        seq, sep, h = anchor.partition(":")
        if not sep:
            raise AuditError(f"anchor {anchor!r}: expected SEQ:HASH")
        anchor = (seq, h)
    seq, h = anchor
    try:
        seq = int(seq)
    except (TypeError, ValueError):
        raise AuditError(f"anchor seq {seq!r} is not an integer") from None
    return seq, _hex(h, "anchor hash")


def verify(path: str | os.PathLike, *, anchor: tuple[int, str] | str | None = None) -> VerifyResult:
    """Checks a log's every line, its chain and (optionally) that it still contains an anchored head.

    Args:
      path: the JSONL file.
      anchor: (seq, hash) or "SEQ:HASH" of a head seen earlier (`AuditLog.head()`); catches records removed from
        the end, which nothing inside the file can reveal.

    Returns:
      a `VerifyResult`; `first_bad` is the first record whose check fails, in the order: parses, is well-formed,
      is canonical, matches its hash, has the expected seq, links to the previous hash.
    """
    anchor = _parse_anchor(anchor)
    prev, n, bad, reason = ZERO_HASH, 0, None, ""
    anchor_hash = None
    with open(path, "rb") as f:
        for k, (_, line) in enumerate(_lines(f)):
            n = k + 1
            if bad is not None:
                continue  # count the remaining lines only
            try:
                rec = _check_line(line, k, prev)
            except _Bad as e:
                bad, reason = k, str(e)
                continue
            prev = rec.hash
            if anchor is not None and k == anchor[0]:
                anchor_hash = rec.hash
    if bad is not None:
        return VerifyResult(False, n, bad, reason)
    if anchor is not None:
        seq, h = anchor
        if seq >= n:
            return VerifyResult(False, n, n, f"the anchored head (seq {seq}, hash {h}) is missing: the log ends after "
                                             f"{n} records, so records were removed from its end")
        if anchor_hash != h:
            return VerifyResult(False, n, seq, f"record {seq} has hash {anchor_hash}, but the anchor says {h}: the log "
                                               "was rewritten from this record on")
    return VerifyResult(True, n, None, "", prev)


def read_records(path: str | os.PathLike) -> Iterator[AuditRecord]:
    """The records of a log, in order, checking each line's form and hash (not the chain: use `verify`)."""
    with open(path, "rb") as f:
        for k, (_, line) in enumerate(_lines(f)):
            try:
                yield _check_line(line, k, None)
            except _Bad as e:
                raise AuditError(f"{os.fspath(path)}:{k + 1}: {e}") from None


def repair(path: str | os.PathLike) -> int:
    """Drops a torn last line (from a crash mid-write) after checking every record before it.

    Returns:
      the number of bytes removed (0 when the log was intact).

    Raises:
      AuditError: some other record is bad: that is evidence of tampering or damage, not something to repair.
    """
    result = verify(path)
    if result.ok:
        return 0
    torn = result.first_bad == result.n_records - 1 and result.reason.startswith("torn last line")
    if not torn:
        raise AuditError(f"{os.fspath(path)}: cannot repair: line {result.first_bad + 1} (seq {result.first_bad}) "
                         f"is bad: {result.reason}")
    with open(path, "rb+") as f:
        offset = 0
        for k, (off, _) in enumerate(_lines(f)):
            if k == result.first_bad:
                offset = off
                break
        size = f.seek(0, os.SEEK_END)
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    return size - offset


# --------------------------------------------------------------------------------------------------------------
# Appending.


class AuditLog:
    """An append-only, hash-chained JSONL log with a single writer (see the module docstring).

    Usable as a context manager; `close()` releases the file lock.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        """Opens (or creates) the log, takes its lock and reads its head.

        Args:
          path: the JSONL file.
          fsync: fsync after each record (turn off only in tests).

        Raises:
          AuditError: another AuditLog holds the file, or its last record is damaged.
        """
        self.path = os.fspath(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise AuditError(f"{self.path}: another AuditLog (this or another process) is writing it") from None
            raise
        if created and fsync:
            _fsync_dir(self.path)
        self._broken: str | None = None
        try:
            self._seq, self._hash = self._read_head()
        except BaseException:
            self.close()
            raise

    def _read_head(self) -> tuple[int, str]:
        seq, h, torn = _tail_head(self._fd, self.path)
        if torn:
            self._broken = (
                f"{self.path} ends with a torn record ({torn} bytes without a newline, probably a crash mid-write), "
                f"so nothing can be appended after it. Check the records before it with `python -m gate.audit verify "
                f"{self.path}`, then drop the torn line with `python -m gate.audit repair {self.path}`"
            )
        return seq, h

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record; (-1, ZERO_HASH) when the log is empty."""
        with self._lock:
            return self._seq, self._hash

    def append(self, record_fields: Mapping[str, Any]) -> AuditRecord:
        """Appends a record, computing `seq`, `prev_hash` and `hash` (and `record_id`, `time` when absent).

        Args:
          record_fields: policy_hash, state_hash_before, state_hash_after, events, final_verdict, confidence,
            finish_reason; optionally principal, session, record_id, time (RFC 3339 UTC string or an aware
            datetime). Verdicts and actions may be enums, ints or names; numbers may be numpy / jax scalars.

        Returns:
          the record as written.

        Raises:
          AuditError: a bad field, or a log that cannot take records (torn last line, failed write, closed).
        """
        if self._broken:
            raise AuditError(self._broken)
        extra = [k for k in record_fields if k not in RECORD_FIELDS or k in _COMPUTED]
        if extra:
            raise AuditError(f"unknown or computed fields: {', '.join(map(str, extra))} (seq, prev_hash and hash "
                             "are computed by the log)")
        missing = [k for k in RECORD_FIELDS if k not in record_fields and k not in _COMPUTED + _OPTIONAL_INPUT]
        if missing:
            raise AuditError(f"missing fields: {', '.join(missing)}")
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"{self.path}: the log is closed")
            if self._broken:
                raise AuditError(self._broken)
            d = {
                "principal": None,
                "session": None,
                **record_fields,
                "record_id": record_fields.get("record_id") or uuid.uuid4().hex,
                "time": _time(record_fields.get("time") or _now()),
                "seq": self._seq + 1,
                "prev_hash": self._hash,
            }
            rec = AuditRecord(**_fields(d, hash_=ZERO_HASH))
            rec = dataclasses.replace(rec, hash=rec.compute_hash())
            line = rec.canonical() + b"\n"
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
                if self._fsync:
                    os.fsync(self._fd)
            except OSError as e:
                self._broken = (f"{self.path}: a write failed ({e}); the last line may be torn. Run "
                                f"`python -m gate.audit repair {self.path}` and reopen the log")
                raise AuditError(self._broken) from e
            self._seq, self._hash = rec.seq, rec.hash
            return rec

    def get(self, record_id: str) -> AuditRecord:
        """The record with this id (a linear scan of the file).

        Raises:
          KeyError: no such record.
        """
        needle = f'"record_id":"{record_id}"'.encode()
        with open(self.path, "rb") as f:
            for k, (_, line) in enumerate(_lines(f)):
                if needle in line:
                    try:
                        return _check_line(line, k, None)
                    except _Bad as e:
                        raise AuditError(f"{self.path}:{k + 1}: {e}") from None
        raise KeyError(record_id)

    def records(self) -> Iterator[AuditRecord]:
        """Every record, in order (form and hash checked per line; `verify` checks the chain)."""
        return read_records(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # releases the flock
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1


def _tail_head(fd: int, path: str) -> tuple[int, str, int]:
    """(seq, hash, torn bytes) of a log's last complete record, reading backwards from the end.

    Checks that record's form and hash (not the chain). (-1, ZERO_HASH, torn) when there is none.
    """
    size = os.fstat(fd).st_size
    tail, chunk = b"", 1 << 16
    while size:  # grow the window until it holds the last complete line and the newline before it
        start = max(0, size - len(tail) - chunk)
        tail = os.pread(fd, size - len(tail) - start, start) + tail
        body = tail[: tail.rfind(b"\n") + 1]  # through the last newline (b"" when none)
        cut = body.rfind(b"\n", 0, len(body) - 1) if body else -1
        if cut >= 0 or start == 0:
            break
        chunk *= 2
    if not size or not body:
        return -1, ZERO_HASH, len(tail)
    last = body[cut + 1:]
    try:
        rec = _check_line(last, 0, None)
    except _Bad as e:
        raise AuditError(f"{path}: the last record is damaged ({e}); run `python -m gate.audit verify {path}`") \
            from None
    return rec.seq, rec.hash, len(tail) - len(body)


def read_head(path: str | os.PathLike) -> tuple[int, str]:
    """(seq, hash) of a log's last complete record, without reading the whole file; (-1, ZERO_HASH) if empty.

    Raises:
      AuditError: the last record is damaged.
    """
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        seq, h, _ = _tail_head(fd, os.fspath(path))
    finally:
        os.close(fd)
    return seq, h


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Command line.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gate.audit", description="Inspect aqjax audit logs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="check every record and the chain")
    p.add_argument("file")
    p.add_argument("--anchor", metavar="SEQ:HASH", help="a head seen earlier; fails if it is no longer in the log")
    p = sub.add_parser("head", help="print the last record's seq and hash")
    p.add_argument("file")
    p = sub.add_parser("show", help="print records as JSON")
    p.add_argument("file")
    p.add_argument("--id", help="only the record with this record_id")
    p = sub.add_parser("repair", help="drop a torn last line (only if every record before it verifies)")
    p.add_argument("file")
    args = parser.parse_args(argv)

    try:
        if args.command == "verify":
            r = verify(args.file, anchor=args.anchor)
            if r.ok:
                print(f"OK: {r.n_records} records, head {r.head}")
                return 0
            print(f"FAIL: {args.file}: line {r.first_bad + 1} (seq {r.first_bad}): {r.reason}")
            return 1
        if args.command == "head":
            seq, h = read_head(args.file)
            print(f"{seq} {h}")
            return 0
        if args.command == "show":
            found = False
            for rec in read_records(args.file):
                if args.id is None or rec.record_id == args.id:
                    print(json.dumps(rec.to_dict(), indent=2, ensure_ascii=False))
                    found = True
            if args.id is not None and not found:
                print(f"{args.file}: no record {args.id}", file=sys.stderr)
                return 1
            return 0
        removed = repair(args.file)
        print(f"repaired: dropped a torn last line ({removed} bytes)" if removed else "nothing to repair")
        return 0
    except (OSError, AuditError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
