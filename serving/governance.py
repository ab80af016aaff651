"""Who is calling, which policy governs the call, and what is remembered: keys, policies, sessions, audit.

* `KeyRing`: API keys map to principals and roles. Only the keys' SHA-256 digests are configured and kept.
* `PolicyBook`: the effective policy of a call is deployment ∧ principal ∧ session ∧ request, composed with
  `Policy.merge_child` at the levels deployment, agent, session and turn; a fragment can only tighten. Merged
  and compiled policies are cached by content.
* `SessionStore`: per-(principal, session id) state in SQLite (WAL, synchronous=FULL): the session's policy
  fragments, the phrase gate's state after the last turn (with the hash of the policy it belongs to), the
  ledger of admitted tool calls (tool, quota amount), from which every turn rebuilds its quotas, the
  escalation counters (violations, refusals, blocked) and the protected spans (label, text) of the labeled
  documents the session has seen; counters and spans hold whatever the policy (they are facts about the session,
  as in `gate.session`). The key includes the principal, so a principal can never read or continue another
  principal's session. A session's reader gets the number of its protected spans, never their text.
* `AuditTrail`: the hash-chained audit log (`gate.audit.AuditLog`), with lookup restricted to the record's
  own principal.

Every method here is blocking; the server calls them from its persistence thread or a worker thread.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gate.audit import AuditLog, AuditRecord, repair, state_hash, verify
from gate.escalation import COUNTERS
from gate.phrases import PhraseState
from gate.policy import CompiledPolicy, Policy, PolicyError, compile_policy
from serving.gating import SlotPolicy

__all__ = ["AuditTrail", "KeyRing", "PolicyBook", "Principal", "SessionStore", "hash_key", "is_loosening"]


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which an API key is configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    Attributes:
      name: the principal's name (audit records and sessions are keyed by it).
      roles: e.g. ("user",), ("admin",); "admin" and "auditor" may read every audit record and the chain head.
      policy: the principal's policy fragment (merged at the "agent" level), or None.
    """

    name: str
    roles: tuple[str, ...] = ("user",)
    policy: Mapping | None = None

    @property
    def can_audit(self) -> bool:
        return bool({"admin", "auditor"} & set(self.roles))


class KeyRing:
    """API key digests -> principals."""

    def __init__(self, entries: Mapping[str, Principal]):
        for digest in entries:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"key digest {digest[:16]}... is not a lowercase SHA-256 hex digest")
        self._by_digest = dict(entries)

    def __len__(self) -> int:
        return len(self._by_digest)

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        return self._by_digest.get(hash_key(key))


# --------------------------------------------------------------------------------------------------------------
# Policies.

# What PolicyError says when a fragment is well formed but would loosen its parents (gate/policy.py). A
# fragment that merely fails to parse is a 400; one that loosens is a 403.
_LOOSENING_MARKS = ("loosen", "only tighten", "preempt", "never reword", "already set", "weaker than")


def is_loosening(err: PolicyError) -> bool:
    """Whether a merge error is an attempt to loosen the policy (as opposed to a malformed fragment)."""
    return any(mark in err.reason for mark in _LOOSENING_MARKS)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class PolicyBook:
    """Builds and compiles effective policies (thread-safe, cached by content).

    Args:
      deployment: the deployment policy (its file may carry any level).
      tokenizer: compile for this tokenizer.
      vocab_size: the model's logits width.
    """

    def __init__(self, deployment: Policy, tokenizer, vocab_size: int | None = None):
        self.deployment = deployment
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._merged: OrderedDict[tuple, Policy] = OrderedDict()
        self._slot: OrderedDict[str, SlotPolicy] = OrderedDict()

    def effective(self, principal: Principal, session_fragments: Sequence[Mapping] = (),
                  request_fragment: Mapping | None = None) -> Policy:
        """deployment ∧ principal ∧ session ∧ request. Raises PolicyError (see `is_loosening`)."""
        policy = self.deployment
        steps = [("agent", principal.policy, f"principal {principal.name}")]
        steps += [("session", f, "session policy") for f in session_fragments]
        steps.append(("turn", request_fragment, "request policy"))
        for level, fragment, source in steps:
            if not fragment:
                continue
            key = (policy.hash, level, _canonical(fragment))
            with self._lock:
                hit = self._merged.get(key)
            if hit is None:
                hit = policy.merge_child(level, dict(fragment), source=source)
                with self._lock:
                    self._merged[key] = hit
                    while len(self._merged) > 256:
                        self._merged.popitem(last=False)
            policy = hit
        return policy

    def compile(self, policy: Policy) -> SlotPolicy:
        """The policy compiled for the model, as a slot policy for the engine (cached by policy hash)."""
        with self._lock:
            hit = self._slot.get(policy.hash)
            if hit is not None:
                self._slot.move_to_end(policy.hash)
                return hit
        compiled: CompiledPolicy = compile_policy(policy, self._tokenizer, vocab_size=self._vocab_size)
        slot = SlotPolicy.from_compiled(compiled)  # UnsupportedPolicy: a gate the engine cannot enforce
        with self._lock:
            self._slot[policy.hash] = slot
            while len(self._slot) > 64:
                self._slot.popitem(last=False)
        return slot


# --------------------------------------------------------------------------------------------------------------
# Sessions.


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pack_state(state: PhraseState) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ac=np.asarray(state.ac), forced_rule=np.asarray(state.forced_rule),
             forced_pos=np.asarray(state.forced_pos))
    return buf.getvalue()


def _unpack_state(blob: bytes) -> PhraseState:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return PhraseState(ac=z["ac"], forced_rule=z["forced_rule"], forced_pos=z["forced_pos"])


@dataclasses.dataclass(frozen=True)
class Session:
    """A principal's session.

    Attributes:
      principal / session_id: the key.
      fragments: session-level policy fragments, in the order they were added.
      turns: committed turns.
      state_policy_hash: the policy the saved phrase state belongs to (None: no state yet).
      phrase_state: the phrase gate's state after the last turn (numpy, leading axis 1), or None.
      last_record_id / last_verdict: the last turn's audit record and verdict.
      created / updated: RFC 3339 UTC times.
      ledger: the admitted tool calls, [tool name, quota amount] each, oldest first.
      counters: the escalation counters after the last turn (`gate.escalation.COUNTERS` order).
      protected: the protected spans, (label, text) each, in the order they joined.
    """

    principal: str
    session_id: str
    fragments: tuple = ()
    turns: int = 0
    state_policy_hash: str | None = None
    phrase_state: PhraseState | None = None
    last_record_id: str | None = None
    last_verdict: str | None = None
    created: str = ""
    updated: str = ""
    ledger: tuple = ()
    counters: tuple = (0, 0, 0)
    protected: tuple = ()

    def public(self) -> dict:
        return {"id": self.session_id, "object": "aq.session", "turns": self.turns, "policy": list(self.fragments),
                "state_policy_hash": self.state_policy_hash, "last_record_id": self.last_record_id,
                "last_verdict": self.last_verdict, "created": self.created, "updated": self.updated,
                "tool_calls": [{"name": t, "amount": a} for t, a in self.ledger],
                "counters": dict(zip(COUNTERS, self.counters, strict=True)),
                "protected_spans": len(self.protected)}


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    principal TEXT NOT NULL,
    session_id TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    fragments TEXT NOT NULL DEFAULT '[]',
    state_policy_hash TEXT,
    phrase_state BLOB,
    last_record_id TEXT,
    last_verdict TEXT,
    ledger TEXT NOT NULL DEFAULT '[]',
    counters TEXT NOT NULL DEFAULT '[0,0,0]',
    protected TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (principal, session_id)
)
"""


class SessionStore:
    """Sessions in SQLite (WAL journal, synchronous=FULL: a committed turn survives a crash)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(sessions)")}
        if "ledger" not in columns:  # a store written before tool calls
            self._db.execute("ALTER TABLE sessions ADD COLUMN ledger TEXT NOT NULL DEFAULT '[]'")
        if "counters" not in columns:  # a store written before escalation
            self._db.execute("ALTER TABLE sessions ADD COLUMN counters TEXT NOT NULL DEFAULT '[0,0,0]'")
        if "protected" not in columns:  # a store written before disclosure control
            self._db.execute("ALTER TABLE sessions ADD COLUMN protected TEXT NOT NULL DEFAULT '[]'")

    def get(self, principal: str, session_id: str) -> Session | None:
        with self._lock:
            row = self._db.execute(
                "SELECT created, updated, turns, fragments, state_policy_hash, phrase_state, last_record_id, "
                "last_verdict, ledger, counters, protected FROM sessions WHERE principal = ? AND session_id = ?",
                (principal, session_id)).fetchone()
        if row is None:
            return None
        created, updated, turns, fragments, sph, blob, rid, verdict, ledger, counters, protected = row
        return Session(principal, session_id, tuple(json.loads(fragments)), turns, sph,
                       None if blob is None else _unpack_state(blob), rid, verdict, created, updated,
                       tuple(tuple(e) for e in json.loads(ledger)), tuple(int(c) for c in json.loads(counters)),
                       tuple(tuple(e) for e in json.loads(protected)))

    def add_fragment(self, principal: str, session_id: str, fragment: Mapping) -> Session:
        """Appends a session-level policy fragment (the caller has checked that it merges)."""
        now = _now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT fragments FROM sessions WHERE principal = ? AND session_id = ?",
                                       (principal, session_id)).fetchone()
                fragments = [] if row is None else json.loads(row[0])
                fragments.append(dict(fragment))
                self._db.execute(
                    "INSERT INTO sessions (principal, session_id, created, updated, fragments) "
                    "VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (principal, session_id) DO UPDATE SET fragments = excluded.fragments, "
                    "updated = excluded.updated", (principal, session_id, now, now, _canonical(fragments)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self.get(principal, session_id)

    def add_protected(self, principal: str, session_id: str, spans: Sequence[Sequence[str]]) -> None:
        """Appends protected spans (label, text) to the session's set (creating the session), skipping known ones.

        Called when a turn with labeled documents is admitted, before it generates: a span stays protected in the
        session's later turns even if this one never completes."""
        now = _now()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT protected FROM sessions WHERE principal = ? AND session_id = ?",
                                       (principal, session_id)).fetchone()
                protected = [] if row is None else json.loads(row[0])
                for label, text in spans:
                    if [label, text] not in protected:
                        protected.append([str(label), str(text)])
                self._db.execute(
                    "INSERT INTO sessions (principal, session_id, created, updated, protected) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (principal, session_id) DO UPDATE SET protected = excluded.protected, "
                    "updated = excluded.updated", (principal, session_id, now, now, _canonical(protected)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def commit_turn(self, principal: str, session_id: str, policy_hash: str | None, phrase_state: PhraseState | None,
                    record_id: str | None, verdict: str | None, tool_call: tuple[str, int] | None = None,
                    counters: Sequence[int] | None = None) -> None:
        """Records a finished turn: the phrase state to resume from, its audit record, the tool call it made
        (appended to the session's ledger) and the escalation counters after it (None: unchanged), in one
        transaction."""
        now = _now()
        blob = None if phrase_state is None else _pack_state(phrase_state)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT ledger, counters FROM sessions WHERE principal = ? AND session_id = ?",
                                       (principal, session_id)).fetchone()
                ledger = [] if row is None else json.loads(row[0])
                if tool_call is not None:
                    ledger.append([str(tool_call[0]), int(tool_call[1])])
                if counters is None:
                    counters = [0] * len(COUNTERS) if row is None else json.loads(row[1])
                self._db.execute(
                    "INSERT INTO sessions (principal, session_id, created, updated, turns, state_policy_hash, "
                    "phrase_state, last_record_id, last_verdict, ledger, counters) "
                    "VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (principal, session_id) DO UPDATE SET turns = turns + 1, "
                    "updated = excluded.updated, state_policy_hash = excluded.state_policy_hash, "
                    "phrase_state = excluded.phrase_state, last_record_id = excluded.last_record_id, "
                    "last_verdict = excluded.last_verdict, ledger = excluded.ledger, counters = excluded.counters",
                    (principal, session_id, now, now, policy_hash, blob, record_id, verdict, _canonical(ledger),
                     _canonical([int(c) for c in counters])))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------------------------
# Audit.


class AuditTrail:
    """The server's audit log. Opening it repairs a torn last line (a crash mid-write) if everything before
    it verifies; any other damage refuses to start."""

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = os.fspath(path)
        self.repaired = 0
        if os.path.exists(self.path) and not verify(self.path).ok:
            self.repaired = repair(self.path)  # raises AuditError unless only the last line is torn
        self._log = AuditLog(self.path, fsync=fsync)

    def append(self, fields: Mapping[str, Any]) -> AuditRecord:
        return self._log.append(fields)

    def head(self) -> tuple[int, str]:
        return self._log.head()

    def get(self, record_id: str, principal: Principal) -> AuditRecord | None:
        """The record if it exists and the principal may read it (its own, or any for admins/auditors)."""
        if len(record_id) != 32 or any(c not in "0123456789abcdef" for c in record_id):
            return None
        try:
            rec = self._log.get(record_id)
        except KeyError:
            return None
        if rec.principal != principal.name and not principal.can_audit:
            return None
        return rec

    def rejection(self, principal: Principal, session: str | None, policy: Policy, reason: str) -> AuditRecord:
        """Audits a request refused before generation (e.g. an attempt to loosen the policy)."""
        empty = state_hash(())
        return self.append({
            "policy_hash": policy.hash, "state_hash_before": empty, "state_hash_after": empty,
            "principal": principal.name, "session": session, "events": [], "final_verdict": "REFUSE",
            "confidence": 1.0, "finish_reason": f"rejected: {reason}"[:500],
        })

    def close(self) -> None:
        self._log.close()
