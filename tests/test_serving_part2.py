"""Policies with the session-aware gates through the server: the evidence budget and escalation, per slot.

On the mock model (serving/mock.py), whose answers can be worked out by hand, with one change (`hesitant_mock`):
after "~" every token is almost as likely as "~" itself (entropy about 4.6 nats a step, against 0.09 after any
other character), so a completion of "~" spends the evidence budget fast: "~" a few times, then the
clarification (or the refusal) when the budget's thresholds are crossed.
"""

import dataclasses
import functools
import json
import threading

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from test_serving_api import ALPHABET, free_port, running

from gate import escalation as X
from gate import evidence as EV
from gate.audit import verify
from gate.core import Verdict
from serving import gating
from serving.config import ServerConfig
from serving.engine import EngineConfig, EngineRequest, Finished
from serving.governance import KeyRing, Principal, hash_key
from serving.mock import load_mock

REFUSAL = "I can't do that."
CLARIFY = "I need a document for that."
POLICY = f"""aqjax_policy: 1
name: part2-test
messages:
  refusal: "{REFUSAL}"
  clarification: "{CLARIFY}"
levels:
  deployment:
    phrases:
      - {{phrase: "secret password", action: suppress}}
tools:
  get_balance:
    description: Look up the balance of one of the customer's accounts.
    parameters:
      type: object
      properties:
        account: {{type: string, enum: [checking, savings]}}
      required: [account]
  transfer:
    description: Move money from the customer's checking account to a payee.
    parameters:
      type: object
      properties:
        to: {{type: string, enum: [savings, landlord, utility]}}
        amount: {{type: integer, minimum: 1, maximum: 10000}}
      required: [to, amount]
    quota_argument: amount
roles:
  viewer:
    tools: {{get_balance: {{}}}}
  payments:
    tools:
      get_balance: {{}}
      transfer: {{max_calls: 2, max_total: 500, arguments: {{amount: {{maximum: 300}}}}}}
  auditor:
    tools: [get_balance]
    limits: {{evidence_budget: 20}}
principals:
  alice: {{roles: [viewer]}}
  bob: {{roles: [payments]}}
  carol: {{roles: [viewer, auditor]}}
evidence:
  base_budget: 16
  per_evidence_token: 2.0
  max_budget: 400
  thresholds: {{downgrade: 0.5, clarify: 0.8, refuse: 1.0}}
escalation:
  - {{counter: refusals, at: 2, tighten: {{budget_scale: 0.5}}}}
  - {{counter: blocked, at: 3, tighten: {{forbid_tools: [transfer]}}}}
  - {{counter: violations, at: 1, tighten: {{refuse_topics: ["xyz"]}}}}
"""


def hesitant_mock():
    """The mock model, except that after "~" every token has logit 0 but "~" itself 1 (greedy: "~" again)."""
    m = load_mock()
    head = np.array(m.params["lm_head"])
    t = tilde(m.tokenizer)
    head[t] = 0.0
    head[t, t] = 1.0
    return dataclasses.replace(m, params={**m.params, "lm_head": head})


def tilde(tok) -> int:
    return tok.encode("~", parse_special=False)[0]


@pytest.fixture(scope="module")
def mock():
    return hesitant_mock()


def step_entropy(mock) -> float:
    """Nats the evidence budget is charged per step after "~"."""
    return float(EV.entropy(jnp.asarray(np.asarray(mock.params["lm_head"])[tilde(mock.tokenizer)])[None])[0])


def expected_tildes(mock, budget: float, max_new: int = 64) -> tuple[str, int]:
    """(text, verdict) of a completion of "~" under a budget: "~" until a step crosses clarify (or refuse)."""
    h = step_entropy(mock)
    for k in range(1, max_new + 1):
        f = k * h / budget
        if f >= 1.0:
            return "~" * (k - 1) + REFUSAL, Verdict.REFUSE
        if f >= 0.8:
            return "~" * (k - 1) + CLARIFY, Verdict.CLARIFY
    return "~" * max_new, Verdict.DOWNGRADE


# ------------------------------------------------------------------------------------------------------ server


def make_config(d) -> ServerConfig:
    """The test server: two slots and one prompt bucket, so that warming up compiles few programs (every server
    of this module shares them)."""
    (d / "policy.yaml").write_text(POLICY)
    keys = KeyRing({hash_key(f"key-{n}"): Principal(n) for n in ("alice", "bob", "carol", "dave")}
                   | {hash_key("key-auditor"): Principal("auditor", roles=("auditor",))})
    return ServerConfig(host="127.0.0.1", port=free_port(), model="mock", model_name="mock",
                        policy=str(d / "policy.yaml"), state_dir=str(d / "state"), warmup=True,
                        default_max_tokens=128, drain_timeout=30, keys=keys,
                        engine=EngineConfig(slots=2, max_len=512, chunk_steps=8, prefill_chunk=64, min_prompt_bucket=64,
                                            insert_rows=2, max_queue=8, logprobs=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory, mock):
    with running(make_config(tmp_path_factory.mktemp("part2")), model=mock) as (svc, url):
        yield svc, url


def run(engine, tok, requests):
    """Submits (prompt, max_new, kwargs) requests to a running engine at once; their (text, verdict) in order."""
    out, done = {}, threading.Semaphore(0)

    def sink(i, e):
        if isinstance(e, Finished):
            out[i] = e.result
            done.release()

    for i, (prompt, max_new, kw) in enumerate(requests):
        engine.submit(EngineRequest(prompt=prompt, max_new=max_new, **kw, sink=functools.partial(sink, i)))
    for _ in requests:
        assert done.acquire(timeout=60)
    return [(tok.decode(out[i].tokens), out[i].verdict) for i in range(len(requests))]


def test_rows_with_different_states_share_the_batch_without_mixing_or_recompiling(server, mock):
    """Per-slot evidence budgets and escalation states, straight into the server's (warmed-up) engine."""
    svc, _ = server
    engine, tok = svc.engine, mock.tokenizer
    compiled = engine.compile_counts()
    slot_policy = svc.book.compile(svc.book.deployment)
    chat = svc.chat_prompt([{"role": "user", "content": "hi"}])
    tildes = tok.encode("~", parse_special=False)

    def budget(b):
        return gating.host(EV.begin_turn([b]))

    def escalated(counters):
        _, _, topics = X.effects(slot_policy.compiled.policy, counters)
        return gating.host(X.begin_turn(None, [counters], [topics]))

    cases = [
        (tildes, 40, dict(policy=slot_policy, evidence_state=budget(16.0))),
        (tildes, 40, dict(policy=slot_policy, evidence_state=budget(56.0))),
        (chat, 60, dict(policy=slot_policy, escalation_state=escalated([1, 0, 0]))),  # "xyz" is a refused topic
        (chat, 60, dict(policy=slot_policy, escalation_state=escalated([0, 0, 0]))),
        (tildes, 12, {}),  # no policy: no budget
        (chat, 60, dict(policy=slot_policy)),  # a policy but no state: budget off, nothing active
    ]
    want = [expected_tildes(mock, 16.0), expected_tildes(mock, 56.0), (ALPHABET[:-1] + REFUSAL, Verdict.REFUSE),
            (ALPHABET, Verdict.ADMIT), ("~" * 12, Verdict.ADMIT), (ALPHABET, Verdict.ADMIT)]
    assert want[0] == ("~~" + CLARIFY, Verdict.CLARIFY) and want[1][0].startswith("~" * 5)
    alone = [run(engine, tok, [c])[0] for c in cases]
    assert alone == want
    for i in range(len(cases)):  # every pair shares the batch (two slots), inserted together
        pair = [cases[i], cases[(i + 1) % len(cases)]]
        assert run(engine, tok, pair) == [want[i], want[(i + 1) % len(cases)]]
    assert engine.compile_counts() == compiled  # switching policies and states recompiled nothing


def test_a_state_of_the_wrong_shape_or_without_its_rules_is_refused(server):
    svc, _ = server
    with pytest.raises(ValueError, match="needs a policy with evidence"):
        svc.engine.submit(EngineRequest(prompt=[5], max_new=1, sink=print,
                                        evidence_state=gating.initial_evidence_state()))
    with pytest.raises(ValueError, match="shapes"):
        svc.engine.submit(EngineRequest(prompt=[5], max_new=1, sink=print, policy=svc.book.compile(svc.book.deployment),
                                        escalation_state=gating.initial_escalation_state(2)))


def client(url, who="alice"):
    return openai.OpenAI(api_key=f"key-{who}", base_url=url + "/v1", max_retries=0, timeout=120)


def chat(url, who="alice", content="hi", messages=None, **kw):
    kw.setdefault("temperature", 0)
    messages = messages or [{"role": "user", "content": content}]
    return client(url, who).chat.completions.create(model="mock", messages=messages, **kw)


def complete(url, who="alice", prompt="~", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 64)
    return client(url, who).completions.create(model="mock", prompt=prompt, **kw)


def aq(obj) -> dict:
    return obj.model_extra["aq"]


def audit_record(url, rid, who="alice"):
    r = httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": f"Bearer key-{who}"})
    assert r.status_code == 200, r.text
    return r.json()


def session(url, sid, who="alice"):
    return httpx.get(f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer key-{who}"})


def test_the_evidence_budget_clarifies_and_says_so_in_aq_and_audit(server, mock):
    _, url = server
    r = complete(url)
    c = r.choices[0]
    assert (c.text, c.finish_reason) == ("~~" + CLARIFY, "content_filter")
    a = aq(r)
    assert (a["verdict"], a["finish"]) == ("CLARIFY", "clarify")
    h = step_entropy(mock)
    assert a["confidence"] == pytest.approx(1 - 3 * h / 16, abs=1e-4)
    assert a["evidence"]["budget"] == 16.0 and a["evidence"]["evidence_tokens"] == 0
    # three steps charged (the one that crossed the threshold too), none of the message's
    assert a["evidence"]["spent"] == pytest.approx(3 * h, abs=1e-3)
    kinds = {(x["kind"], x["action"]) for x in a["rules"]}
    assert {("evidence", "downgrade"), ("evidence", "clarify")} <= kinds
    assert a["escalation"] == {"counters": {"violations": 0, "refusals": 0, "blocked": 0}, "active": [],
                               "forbidden_tools": []}
    rec = audit_record(url, a["audit_id"])
    assert (rec["final_verdict"], rec["finish_reason"]) == ("CLARIFY", "clarify")
    texts = [e["rule_text"] or "" for e in rec["events"]]
    assert "evidence budget: 16 nats for 0 evidence tokens" in texts
    assert any(t == "evidence budget: clarify threshold crossed" for t in texts)
    # the principal's roles add to the budget (carol is an auditor: +20 nats)
    r = complete(url, who="carol")
    assert (r.choices[0].text, aq(r)["evidence"]["budget"]) == (expected_tildes(mock, 36.0)[0], 36.0)


def test_tool_results_count_as_evidence(server):
    _, url = server
    messages = [{"role": "user", "content": "balance?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_balance", "arguments": json.dumps({"account": "checking"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1200 EUR"}]
    r = chat(url, messages=messages, max_tokens=5)
    assert r.choices[0].message.content == ALPHABET[:5]
    ev = aq(r)["evidence"]
    assert ev["evidence_tokens"] == len("1200 EUR") and ev["budget"] == 16.0 + 2.0 * len("1200 EUR")


def test_escalation_fires_exactly_at_its_threshold_across_requests(server, mock):
    _, url = server
    sid = {"session_id": "esc-1"}
    refuse_def = {**sid, "policy": {"phrases": [{"phrase": "cde", "action": "refuse"}]}}
    h = step_entropy(mock)
    steps = []
    for turn in range(4):  # refused, answered, refused, answered
        if turn % 2 == 0:
            r = chat(url, extra_body=refuse_def)
            assert (r.choices[0].message.content, aq(r)["verdict"]) == ("abcd" + REFUSAL, "REFUSE")
        else:
            r = complete(url, extra_body=sid)
        steps.append(aq(r))
    assert [s["escalation"]["counters"]["refusals"] for s in steps] == [0, 1, 1, 2]
    halves = 'escalation: refusals >= 2 -> {"budget_scale":0.5}'
    # active from the turn after the counter reached 2 (a refusal by a phrase is a violation too: "xyz" is refused)
    assert [halves in s["escalation"]["active"] for s in steps] == [False, False, False, True]
    assert [s["escalation"]["counters"]["violations"] for s in steps] == [0, 1, 1, 2]
    # the budget halves exactly then: "~" under 16 nats clarifies after two, under 8 one step jumps past refuse
    assert steps[1]["evidence"]["budget"] == 16.0 and steps[3]["evidence"]["budget"] == 8.0
    assert steps[3]["verdict"] == "REFUSE" and expected_tildes(mock, 8.0) == ("~" + REFUSAL, Verdict.REFUSE)
    assert steps[3]["confidence"] == pytest.approx(max(0.0, 1 - 2 * h / 8), abs=1e-4)
    s = session(url, "esc-1").json()
    assert s["counters"] == {"violations": 2, "refusals": 3, "blocked": 0} and s["turns"] == 4


def test_blocked_actions_escalate_to_forbidding_a_tool(server):
    _, url = server
    named = {"type": "function", "function": {"name": "transfer"}}
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_balance", "transfer")]
    sid = {"session_id": "esc-tools"}
    calls = []
    for _ in range(4):
        r = chat(url, who="bob", tools=tools, tool_choice=named, extra_body=sid)
        calls.append((r.choices[0].finish_reason, aq(r)))
    # Each turn is blocked: the mock reaches for get_balance first (alphabetical), which the named choice masks.
    # Two transfers fit bob's quota, the third is refused in-band; from the fourth turn on transfer is forbidden.
    assert [f for f, _ in calls] == ["tool_calls"] * 2 + ["content_filter"] * 2
    assert [a["escalation"]["counters"]["blocked"] for _, a in calls] == [0, 1, 2, 3]
    assert ("quota", "tool transfer: session quota spent") in [(x["kind"], x["text"]) for x in calls[2][1]["rules"]]
    assert [a["escalation"]["forbidden_tools"] for _, a in calls] == [[], [], [], ["transfer"]]
    last = calls[3][1]
    assert {"name": "transfer", "reason": "forbidden by escalation"} in last["tools"]["unavailable"]
    assert last["tools"]["offered"] == ["get_balance"] and last["verdict"] == "REFUSE"
    assert [(x["kind"], x["text"]) for x in last["rules"]] == [
        ("authority", "tool transfer: not granted to the principal (or forbidden)")]
    # what is left may still be called
    r = chat(url, who="bob", tools=tools, tool_choice="required", extra_body=sid)
    assert r.choices[0].message.tool_calls[0].function.name == "get_balance"


def test_another_principal_never_gets_a_sessions_counters(server):
    _, url = server
    # alice's esc-1 has 3 refusals (the escalation test); carol's session of the same id is her own
    r = complete(url, who="carol", extra_body={"session_id": "esc-1"})
    assert aq(r)["escalation"]["counters"]["refusals"] == 0 and aq(r)["evidence"]["budget"] == 36.0
    assert session(url, "esc-1", who="carol").json()["turns"] == 1
    assert session(url, "esc-1", who="alice").json()["counters"]["refusals"] == 3


def test_a_restart_keeps_the_counters(tmp_path, mock):
    refuse_def = {"session_id": "s", "policy": {"phrases": [{"phrase": "cde", "action": "refuse"}]}}
    with running(make_config(tmp_path), model=mock) as (_, url):
        for _ in range(2):
            assert aq(chat(url, extra_body=refuse_def))["verdict"] == "REFUSE"
    with running(make_config(tmp_path), model=mock) as (svc, url):  # the same state directory
        r = complete(url, extra_body={"session_id": "s"})
        assert aq(r)["escalation"]["counters"]["refusals"] == 2 and aq(r)["evidence"]["budget"] == 8.0
        assert verify(svc.audit.path).ok
