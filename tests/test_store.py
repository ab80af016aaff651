"""Session state store: bit-for-bit round trips (SQLite and file), damage and conflicts, the policy-change rule,
and a process killed between turns (and in the middle of saving) whose next turn resumes the state."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_authority import BANK, toy

from gate import authority as A
from gate.audit import AuditLog, read_records, state_hash, verify
from gate.policy import Policy, compile_policy, load_policy
from gate.session import Governor, PolicyChanged, fresh_facts
from gate.store import FileStore, SessionRecord, SQLiteStore, StoreConflict, StoreError, decode, encode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def bank():
    return compile_policy(load_policy(BANK), toy())


def busy_state(cp):
    """A chain state (one row) whose every leaf holds something other than its initial value."""
    state = cp.gate.init(cp.arrays, 1)
    rng = np.random.default_rng(0)

    def fill(x):
        x = np.asarray(x)
        if x.dtype == bool:
            return jnp.asarray(rng.random(x.shape) < 0.5)
        if np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
        return jnp.asarray(rng.integers(-5, 1000, x.shape).astype(x.dtype))

    return jax.tree.map(fill, state)


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_round_trip_is_bit_for_bit(tmp_path, kind):
    cp = bank()
    store = SQLiteStore(tmp_path / "s.db") if kind == "sqlite" else FileStore(tmp_path / "files")
    facts = {**fresh_facts(), "ledger": [["transfer", 120]], "protected": [["confidential", "4,250,000"]],
             "history": [{"role": "user", "content": "hé ✓"}], "counters": [1, 2, 3]}
    rec = SessionRecord("bob/ü", "s 1", cp.policy_hash, 3, busy_state(cp), facts)
    saved = store.save(rec)
    back = store.load("bob/ü", "s 1")
    assert same_bits(back.gate_state, rec.gate_state) and state_hash(back.gate_state) == state_hash(rec.gate_state)
    assert back.facts == facts and back.turn == 3 and back.policy_hash == cp.policy_hash
    assert back.saved_at == saved.saved_at and back.saved_at.endswith("Z")
    assert type(back.gate_state[1]) is A.AuthorityState  # the tree keeps its gate types
    assert store.sessions() == [("bob/ü", "s 1")] and store.load("bob/ü", "other") is None
    with pytest.raises(StoreConflict, match="at turn 3, expected 2"):
        store.save(rec, expect_turn=2)
    store.save(SessionRecord("bob/ü", "s 1", cp.policy_hash, 4, rec.gate_state, facts), expect_turn=3)
    assert store.load("bob/ü", "s 1").turn == 4
    store.delete("bob/ü", "s 1")
    assert store.sessions() == []


def test_damage_and_foreign_bytes_are_detected():
    cp = bank()
    blob = bytearray(encode(SessionRecord("p", "s", cp.policy_hash, 1, busy_state(cp), fresh_facts())))
    blob[len(blob) // 2] ^= 1
    with pytest.raises(StoreError):
        decode(bytes(blob))
    with pytest.raises(StoreError, match="not a session record"):
        decode(b"hello")


def test_policy_change_rule(tmp_path):
    cp = bank()
    store = SQLiteStore(tmp_path / "s.db")
    # a session under the bank policy: two transfers, a refusal, a protected span
    auth = A.record_call(A.record_call(cp.gate.init(cp.arrays, 1)[1], 0, 1, 120), 0, 1, 200)
    state = list(cp.gate.init(cp.arrays, 1))
    state[1] = auth
    facts = {**fresh_facts(), "ledger": [["transfer", 120], ["transfer", 200]], "counters": [0, 1, 1],
             "protected": [["confidential", "4,250,000"], ["internal", "Nightingale"]]}
    store.save(SessionRecord("bob", "s1", cp.policy_hash, 2, tuple(state), facts))

    # the same policy restores the saved state as it is
    same, notes = Governor(None, toy(), cp, store).restore("bob", "s1")
    assert same_bits(same.gate_state, store.load("bob", "s1").gate_state) and notes == ()

    # a new policy version (the 'internal' label dropped, a larger budget): rebuilt from the facts, audited
    doc = load_policy(BANK).to_dict()
    doc["evidence"]["base_budget"] = 20.0
    del doc["classification"]["internal"]
    for role in doc["roles"].values():
        for key in ("data_classes", "clearances"):
            if key in role:
                role[key] = [lb for lb in role[key] if lb != "internal"]
    cp2 = compile_policy(Policy.from_dict(doc), toy())
    assert cp2.policy_hash != cp.policy_hash
    with AuditLog(tmp_path / "audit.jsonl") as log:
        rec, notes = Governor(None, toy(), cp2, store, audit=log).restore("bob", "s1")
    assert rec.policy_hash == cp2.policy_hash and rec.turn == 2
    k = cp2.kinds.index("authority")
    assert np.asarray(rec.gate_state[k].calls).tolist() == [[0, 2]]
    assert np.asarray(rec.gate_state[k].spent).tolist() == [[0, 320]]
    k = cp2.kinds.index("escalation")
    assert np.asarray(rec.gate_state[k].counters).tolist() == [[0, 1, 1]]
    assert ["confidential", "Nightingale"] in rec.facts["protected"]  # its label is gone: still protected
    assert any("rebuilt" in n for n in notes) and any("'internal' is gone" in n for n in notes)
    assert verify(tmp_path / "audit.jsonl").ok
    (note,) = list(read_records(tmp_path / "audit.jsonl"))
    assert note.finish_reason == "state_rebuilt" and note.principal == "bob" and note.session == "s1"
    assert note.state_hash_before == state_hash(store.load("bob", "s1").gate_state)
    assert note.state_hash_after == state_hash(rec.gate_state)

    with pytest.raises(PolicyChanged, match="saved under policy"):
        Governor(None, toy(), cp2, store, on_policy_change="refuse").restore("bob", "s1")
    migrated, notes = Governor(None, toy(), cp2, store, on_policy_change=lambda r, c: r).restore("bob", "s1")
    assert migrated.policy_hash == cp.policy_hash and "migrated" in notes[0]


# A worker that serves model-free turns of one session: each turn charges a transfer of 10 to the quota state and
# the ledger (as the governor does after the action-boundary check), saves, and reports the state hash.
WORKER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{here!r}, {root!r}]
    from test_authority import BANK, toy
    from gate import authority as A
    from gate.audit import state_hash
    from gate.policy import compile_policy, load_policy
    from gate.session import Governor
    from gate.store import FileStore, SQLiteStore, SessionRecord
    cp = compile_policy(load_policy(BANK), toy())
    store = SQLiteStore(sys.argv[1]) if sys.argv[2] == "sqlite" else FileStore(sys.argv[1])
    gov = Governor(None, toy(), cp, store)
    k = cp.kinds.index("authority")
    for _ in range(int(sys.argv[3])):
        rec, _ = gov.restore("bob", "s1")
        state = list(rec.gate_state)
        state[k] = A.record_call(state[k], 0, 1, 10)
        facts = dict(rec.facts, ledger=rec.facts["ledger"] + [["transfer", 10]],
                     history=rec.facts["history"] + [{{"role": "user", "content": "x" * 2000}}])
        new = SessionRecord("bob", "s1", cp.policy_hash, rec.turn + 1, tuple(state), facts)
        store.save(new, expect_turn=rec.turn)
        print("saved", new.turn, state_hash(new.gate_state), flush=True)
        time.sleep(float(sys.argv[4]))
""").format(here=HERE, root=ROOT)


def _worker(tmp_path, path, kind, turns, pause):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(path), kind, str(turns), str(pause)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_killed_between_turns_the_next_turn_resumes(tmp_path, kind):
    path = tmp_path / ("s.db" if kind == "sqlite" else "files")
    proc = _worker(tmp_path, path, kind, turns=100, pause=30.0)
    try:
        line = proc.stdout.readline()
        assert line.startswith("saved 1 "), line + proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # the process dies between turns
    finally:
        proc.wait(timeout=30)
    _, turn, saved_hash = line.split()
    # a new process serves the next turn from the stored state
    proc = _worker(tmp_path, path, kind, turns=2, pause=0.0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.split()
    assert lines[0:2] == ["saved", "2"] and lines[3:5] == ["saved", "3"]
    store = SQLiteStore(path) if kind == "sqlite" else FileStore(path)
    rec = store.load("bob", "s1")
    k = bank().kinds.index("authority")
    assert rec.turn == 3 and len(rec.facts["ledger"]) == 3
    assert np.asarray(rec.gate_state[k].calls).tolist() == [[0, 3]]
    assert np.asarray(rec.gate_state[k].spent).tolist() == [[0, 30]]
    assert saved_hash != lines[2]


@pytest.mark.parametrize("kind", ["sqlite", "file"])
def test_killed_while_saving_leaves_a_whole_record(tmp_path, kind):
    path = tmp_path / ("s.db" if kind == "sqlite" else "files")
    proc = _worker(tmp_path, path, kind, turns=10_000, pause=0.0)
    try:
        assert proc.stdout.readline().startswith("saved 1 ")
        time.sleep(0.3 + 0.4 * np.random.default_rng().random())  # somewhere in the middle of a save
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    store = SQLiteStore(path) if kind == "sqlite" else FileStore(path)
    rec = store.load("bob", "s1")  # decodes, and its seal checks
    k = bank().kinds.index("authority")
    assert rec.turn >= 1 and len(rec.facts["ledger"]) == rec.turn
    assert np.asarray(rec.gate_state[k].calls).tolist() == [[0, rec.turn]]
    if kind == "sqlite":
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    else:
        assert store.sessions() == [("bob", "s1")]
