"""Server processes on the mock model: SIGTERM drains, restarts keep sessions and the audit chain, kill -9 loses
nothing that was committed. Plus the drain semantics in-process (new requests 503, running ones finish)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from test_serving_api import ANSWER, POLICY, chat, client, free_port, make_config, running

from gate.audit import read_records, verify
from serving.governance import hash_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_CYCLES = int(os.environ.get("AQJAX_KILL_CYCLES", "2"))  # raise it for a longer crash test


def write_config(d) -> str:
    (d / "policy.yaml").write_text(POLICY)
    (d / "server.toml").write_text(f"""
[server]
model = "mock"
model_name = "mock"
policy = "policy.yaml"
state_dir = "state"
warmup = false
drain_timeout = 30.0

[engine]
slots = 2
max_len = 256
chunk_steps = 4
prefill_chunk = 32
max_queue = 4

[[keys]]
sha256 = "{hash_key('key-alice')}"
principal = "alice"
""")
    return str(d / "server.toml")


class Server:
    """`python -m serving.main` in a subprocess (the JAX compilation cache is shared between restarts)."""

    def __init__(self, d, config: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(d / "jax-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONPATH=ROOT)
        self.log = open(d / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.main", "--config", config, "--port",
                                      str(self.port), "--log-level", "warning"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("persist")
    return d, write_config(d)


def test_sigterm_restarts_and_kill_9_cycles_keep_everything_committed(setup):
    d, config = setup
    audit = d / "state" / "audit.jsonl"
    h = {"Authorization": "Bearer key-alice"}

    # 1. SIGTERM drains and exits cleanly; a restart resumes the session's gate state and keeps the chain
    s1 = Server(d, config)
    extra = {"session_id": "journey", "session_policy": {"phrases": [{"phrase": "za", "action": "suppress"}]}}
    first = chat(client(s1.url), extra_body=extra)
    assert first.choices[0].message.content == ANSWER  # ends in "z": half of "za"
    committed = [first.model_extra["aq"]["audit_id"]]
    assert s1.stop() == 0
    head = verify(audit)
    assert head.ok and head.n_records >= 1

    server = Server(d, config)
    second = chat(client(server.url), extra_body={"session_id": "journey"})
    # the session resumed its gate state: "a" would complete "za" across the two turns
    assert second.choices[0].message.content == " wxyz"
    assert chat(client(server.url), extra_body={"session_id": "another"}).choices[0].message.content == ANSWER
    session = httpx.get(f"{server.url}/v1/sessions/journey", headers=h).json()
    assert (session["turns"], len(session["policy"])) == (2, 1)
    assert httpx.get(f"{server.url}/v1/audit/{committed[0]}", headers=h).json()["record_id"] == committed[0]

    # 2. kill -9 in the middle of a generation, restart, again: what a client received in full survives
    for _ in range(KILL_CYCLES):
        c = client(server.url)
        r = chat(c, extra_body={"session_id": "crashy"}, max_tokens=5)
        committed.append(r.model_extra["aq"]["audit_id"])
        stream = c.completions.create(model="mock", prompt="1", max_tokens=200, temperature=0, stream=True)
        next(iter(stream))
        server.stop(signal.SIGKILL)  # mid-generation, no drain
        stream.close()
        server = Server(d, config)
        assert verify(audit).ok
    try:
        assert set(committed) <= {r.record_id for r in read_records(audit)}
        assert httpx.get(f"{server.url}/v1/sessions/crashy", headers=h).json()["turns"] == KILL_CYCLES
        assert httpx.get(f"{server.url}/v1/sessions/journey", headers=h).json()["turns"] == 2
        assert chat(client(server.url), max_tokens=3).choices[0].message.content == "abc"
    finally:
        assert server.stop() == 0
    assert verify(audit, anchor=(head.n_records - 1, head.head)).ok  # the first chain is intact inside the last


def test_draining_answers_503_and_lets_running_requests_finish(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    with running(make_config(tmp_path / "state", tmp_path / "policy.yaml")) as (svc, url):
        results = []
        with svc.engine.paused():
            t = threading.Thread(target=lambda: results.append(
                "".join(ch.choices[0].delta.content or "" for ch in chat(client(url), stream=True) if ch.choices)))
            t.start()
            while not svc.engine.queue_depth:
                time.sleep(0.01)
            svc.begin_drain()
            with pytest.raises(openai.InternalServerError) as e:  # 503
                chat(client(url))
            assert e.value.status_code == 503 and e.value.response.headers["Retry-After"]
            assert e.value.body["code"] == "server_draining"
            health = httpx.get(url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
        assert svc.drain(timeout=30)
        t.join(30)
        assert results == [ANSWER]
        records = [json.loads(line) for line in open(svc.audit.path)]
        assert records[-1]["finish_reason"] == "stop"
