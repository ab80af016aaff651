"""Audit records: canonical hashing, the append-only chain, and tamper detection (hypothesis-driven)."""

import datetime
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.audit import (
    ZERO_HASH,
    AuditError,
    AuditLog,
    AuditRecord,
    main,
    read_head,
    repair,
    state_hash,
    verify,
)
from gate.core import Action, Verdict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fields(i: int = 0, **over) -> dict:
    f = {
        "policy_hash": "ab" * 32,
        "state_hash_before": state_hash({"ac": np.array([i], np.int32)}),
        "state_hash_after": state_hash({"ac": np.array([i + 1], np.int32)}),
        "principal": "alice",
        "session": f"s{i % 2}",
        "events": [
            {"step": 0, "token": 17 + i, "token_text": " secret", "action": None, "rule": -1, "rule_text": None,
             "verdict": Verdict.ADMIT, "entropy": 2.5 + i / 7, "admissible_mass": 1.0},
            {"step": 1, "token": 99, "token_text": "[REDACTED] é\n", "action": Action.SUBSTITUTE, "rule": 2,
             "rule_text": "launch code", "verdict": "ADMIT", "entropy": np.float32(0.1), "admissible_mass": 0.75},
        ],
        "final_verdict": Verdict.ADMIT if i % 3 else "REFUSE",
        "confidence": 1 / 3,
        "finish_reason": "stop",
    }
    f.update(over)
    return f


def write_log(path, n: int) -> list:
    with AuditLog(path, fsync=False) as log:
        return [log.append(fields(i)) for i in range(n)]


# ---------------------------------------------------------------------------------------------- records


def test_append_builds_a_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:  # with fsync: the production path
        assert log.head() == (-1, ZERO_HASH)
        recs = [log.append(fields(i)) for i in range(3)]
        assert log.head() == (2, recs[-1].hash)
        assert log.get(recs[1].record_id) == recs[1]
        with pytest.raises(KeyError):
            log.get("0" * 32)
        assert list(log.records()) == recs
    assert [r.seq for r in recs] == [0, 1, 2]
    assert [r.prev_hash for r in recs] == [ZERO_HASH, recs[0].hash, recs[1].hash]
    assert all(r.hash == r.compute_hash() for r in recs)
    assert len({r.record_id for r in recs}) == 3
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and lines[:-1] == [r.canonical() for r in recs]
    assert verify(path) == (True, 3, None, "", recs[-1].hash)
    assert read_head(path) == (2, recs[-1].hash)


def test_canonical_form_rounds_floats_and_names_enums(tmp_path):
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        rec = log.append(fields(0))
    e0, e1 = rec.events
    assert rec.confidence == 0.333333 and e0["entropy"] == 2.5 and e1["entropy"] == 0.1  # float32(0.1) too
    assert (e0["verdict"], e1["action"], rec.final_verdict) == ("ADMIT", "SUBSTITUTE", "REFUSE")
    d = json.loads(rec.canonical())
    assert list(d) == sorted(d) and list(d["events"][0]) == sorted(d["events"][0])
    assert rec.canonical() == json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert "é" in rec.canonical().decode("utf-8")  # UTF-8, not \u escapes
    assert rec.time.endswith("Z") and datetime.datetime.fromisoformat(rec.time[:-1])


def test_hash_is_stable_across_float_width_and_scalar_types(tmp_path):
    same = {"record_id": "c" * 32, "time": "2025-01-31T12:00:00.000001Z"}
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as a, AuditLog(tmp_path / "b.jsonl", fsync=False) as b:
        ra = a.append(fields(0, confidence=0.7, **same))
        rb = b.append(fields(0, confidence=np.float32(0.7), **same))  # 0.699999988 in float32
        rc = b.append(fields(0, confidence=jnp.float32(0.7), **same))
    assert ra.hash == rb.hash and ra.confidence == rc.confidence == 0.7
    assert AuditRecord.from_dict(json.loads(ra.canonical())) == ra


def test_time_can_be_given_as_an_aware_datetime(tmp_path):
    t = datetime.datetime(2025, 1, 31, 13, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        assert log.append(fields(0, time=t)).time == "2025-01-31T12:00:00.000000Z"
        with pytest.raises(AuditError, match="naive"):
            log.append(fields(0, time=t.replace(tzinfo=None)))


@pytest.mark.parametrize("over,match", [
    ({"seq": 3}, "computed fields: seq"),
    ({"hash": "0" * 64}, "computed fields: hash"),
    ({"colour": "red"}, "unknown or computed fields: colour"),
    ({"final_verdict": "MAYBE"}, "final_verdict: 'MAYBE' is not a Verdict"),
    ({"policy_hash": "xyz"}, "policy_hash: expected 64"),
    ({"confidence": "high"}, "confidence: expected a number"),
    ({"events": [{"step": 0}]}, r"events\[0\]: missing token, token_text"),
    ({"time": "yesterday"}, "not RFC 3339 UTC"),
])
def test_bad_fields_are_rejected(tmp_path, over, match):
    with AuditLog(tmp_path / "a.jsonl", fsync=False) as log:
        with pytest.raises(AuditError, match=match):
            log.append(fields(0, **over))
        assert log.head() == (-1, ZERO_HASH)  # nothing was written
    assert (tmp_path / "a.jsonl").read_bytes() == b""


def test_reopening_continues_the_chain_and_one_writer_at_a_time(tmp_path):
    path = tmp_path / "a.jsonl"
    recs = write_log(path, 2)
    with AuditLog(path, fsync=False) as log:
        assert log.head() == (1, recs[-1].hash)
        with pytest.raises(AuditError, match="another AuditLog"):
            AuditLog(path)
        assert log.append(fields(5)).prev_hash == recs[-1].hash
    assert verify(path).ok and verify(path).n_records == 3


def test_torn_last_line_blocks_appends_until_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    recs = write_log(path, 3)
    good = path.read_bytes()
    path.write_bytes(good + recs[0].canonical()[:40])  # a crash mid-write
    r = verify(path)
    assert (r.ok, r.n_records, r.first_bad) == (False, 4, 3) and r.reason.startswith("torn last line")
    with AuditLog(path, fsync=False) as log:
        assert log.head() == (2, recs[-1].hash)
        with pytest.raises(AuditError, match=r"torn record.*python -m gate\.audit repair"):
            log.append(fields(3))
    assert repair(path) == 40 and path.read_bytes() == good
    assert repair(path) == 0
    with AuditLog(path, fsync=False) as log:
        assert log.append(fields(3)).seq == 3
    # A tampered record is not "repaired".
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data) + b"{")
    with pytest.raises(AuditError, match=r"cannot repair: line 1 \(seq 0\)"):
        repair(path)


def test_state_hash():
    tree = {"a": jnp.arange(6, dtype=jnp.int32).reshape(2, 3), "b": (np.ones(2, bool), np.float32(1.5))}
    h = state_hash(tree)
    assert len(h) == 64 and h == state_hash(tree)
    # Device and host copies of the same values hash the same.
    assert h == state_hash({"a": np.arange(6, dtype=np.int32).reshape(2, 3), "b": (np.ones(2, bool), np.float32(1.5))})
    assert state_hash({**tree, "a": tree["a"].reshape(3, 2)}) != h  # shape
    assert state_hash({**tree, "a": tree["a"].astype(jnp.uint32)}) != h  # dtype, same bytes
    assert state_hash({**tree, "a": tree["a"].at[0, 0].set(7)}) != h  # value
    assert state_hash((tree["b"], tree["a"])) != state_hash((tree["a"], tree["b"]))  # order
    assert state_hash(()) == state_hash({})


# ---------------------------------------------------------------------------------------------- tampering

N = 6


@functools.cache
def pristine() -> tuple[bytes, tuple[str, ...]]:
    """A log of N records (bytes) and the records' hashes, built once."""
    with tempfile.TemporaryDirectory() as d:
        recs = write_log(os.path.join(d, "a.jsonl"), N)
        return open(os.path.join(d, "a.jsonl"), "rb").read(), tuple(r.hash for r in recs)


def lines() -> list[bytes]:
    return pristine()[0].splitlines(keepends=True)


def check(tmp_path, data: bytes, first_bad: int, *, anchored: bool = False):
    path = tmp_path / "t.jsonl"
    path.write_bytes(data)
    anchor = (N - 1, pristine()[1][-1]) if anchored else None
    r = verify(path, anchor=anchor)
    assert not r.ok and r.first_bad == first_bad and r.reason, r
    return r


@settings(max_examples=150, deadline=None)
@given(k=st.integers(0, N - 1), pos=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_a_flipped_byte_is_caught_at_its_record(tmp_path_factory, k, pos, xor):
    ls = lines()
    line = bytearray(ls[k])
    line[pos % len(line)] ^= xor  # any byte of the record, its newline included
    check(tmp_path_factory.mktemp("t"), b"".join(ls[:k]) + bytes(line) + b"".join(ls[k + 1:]), k)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, N - 1))
def test_a_deleted_record_is_caught(tmp_path_factory, k):
    ls = lines()
    data = b"".join(ls[:k] + ls[k + 1:])
    d = tmp_path_factory.mktemp("t")
    r = check(d, data, k, anchored=True)
    if k < N - 1:  # from the middle: caught without an anchor too
        assert check(d, data, k).reason.startswith(f"seq is {k + 1} where {k} was expected")
    else:  # from the end: only the anchor can tell
        assert verify(d / "t.jsonl").ok and "removed from its end" in r.reason


@settings(max_examples=30, deadline=None)
@given(ij=st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True))
def test_swapped_records_are_caught(tmp_path_factory, ij):
    i, j = sorted(ij)
    ls = lines()
    ls[i], ls[j] = ls[j], ls[i]
    check(tmp_path_factory.mktemp("t"), b"".join(ls), i)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(1, 10_000))
def test_truncation_is_caught(tmp_path_factory, cut):
    data = pristine()[0]
    cut = cut % len(data)  # keep [0, cut)
    starts = np.cumsum([0] + [len(line) for line in lines()])
    k = int(np.searchsorted(starts, cut, side="right")) - 1  # the record the cut falls in (or starts)
    d = tmp_path_factory.mktemp("t")
    check(d, data[:cut], k, anchored=True)
    if cut != starts[k]:  # mid-record: a torn line, caught without an anchor
        assert check(d, data[:cut], k).reason.startswith("torn last line")


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, N - 1), new_hash=st.text("0123456789abcdef", min_size=64, max_size=64))
def test_a_replaced_hash_is_caught(tmp_path_factory, k, new_hash):
    ls = lines()
    d = json.loads(ls[k])
    if new_hash == d["hash"]:
        return
    d["hash"] = new_hash
    ls[k] = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    assert check(tmp_path_factory.mktemp("t"), b"".join(ls), k).reason.startswith("hash mismatch")


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, N - 1))
def test_a_rewritten_record_with_a_fresh_hash_breaks_the_next_link(tmp_path_factory, k):
    ls = lines()
    rec = AuditRecord.from_dict(json.loads(ls[k]))
    forged = AuditRecord.from_dict({**rec.to_dict(), "final_verdict": "ADMIT", "finish_reason": "forged"})
    forged = AuditRecord.from_dict({**forged.to_dict(), "hash": forged.compute_hash()})
    ls[k] = forged.canonical() + b"\n"
    d = tmp_path_factory.mktemp("t")
    if k < N - 1:
        assert check(d, b"".join(ls), k + 1).reason.startswith("prev_hash is not the hash of record")
    else:  # the last record: only the anchor can tell
        assert "rewritten" in check(d, b"".join(ls), k, anchored=True).reason


# ---------------------------------------------------------------------------------------------- command line


def test_cli(tmp_path, capsys):
    path = tmp_path / "a.jsonl"
    recs = write_log(path, 3)
    bad = tmp_path / "b.jsonl"
    ls = path.read_bytes().splitlines(keepends=True)
    bad.write_bytes(ls[0] + ls[2])
    script = "import sys; from gate.audit import main; sys.exit(main(sys.argv[1:]))"
    ok = subprocess.run([sys.executable, "-m", "gate.audit", "verify", str(path)], capture_output=True, text=True,
                        cwd=ROOT)
    assert ok.returncode == 0 and ok.stdout.strip() == f"OK: 3 records, head {recs[-1].hash}", ok
    fail = subprocess.run([sys.executable, "-c", script, "verify", str(bad)], capture_output=True, text=True,
                          cwd=ROOT)
    assert fail.returncode == 1 and "line 2 (seq 1): seq is 2 where 1 was expected" in fail.stdout, fail

    # The other commands in-process (cheaper than a subprocess each).
    assert main(["head", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"2 {recs[-1].hash}"
    assert main(["show", str(path), "--id", recs[1].record_id]) == 0
    assert json.loads(capsys.readouterr().out) == recs[1].to_dict()
    assert main(["show", str(path), "--id", "f" * 32]) == 1
    assert main(["verify", str(path), "--anchor", f"3:{recs[-1].hash}"]) == 1
    assert "removed from its end" in capsys.readouterr().out
