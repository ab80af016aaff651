"""The HTTP server with the official `openai` client, on the mock model (answers worked out by hand).

The server runs in a thread (uvicorn on 127.0.0.1, a free port). The mock model answers a chat with
"abcdefghijklmnopqrstuvwxyz" and continues a text after its last character (serving/mock.py).
"""

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from gate.audit import verify
from serving.api import create_app
from serving.config import ServerConfig
from serving.engine import EngineConfig
from serving.governance import KeyRing, Principal, hash_key
from serving.service import Service

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
POLICY = """aqjax_policy: 1
name: test-deployment
levels:
  deployment:
    phrases:
      - {phrase: "qqq", action: refuse}
      - {phrase: "pqr", action: substitute}
"""
# Under it the mock's chat answer is "abcdefghijklmnopq[REDACTED] wxyz": the "r" that would complete "pqr" is
# replaced by the marker, after which the model (its last token "]") goes on with " wxyz".
ANSWER = "abcdefghijklmnopq[REDACTED] wxyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(state_dir, policy_file, **engine) -> ServerConfig:
    keys = KeyRing({
        hash_key("key-alice"): Principal("alice"),
        hash_key("key-bob"): Principal("bob", policy={"phrases": [{"phrase": "mno", "action": "substitute"}]}),
        hash_key("key-auditor"): Principal("auditor", roles=("auditor",)),
    })
    eng = dict(slots=2, max_len=256, chunk_steps=4, prefill_chunk=32, max_queue=2)
    eng.update(engine)
    return ServerConfig(host="127.0.0.1", port=free_port(), model="mock", model_name="mock", policy=str(policy_file),
                        state_dir=str(state_dir), warmup=False, default_max_tokens=64, drain_timeout=30,
                        engine=EngineConfig(**eng), keys=keys)


@contextlib.contextmanager
def running(config: ServerConfig, model=None):
    """A server in a thread; yields (service, base url) once it is ready; stops it (draining) afterwards."""
    svc = Service(config, model=model)
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            assert svc.error is None, svc.error
            time.sleep(0.05)
        yield svc, url
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serving")
    (d / "policy.yaml").write_text(POLICY)
    with running(make_config(d / "state", d / "policy.yaml")) as (svc, url):
        yield svc, url


def client(url, key="key-alice"):
    # the timeout is a hang guard: a first request that compiles on a busy machine may take minutes
    return openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0, timeout=300)


def chat(c, content="hi", **kw):
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model="mock", messages=[{"role": "user", "content": content}], **kw)


def aq(obj) -> dict:
    return obj.model_extra["aq"]


# ------------------------------------------------------------------------------------------------------ basics


def test_models_and_health(server):
    svc, url = server
    assert [m.id for m in client(url).models.list()] == ["mock"]
    assert httpx.get(url + "/health").json()["status"] == "ready"


def test_chat_completion(server):
    _, url = server
    r = chat(client(url), max_tokens=10)
    assert r.choices[0].message.content == "abcdefghij"
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.completion_tokens, r.usage.total_tokens) == (10, r.usage.prompt_tokens + 10)
    a = aq(r)
    assert a["verdict"] == "ADMIT" and a["confidence"] == 1.0 and len(a["audit_id"]) == 32


def test_streaming_chat_and_the_gate_in_it(server):
    _, url = server
    stream = chat(client(url), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == "stop"
    rules = aq(final)["rules"]
    assert [(r["text"], r["action"], r["level"]) for r in rules] == [("pqr", "substitute", "deployment")]
    assert chunks[-1].usage.completion_tokens == len(ANSWER)  # one character per token
    non_stream = chat(client(url))
    assert non_stream.choices[0].message.content == text  # streamed or not, the same answer


def test_stop_strings_and_n(server):
    _, url = server
    r = chat(client(url), stop=["fgh"], n=2, max_tokens=20)
    assert [c.message.content for c in r.choices] == ["abcde", "abcde"]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert len(aq(r)["audit_ids"]) == 2
    s = chat(client(url), stop="klm", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "abcdefghij"


def test_completions_endpoint(server):
    _, url = server
    r = client(url).completions.create(model="mock", prompt="hello", max_tokens=20, temperature=0)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("pq[REDACTED] wxyz", "stop")
    r = client(url).completions.create(model="mock", prompt="say 1", max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == "say 123456"


def test_json_schema_response_format(server):
    _, url = server
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
              "required": ["answer", "ok"], "additionalProperties": False}
    r = chat(client(url), max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}})
    # the mock wants a space after each symbol; where the schema allows none, the lowest admissible id wins
    out = json.loads(r.choices[0].message.content)
    assert out == {"answer": "no", "ok": False}
    assert r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as e:  # outside the structure gate's JSON-schema subset
        chat(client(url), response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "patternProperties": {"a": {}}}}})
    assert e.value.body["code"] == "invalid_policy"


# ------------------------------------------------------------------------------------------------------ errors


def test_errors_have_openai_shape_and_status(server):
    _, url = server
    with pytest.raises(openai.AuthenticationError):
        chat(client(url, key="wrong"))
    with pytest.raises(openai.NotFoundError) as e:
        client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(url), extra_body={"not_a_field": 1})
    assert e.value.body["param"] == "not_a_field"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(url), content="x" * 300)  # 300 prompt tokens > the 256-token context
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(url), max_tokens=250)  # the prompt + 250 > 256
    assert (e.value.body["code"], e.value.body["param"]) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError):
        chat(client(url), temperature=3)
    with pytest.raises(openai.BadRequestError) as e:  # one call per reply (serving/tools.py)
        chat(client(url), tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
             parallel_tool_calls=True)
    assert e.value.body["param"] == "parallel_tool_calls"
    # raw HTTP: bad JSON, wrong types, unknown routes and methods: always {"error": {...}}, never a 422
    h = {"Authorization": "Bearer key-alice"}
    for method, path, body, status in [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b'{"model": "mock", "messages": "hi"}', 400),
        ("POST", "/v1/chat/completions", b'{"model": "mock", "messages": []}', 400),
        ("GET", "/v1/nowhere", None, 404),
        ("DELETE", "/v1/models", None, 405),
        ("POST", "/v1/chat/completions", b'{"model": "mock"}', 400),
    ]:
        r = httpx.request(method, url + path, content=body, headers={**h, "Content-Type": "application/json"})
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_audit_records_belong_to_their_principal(server):
    svc, url = server
    r = chat(client(url), max_tokens=3)
    rid = aq(r)["audit_id"]
    mine = httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": "Bearer key-alice"})
    assert mine.status_code == 200 and mine.json()["principal"] == "alice"
    theirs = httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": "Bearer key-bob"})
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "record_not_found"
    assert httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": "Bearer key-auditor"}).status_code == 200
    assert httpx.get(f"{url}/v1/audit/head", headers={"Authorization": "Bearer key-alice"}).status_code == 403
    head = httpx.get(f"{url}/v1/audit/head", headers={"Authorization": "Bearer key-auditor"}).json()
    assert verify(svc.audit.path, anchor=head["anchor"]).ok


# ------------------------------------------------------------------------------------------------------ governance


def test_sessions_are_isolated_between_principals(server):
    _, url = server
    alice, bob = client(url), client(url, "key-bob")
    a1 = chat(alice, extra_body={"session_id": "shared-name", "session_policy": {
        "phrases": [{"phrase": "def", "action": "suppress"}]}})
    assert a1.choices[0].message.content == "abcde wxyz"  # "def" is out for this session
    b1 = chat(bob, extra_body={"session_id": "shared-name"})
    # bob's own (new) session: alice's session policy does not apply; bob's principal policy ("mno") does
    assert b1.choices[0].message.content == "abcdefghijklmn[REDACTED] wxyz"
    a2 = chat(alice, extra_body={"session_id": "shared-name"})
    assert a2.choices[0].message.content == "abcde wxyz"  # alice's session kept its policy
    h = {"Authorization": "Bearer key-alice"}
    sa = httpx.get(f"{url}/v1/sessions/shared-name", headers=h).json()
    sb = httpx.get(f"{url}/v1/sessions/shared-name", headers={"Authorization": "Bearer key-bob"}).json()
    assert (sa["turns"], len(sa["policy"])) == (2, 1) and (sb["turns"], sb["policy"]) == (1, [])
    assert sa["last_record_id"] == aq(a2)["audit_id"] and sb["last_record_id"] == aq(b1)["audit_id"]
    other = httpx.get(f"{url}/v1/sessions/only-alice", headers={"Authorization": "Bearer key-bob"})
    assert other.status_code == 404


def test_every_loosening_attempt_is_rejected_and_audited(server):
    svc, url = server
    before = svc.audit.head()[0]
    attempts = [
        {"policy": {"phrases": [{"phrase": "qqq", "action": "suppress"}]}},  # weaker than the deployment's refuse
        {"policy": {"phrases": [{"phrase": "pq", "action": "suppress"}]}},  # would preempt "pqr" (substitute)
        {"policy": {"messages": {"redaction": "nothing to see"}}},  # rewords a message
        {"policy": {"allow": ["xyz"]}},  # no key can allow anything
        {"session_id": "loose", "session_policy": {"phrases": [{"phrase": "qqq", "action": "substitute"}]}},
    ]
    for extra in attempts:
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(client(url), extra_body=extra)
        assert e.value.body["code"] == "policy_loosening", extra
    # bob's principal policy substitutes "mno": his request cannot weaken that either
    with pytest.raises(openai.PermissionDeniedError):
        chat(client(url, "key-bob"), extra_body={"policy": {"phrases": [{"phrase": "mno", "action": "suppress"}]}})
    records = list(svc.audit._log.records())[before + 1:]
    rejected = [r for r in records if r.finish_reason.startswith("rejected")]
    assert len(rejected) == len(attempts) + 1
    assert {r.principal for r in rejected} == {"alice", "bob"}
    assert httpx.get(f"{url}/v1/sessions/loose", headers={"Authorization": "Bearer key-alice"}).status_code == 404
    # tightening is fine
    r = chat(client(url), extra_body={"policy": {"phrases": [{"phrase": "cd", "action": "suppress"}]}})
    assert r.choices[0].message.content == "abc wxyz"


def test_backpressure_429_with_retry_after_and_admitted_requests_complete(server):
    svc, url = server
    limit = svc.config.engine.slots + svc.config.engine.max_queue

    async def one(c):
        body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
        return await c.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer key-alice"})

    async def burst():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c) for _ in range(4 * limit)))

    results = []
    with svc.engine.paused():  # nothing progresses while the burst arrives: exactly `limit` are admitted
        t = threading.Thread(target=lambda: results.extend(asyncio.run(burst())))
        t.start()
        deadline = time.monotonic() + 30
        while svc.engine.queue_depth < limit and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    t.join(60)
    codes = sorted(r.status_code for r in results)
    assert codes == [200] * limit + [429] * (3 * limit)
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["choices"][0]["message"]["content"] == "abcde"
    t0 = time.monotonic()
    assert chat(client(url), max_tokens=3).choices[0].message.content == "abc"
    assert time.monotonic() - t0 < 10  # a fresh request afterwards answers promptly


def test_a_client_that_disconnects_is_dropped(server):
    svc, url = server
    generated = svc.engine.generated_tokens
    with svc.engine.paused():
        stream = chat(client(url), stream=True)
        first = next(iter(stream))  # the role chunk: the request is queued, nothing generated yet
        assert first.choices[0].delta.role == "assistant"
        stream.close()  # hang up
        deadline = time.monotonic() + 30
        while not all(r.cancelled for r in svc.engine._waiting) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.engine._waiting and all(r.cancelled for r in svc.engine._waiting)
    while (svc.engine.queue_depth or svc.engine.busy_slots) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert svc.engine.queue_depth == svc.engine.busy_slots == 0
    assert svc.engine.generated_tokens == generated  # its slot went to nobody: it never generated a token


def test_a_stream_that_fails_sends_an_error_event_then_done(server):
    svc, url = server
    from serving.engine import Failed

    with svc.engine.paused():
        with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": "Bearer key-alice"},
                          json={"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                          timeout=30) as r:
            lines = r.iter_lines()
            assert json.loads(next(x for x in lines if x)[6:])["choices"][0]["delta"]["role"] == "assistant"
            req = svc.engine._waiting[0]
            req.sink(Failed("the device fell over"))  # what the engine sends when its thread dies
            events = [x[6:] for x in lines if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["type"] == "server_error" and "the device fell over" in err["message"]
    deadline = time.monotonic() + 30
    while (svc.engine.queue_depth or svc.engine.busy_slots) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert svc.engine.queue_depth == svc.engine.busy_slots == 0  # the failed call's request was dropped


# ------------------------------------------------------------------------------------------------------ logprobs


def test_chat_logprobs_in_openai_shape_stream_and_not(server):
    svc, url = server
    assert chat(client(url)).choices[0].logprobs is None  # off unless asked for
    compiled = svc.engine.compile_counts()  # the same request without logprobs compiled everything it needs
    r = chat(client(url), logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.content == ANSWER
    assert len(content) == r.usage.completion_tokens == len(ANSWER)  # one character per token
    assert "".join(c.token for c in content) == ANSWER
    for c in content:
        assert bytes(c.bytes).decode() == c.token and c.logprob <= 0 and len(c.top_logprobs) <= 3
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
    # governed: the "r" that would complete "pqr" was blocked, so it is no alternative where it was
    at = ANSWER.index("[")
    assert "r" not in [t.token for t in content[at].top_logprobs] and content[at].token == "["
    stream = list(chat(client(url), stream=True, logprobs=True, top_logprobs=2))
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]
    assert all(len(e.top_logprobs) <= 2 for e in streamed)
    for ch in stream:  # each delta carries the entries of the tokens behind its text
        if ch.choices and ch.choices[0].logprobs:
            assert "".join(e.token for e in ch.choices[0].logprobs.content) == ch.choices[0].delta.content
    assert svc.engine.compile_counts() == compiled  # logprobs recompile nothing


def test_completion_logprobs_and_bounds(server):
    _, url = server
    r = client(url).completions.create(model="mock", prompt="say 1", max_tokens=5, temperature=0, logprobs=2,
                                       echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "say 123456" and "".join(lp.tokens) == "23456"
    assert lp.text_offset == [5, 6, 7, 8, 9] and len(lp.token_logprobs) == 5
    assert all(len(top) <= 2 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    r = client(url).completions.create(model="mock", prompt="say 1", max_tokens=3, temperature=0, logprobs=0)
    assert r.choices[0].logprobs.top_logprobs == [{}, {}, {}]
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="mock", prompt="x", max_tokens=3, logprobs=6)
    with pytest.raises(openai.BadRequestError) as e:
        chat(client(url), top_logprobs=2)  # without logprobs: true, as OpenAI answers
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError):
        chat(client(url), logprobs=True, top_logprobs=21)
