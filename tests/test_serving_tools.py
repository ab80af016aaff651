"""Tool calls through the server (serving/tools.py), with the official `openai` client, on the mock model.

Under a required call the mock model's choices can be worked out by hand (serving/mock.py): where the call
grammar leaves a choice, the mock prefers its successor token, then the space, then the lowest token id. So it
picks the tool (and enum value) whose first letter comes first in the alphabet among those the gate admits, and
writes integers as 1, 12, 123, ... as long as the gate admits them. That makes the gate's choices visible: the
mock names the unauthorized tool whenever the gate would let it.
"""

import json

import httpx
import numpy as np
import openai
import pytest
from test_serving_api import ALPHABET, free_port, running

from gate import authority as A
from gate.audit import verify
from gate.policy import compile_policy, parse_policy
from serving import tools
from serving.config import ServerConfig
from serving.engine import Engine, EngineConfig, EngineRequest, Finished
from serving.gating import SlotPolicy, authority_row
from serving.governance import KeyRing, Principal, hash_key
from serving.mock import load_mock
from serving.schemas import ChatMessage

REFUSAL = "No can do."
TOOLS_POLICY = f"""aqjax_policy: 1
name: tools
messages: {{refusal: "{REFUSAL}"}}
levels:
  deployment:
    phrases:
      - {{phrase: "qqq", action: refuse}}
tools:
  close_account:
    description: Close an account.
    parameters:
      type: object
      properties:
        account: {{type: string, enum: [checking, savings]}}
      required: [account]
  get_balance:
    description: Look up a balance.
    parameters:
      type: object
      properties:
        account: {{type: string, enum: [checking, savings]}}
      required: [account]
  transfer:
    description: Move money.
    parameters:
      type: object
      properties:
        to: {{type: string, enum: [savings, landlord, utility]}}
        amount: {{type: integer, minimum: 1, maximum: 10000}}
      required: [to, amount]
    quota_argument: amount
roles:
  viewer: {{tools: [get_balance]}}
  payments:
    tools:
      get_balance: {{}}
      transfer: {{max_calls: 2, max_total: 500, arguments: {{amount: {{maximum: 300}}}}}}
  closer: {{tools: [close_account]}}
principals:
  alice: {{roles: [viewer]}}
  bob: {{roles: [payments]}}
  dave: {{roles: [closer]}}
"""
# the mock's call of each tool (see the module docstring): enums take their alphabetically first value, the
# amount grows digit by digit while it stays within bob's maximum of 300
BALANCE = {"account": "checking"}
TRANSFER = {"to": "landlord", "amount": 123}
TOOLS = [{"type": "function", "function": {"name": n, "description": "", "parameters": {"type": "object"}}}
         for n in ("close_account", "get_balance", "transfer")]


def spec(*names):
    return [t for t in TOOLS if t["function"]["name"] in names]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    (d / "policy.yaml").write_text(TOOLS_POLICY)
    keys = KeyRing({hash_key(f"key-{n}"): Principal(n) for n in ("alice", "bob", "carol")}
                   | {hash_key("key-auditor"): Principal("auditor", roles=("auditor",))})
    cfg = ServerConfig(host="127.0.0.1", port=free_port(), model="mock", model_name="mock",
                       policy=str(d / "policy.yaml"), state_dir=str(d / "state"), warmup=False,
                       default_max_tokens=120, drain_timeout=30, keys=keys,
                       engine=EngineConfig(slots=2, max_len=512, chunk_steps=8, prefill_chunk=64, max_queue=4))
    with running(cfg) as (svc, url):
        yield svc, url


def client(url, who="bob"):
    return openai.OpenAI(api_key=f"key-{who}", base_url=url + "/v1", max_retries=0, timeout=300)


def ask(url, who="bob", content="hi", **kw):
    kw.setdefault("temperature", 0)
    return client(url, who).chat.completions.create(model="mock", messages=[{"role": "user", "content": content}],
                                                    **kw)


def aq(obj) -> dict:
    return obj.model_extra["aq"]


def the_call(r):
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    return call.function.name, json.loads(call.function.arguments)


def audit_record(url, rid, who="bob"):
    r = httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": f"Bearer key-{who}"})
    assert r.status_code == 200
    return r.json()


# ------------------------------------------------------------------------------------------------------ calls


def test_an_authorized_call_comes_back_in_openai_shape(server):
    _, url = server
    r = ask(url, tools=spec("get_balance", "transfer"), tool_choice="required")
    assert the_call(r) == ("get_balance", BALANCE)
    a = aq(r)
    assert a["verdict"] == "ADMIT" and a["finish"] == "tool_call"
    assert a["tools"]["call"] == {"name": "get_balance", "arguments": BALANCE}
    assert a["tools"]["mode"] == "required" and a["tools"]["offered"] == ["get_balance", "transfer"]
    rec = audit_record(url, a["audit_id"])
    assert rec["finish_reason"] == "tool_call" and rec["final_verdict"] == "ADMIT"
    texts = [e["rule_text"] or "" for e in rec["events"]]
    assert 'action boundary: admitted get_balance {"account": "checking"}' in texts
    assert any(t.startswith("tools: mode required, offered get_balance, transfer") for t in texts)


def test_the_call_and_its_result_go_back_into_the_conversation(server):
    svc, url = server
    c = client(url)
    messages = [{"role": "user", "content": "balance?"}]
    r = c.chat.completions.create(model="mock", messages=messages, tools=spec("get_balance"),
                                  tool_choice="required", temperature=0)
    msg = r.choices[0].message
    messages += [msg.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "1200 EUR"}]
    again = c.chat.completions.create(model="mock", messages=messages, tools=spec("get_balance"), tool_choice="none",
                                      temperature=0, max_tokens=5)
    assert again.choices[0].message.content == ALPHABET[:5] and again.choices[0].message.tool_calls is None
    # what the model was shown: the call as it writes calls, the result in a <tool_response> block (SmolLM2-style
    # fallback: the mock's template knows no tools)
    rendered, specs = tools.conversation([ChatMessage(**m) for m in messages], None, svc.book.deployment,
                                         knows_tools=False)
    assert specs is None
    assert rendered[1] == {"role": "assistant",
                           "content": '<tool_call>{"name": "get_balance", "arguments": {"account": "checking"}}'
                                      '</tool_call>'}
    assert rendered[2] == {"role": "user", "content": "<tool_response>\n1200 EUR\n</tool_response>"}


def test_the_request_narrows_the_grant(server):
    _, url = server
    # bob may call get_balance too, and the mock would pick it first: offering only transfer forbids it
    r = ask(url, tools=spec("transfer"), tool_choice="required")
    assert the_call(r) == ("transfer", TRANSFER)


def test_an_unauthorized_tool_never_comes_back(server):
    svc, url = server
    # close_account sorts first, so the mock would call it if the gate let it
    r = ask(url, who="alice", tools=spec("close_account", "get_balance", "transfer") + [
        {"type": "function", "function": {"name": "delete_everything"}}], tool_choice="required")
    assert the_call(r) == ("get_balance", BALANCE)
    assert aq(r)["tools"]["unavailable"] == [
        {"name": "close_account", "reason": "not granted to 'alice'"},
        {"name": "transfer", "reason": "not granted to 'alice'"},
        {"name": "delete_everything", "reason": "not defined by the policy"}]
    # a call that only an unauthorized tool could satisfy is refused before generation, and audited
    head = httpx.get(f"{url}/v1/audit/head", headers={"Authorization": "Bearer key-auditor"}).json()["seq"]
    for who, kw in [("alice", dict(tools=spec("transfer"), tool_choice="required")),
                    ("alice", dict(tools=spec("get_balance", "close_account"),
                                   tool_choice={"type": "function", "function": {"name": "close_account"}})),
                    ("carol", dict(tools=spec("get_balance"), tool_choice="required"))]:  # not in the policy
        with pytest.raises(openai.PermissionDeniedError) as e:
            ask(url, who=who, **kw)
        err = e.value.body
        assert (err["code"], err["param"], err["type"]) == ("tool_not_permitted", "tool_choice", "permission_error")
    after = httpx.get(f"{url}/v1/audit/head", headers={"Authorization": "Bearer key-auditor"}).json()
    assert after["seq"] == head + 3 and verify(svc.audit.path, anchor=after["anchor"]).ok
    # auto with nothing available is a plain answer
    r = ask(url, who="carol", tools=spec("get_balance"), max_tokens=4)
    assert r.choices[0].message.content == "abcd" and aq(r)["tools"]["mode"] == "none"


def test_tool_choice_named_none_and_auto(server):
    _, url = server
    named = {"type": "function", "function": {"name": "transfer"}}
    assert the_call(ask(url, tools=spec("get_balance", "transfer"), tool_choice=named)) == ("transfer", TRANSFER)
    r = ask(url, tools=spec("get_balance", "transfer"), tool_choice="none", max_tokens=6)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ALPHABET[:6], "length")
    assert r.choices[0].message.tool_calls is None and aq(r)["tools"]["mode"] == "none"
    # auto (the default with tools): the reply may be a call; the mock starts with "a", so it is text
    r = ask(url, tools=spec("get_balance"))
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (ALPHABET, "stop")
    assert aq(r)["tools"]["mode"] == "auto" and aq(r)["tools"]["call"] is None


def test_quota_exhaustion_in_a_session_refuses_the_next_call(server):
    _, url = server
    named = {"type": "function", "function": {"name": "transfer"}}
    for _ in range(2):  # bob: at most 2 transfers per session
        r = ask(url, tools=spec("transfer"), tool_choice=named, extra_body={"session_id": "pay-1"})
        assert the_call(r) == ("transfer", TRANSFER)
    r = ask(url, tools=spec("transfer"), tool_choice=named, extra_body={"session_id": "pay-1"})
    assert r.choices[0].message.content == REFUSAL and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "content_filter"
    a = aq(r)
    assert a["verdict"] == "REFUSE" and [x["kind"] for x in a["rules"]] == ["quota"]
    assert "transfer" in a["rules"][0]["text"]
    s = httpx.get(f"{url}/v1/sessions/pay-1", headers={"Authorization": "Bearer key-bob"}).json()
    assert s["tool_calls"] == [{"name": "transfer", "amount": 123}] * 2
    # quotas are per session: another session may transfer again
    assert the_call(ask(url, tools=spec("transfer"), tool_choice=named,
                        extra_body={"session_id": "pay-2"})) == ("transfer", TRANSFER)


def test_the_quota_total_caps_the_amount(server):
    _, url = server
    named = {"type": "function", "function": {"name": "transfer"}}
    sid = {"session_id": "pay-total"}
    assert the_call(ask(url, tools=spec("transfer"), tool_choice=named, extra_body=sid))[1]["amount"] == 123
    # 500 - 123 = 377 left, bob's maximum 300 per call: still 123
    assert the_call(ask(url, tools=spec("transfer"), tool_choice=named, extra_body=sid))[1]["amount"] == 123


def test_a_call_cut_short_becomes_a_refusal(server):
    _, url = server
    r = ask(url, tools=spec("get_balance"), tool_choice="required", max_tokens=20)
    assert r.choices[0].message.content == REFUSAL and r.choices[0].message.tool_calls is None
    a = aq(r)
    assert a["verdict"] == "REFUSE" and a["finish"] == "refused"
    assert a["tools"]["refusal_reason"] == "the reply is not one well-formed tool call"
    assert [x["kind"] for x in a["rules"]] == ["tool_call"]
    # streamed: the partial call never reaches the client, only the refusal
    chunks = list(ask(url, tools=spec("get_balance"), tool_choice="required", max_tokens=20, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REFUSAL
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_streaming_a_call(server):
    _, url = server
    chunks = list(ask(url, tools=spec("get_balance", "transfer"), tool_choice="required", stream=True,
                      stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1
    d = deltas[0]
    assert (d.index, d.type, d.function.name) == (0, "function", "get_balance") and d.id.startswith("call_")
    assert json.loads(d.function.arguments) == BALANCE
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == "tool_calls" and aq(final)["tools"]["call"]["name"] == "get_balance"
    assert chunks[-1].usage.completion_tokens > 0
    # text that is no call streams as usual under auto
    chunks = list(ask(url, tools=spec("get_balance"), stream=True, max_tokens=5))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ALPHABET[:5]


# ------------------------------------------------------------------------------------------------------ errors


def test_malformed_tool_requests_get_400_in_openai_shape(server):
    _, url = server
    named_other = {"type": "function", "function": {"name": "transfer"}}
    cases = [
        (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools.0.function.name"),
        (dict(tools=[{"type": "retrieval"}]), "tools.0.type"),
        (dict(tools=[]), "tools"),
        (dict(tools=spec("get_balance") * 2), "tools"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
        (dict(tools=spec("get_balance"), tool_choice="sometimes"), "tool_choice"),
        (dict(tools=spec("get_balance"), tool_choice={"type": "function"}), "tool_choice"),
        (dict(tools=spec("get_balance"), tool_choice=named_other), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=spec("get_balance"), parallel_tool_calls=True), "parallel_tool_calls"),
        (dict(tools=spec("get_balance"), tool_choice="required", n=2), "n"),
        (dict(tools=spec("get_balance"), tool_choice="required", response_format={"type": "json_object"}), "tools"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            ask(url, **kw)
        err = e.value.body
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", kw
        assert err["param"] == param, (kw, err)
    # parallel_tool_calls false is what the server does anyway
    assert the_call(ask(url, tools=spec("get_balance"), tool_choice="required", parallel_tool_calls=False))[0] \
        == "get_balance"
    # a tool call in the history whose arguments are no JSON object
    bad = [{"role": "user", "content": "hi"},
           {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "get_balance", "arguments": "[1]"}}]}]
    with pytest.raises(openai.BadRequestError) as e:
        client(url).chat.completions.create(model="mock", messages=bad)
    assert e.value.body["param"] == "messages.1.tool_calls.0.function.arguments"


# ------------------------------------------------------------------------------------------------------ engine


def test_authority_tables_of_different_sizes_share_the_batch():
    """A small tool policy padded to a larger one's envelope makes the same call as on its own."""
    m = load_mock()
    tok = m.tokenizer
    big = SlotPolicy.from_compiled(compile_policy(parse_policy(TOOLS_POLICY), tok))
    small = SlotPolicy.from_compiled(compile_policy(parse_policy(TOOLS_POLICY.replace("""  close_account:
    description: Close an account.
    parameters:
      type: object
      properties:
        account: {type: string, enum: [checking, savings]}
      required: [account]
""", "").replace("  closer: {tools: [close_account]}\n", "").replace("  dave: {roles: [closer]}\n", "")), tok))
    assert small.envelope() != big.envelope()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    cfg = EngineConfig(slots=2, max_len=256, chunk_steps=8, prefill_chunk=64, min_prompt_bucket=32,
                       min_active_slots=2)

    def run(engine, *reqs):
        out = {}
        for i, (policy, state) in enumerate(reqs):
            engine.submit(EngineRequest(prompt=prompt, max_new=100, policy=policy, authority_state=state,
                                        sink=lambda e, i=i: out.__setitem__(i, e.result) if isinstance(e, Finished)
                                        else None))
        while len(out) < len(reqs):
            engine.step()
        return [(tok.decode(out[i].tokens), out[i].verdict) for i in range(len(reqs))]

    bob_small = authority_row(small, principal=1, mode=A.REQUIRED)  # small: alice, bob; big: alice, bob, dave
    alone = Engine(m.cfg, m.params, cfg, stop_ids=tok.stop_ids, eos_id=tok.eos_id)
    [expected] = run(alone, (small, bob_small))
    assert expected == ('<tool_call>{"name": "get_balance", "arguments": {"account": "checking"}}</tool_call>', 0)
    shared = Engine(m.cfg, m.params, cfg, stop_ids=tok.stop_ids, eos_id=tok.eos_id)
    shared.fit_policy(big)
    spent = authority_row(big, principal=1, mode=A.REQUIRED, named=2, calls=[0, 0, 2])  # transfer's quota spent
    got = run(shared, (small, bob_small), (big, spent), (None, None))
    assert got[0] == expected
    assert got[1] == (REFUSAL, 4)  # REFUSE
    assert got[2] == (ALPHABET, 0)  # no policy: the slot's gates are off
    assert np.asarray(spent.calls).shape == (1, 32)


def test_a_session_store_from_before_tool_calls_gets_a_ledger(tmp_path):
    import sqlite3

    from serving.governance import SessionStore

    db = sqlite3.connect(tmp_path / "s.sqlite3")
    db.execute("CREATE TABLE sessions (principal TEXT NOT NULL, session_id TEXT NOT NULL, created TEXT NOT NULL, "
               "updated TEXT NOT NULL, turns INTEGER NOT NULL DEFAULT 0, fragments TEXT NOT NULL DEFAULT '[]', "
               "state_policy_hash TEXT, phrase_state BLOB, last_record_id TEXT, last_verdict TEXT, "
               "PRIMARY KEY (principal, session_id))")
    db.execute("INSERT INTO sessions (principal, session_id, created, updated, turns) VALUES ('bob', 's', 't', 't', 3)")
    db.commit()
    db.close()
    store = SessionStore(tmp_path / "s.sqlite3")
    assert store.get("bob", "s").ledger == () and store.get("bob", "s").turns == 3
    store.commit_turn("bob", "s", None, None, None, "ADMIT", ("transfer", 120))
    store.commit_turn("bob", "s", None, None, None, "ADMIT")
    store.commit_turn("bob", "s", None, None, None, "ADMIT", ("get_balance", 0))
    s = store.get("bob", "s")
    assert s.ledger == (("transfer", 120), ("get_balance", 0)) and s.turns == 6
    assert tools.ledger_usage(s.ledger) == ({"transfer": 1, "get_balance": 1}, {"transfer": 120, "get_balance": 0})
    store.close()


def test_growing_the_table_keeps_an_authority_row():
    """A slot's authority entry padded on the device to a larger envelope (the engine growing its table while
    serving) equals the entry built for that envelope directly."""
    import jax

    from serving import gating

    tok = load_mock().tokenizer
    V = tok.vocab_size
    small_policy = parse_policy(TOOLS_POLICY.replace("  dave: {roles: [closer]}\n", "").replace(
        "      transfer: {max_calls: 2, max_total: 500, arguments: {amount: {maximum: 300}}}\n", ""))
    small = SlotPolicy.from_compiled(compile_policy(small_policy, tok))
    big = SlotPolicy.from_compiled(compile_policy(parse_policy(TOOLS_POLICY), tok))
    env_small = gating.complete(small.envelope(), V)
    env_big = gating.complete(env_small.union(big.envelope()), V)
    assert env_big != env_small
    row = gating.row_policy(small, env_small, V)
    grown = gating.grow_table(jax.tree.map(np.asarray, row), env_big, V)
    direct = gating.row_policy(small, env_big, V)
    assert jax.tree.structure(grown) == jax.tree.structure(direct)
    for a, b in zip(jax.tree.leaves(grown), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
