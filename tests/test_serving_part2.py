"""Policies with the part-2 gates through the server (evidence budget, grounding of figures, disclosure control,
escalation), per slot, with the official `openai` client.

The deployment policy is policies/bank.yaml with two additions for the tests: a principal `dave` whose role reads
public documents only, and "xyz" among the topics refused once a session has three violations (the mock model
writes "xyz"; it cannot write "wire transfer"). Principals: alice (viewer: cleared for public only), bob
(payments: public and internal), carol (viewer + auditor: every label, +20 nats of evidence budget), dave
(teller: reads public documents only).

On the mock model (serving/mock.py), whose answers can be worked out by hand, with one change (`hesitant_mock`):
after "~" every token is almost as likely as "~" itself (entropy about 4.6 nats a step, against 0.09 after any
other character), so a completion of "~" spends the evidence budget fast: "~" a few times, then the
clarification (or the refusal) when the budget's thresholds are crossed. A chat answer is "abc...z"; a completion
of "x2" is "3456789..." as far as the gates let it (digits are their successors), so it tries to write a figure.
"""

import dataclasses
import functools
import json
import os
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
from gate.grounding import build_trie
from serving import context, gating
from serving.config import ServerConfig
from serving.engine import EngineConfig, EngineRequest, Finished
from serving.governance import KeyRing, Principal, hash_key
from serving.mock import load_mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "policies", "bank.yaml"), encoding="utf-8") as _f:
    BANK = _f.read()
TELLER = """  teller:                           # test only: reads public documents only
    tools: {get_balance: {}}
    data_classes: [public]
    clearances: [public]

principals:
  dave: {roles: [teller]}
"""
assert BANK.count("\nprincipals:\n") == 1 and BANK.count('refuse_topics: ["wire transfer"]') == 1
POLICY = BANK.replace("\nprincipals:\n", "\n" + TELLER).replace('refuse_topics: ["wire transfer"]',
                                                                  'refuse_topics: ["wire transfer", "xyz"]')
REFUSAL = "I can't do that."
CLARIFY = "I don't have enough information to answer that. Could you share the relevant document?"
WITHHELD = "[withheld]"
SECRET = {"text": "the code name is qrstuv", "label": "confidential", "spans": ["qrstuv"]}
# alice's chat answer when "qrstuv" is protected from her: the "v" that would complete it is replaced
REDACTED = f"abcdefghijklmnopqrstu{WITHHELD} wxyz"


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
    of this module shares them); small per-slot span and trie tables, so their limits are easy to reach."""
    (d / "policy.yaml").write_text(POLICY)
    keys = KeyRing({hash_key(f"key-{n}"): Principal(n) for n in ("alice", "bob", "carol", "dave", "erin")}
                   | {hash_key("key-auditor"): Principal("auditor", roles=("auditor",))})
    return ServerConfig(host="127.0.0.1", port=free_port(), model="mock", model_name="mock",
                        policy=str(d / "policy.yaml"), state_dir=str(d / "state"), warmup=True,
                        default_max_tokens=128, drain_timeout=30, keys=keys,
                        engine=EngineConfig(slots=2, max_len=512, chunk_steps=8, prefill_chunk=64, min_prompt_bucket=64,
                                            insert_rows=2, max_queue=8, logprobs=False, protected_spans=8,
                                            protected_chars=8, evidence_nodes=128))


@pytest.fixture(scope="module")
def server(tmp_path_factory, mock):
    with running(make_config(tmp_path_factory.mktemp("part2")), model=mock) as (svc, url):
        yield svc, url


def client(url, who="alice"):
    return openai.OpenAI(api_key=f"key-{who}", base_url=url + "/v1", max_retries=0, timeout=300)


def chat(url, who="alice", content="hi", messages=None, **kw):
    kw.setdefault("temperature", 0)
    messages = messages or [{"role": "user", "content": content}]
    return client(url, who).chat.completions.create(model="mock", messages=messages, **kw)


def complete(url, who="alice", prompt="~", **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 128)
    return client(url, who).completions.create(model="mock", prompt=prompt, **kw)


def aq(obj) -> dict:
    return obj.model_extra["aq"]


def audit_record(url, rid, who="alice"):
    r = httpx.get(f"{url}/v1/audit/{rid}", headers={"Authorization": f"Bearer key-{who}"})
    assert r.status_code == 200, r.text
    return r.json()


def session(url, sid, who="alice"):
    return httpx.get(f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer key-{who}"})


def docs(*items, session_id=None):
    body = {"documents": list(items)}
    return body if session_id is None else {**body, "session_id": session_id}


# ------------------------------------------------------------------------------------------------------ engine


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
    """Per-slot budgets, escalation states, protected spans and evidence tries, and two policies of the same
    envelope, straight into the server's (warmed-up) engine: each row alone, then every pair in one batch."""
    svc, _ = server
    engine, tok = svc.engine, mock.tokenizer
    compiled = engine.compile_counts()
    bank = svc.book.compile(svc.book.deployment)
    stricter = svc.book.compile(svc.book.effective(Principal("alice"), (), {"phrases": [
        {"phrase": "cde", "action": "refuse"}]}))
    assert engine._env.covers(stricter.envelope())  # noqa: SLF001 (the same envelope: switching costs nothing)
    hi = svc.chat_prompt([{"role": "user", "content": "hi"}])
    tildes, x2 = tok.encode("~", parse_special=False), tok.encode("x2", parse_special=False)

    def budget(b):
        return gating.host(EV.begin_turn([b]))

    def escalated(counters):
        _, _, topics = X.effects(bank.compiled.policy, counters)
        return gating.host(X.begin_turn(None, [counters], [topics]))

    def turn(principal, **kw):
        return context.prepare(bank, principal, tokenizer=tok, sizes=engine.sizes, **kw)

    secret = [context.Document(SECRET["text"], "confidential", spans=tuple(SECRET["spans"]))]
    figure = [context.Document("balance 3456", "public")]
    cases = [
        (tildes, 128, dict(policy=bank, evidence_state=budget(16.0))),
        (tildes, 128, dict(policy=bank, evidence_state=budget(56.0))),
        (hi, 60, dict(policy=bank, escalation_state=escalated([3, 0, 0]))),  # "xyz" is a refused topic now
        (hi, 60, dict(policy=bank, escalation_state=escalated([2, 0, 0]))),
        (hi, 60, dict(policy=bank, disclosure_state=turn("alice", documents=secret).disclosure_state)),
        (hi, 60, dict(policy=bank, disclosure_state=turn("carol", documents=secret).disclosure_state)),
        (x2, 12, dict(policy=bank, grounding_state=turn("alice", documents=figure, said=["x2"]).grounding_state)),
        (x2, 12, dict(policy=bank, grounding_state=turn("alice", said=["x2"]).grounding_state)),
        (tildes, 12, {}),  # no policy: no budget
        (x2, 12, {}),  # no policy: no grounding
        (hi, 60, dict(policy=stricter)),  # another policy of the same envelope, and no state: budget off
    ]
    want = [expected_tildes(mock, 16.0), expected_tildes(mock, 56.0), (ALPHABET[:-1] + REFUSAL, Verdict.REFUSE),
            (ALPHABET, Verdict.ADMIT), (REDACTED, Verdict.ADMIT), (ALPHABET, Verdict.ADMIT),
            ("3456 wxyz", Verdict.ADMIT), (" wxyz", Verdict.ADMIT), ("~" * 12, Verdict.ADMIT),
            ("345678901234", Verdict.ADMIT), ("abcd" + REFUSAL, Verdict.REFUSE)]
    assert want[0] == ("~~" + CLARIFY, Verdict.CLARIFY) and want[1][0].startswith("~" * 9 + "I")
    alone = [run(engine, tok, [c])[0] for c in cases]
    assert alone == want
    for i in range(len(cases)):  # every pair shares the batch (two slots), inserted together
        j = (i + 1) % len(cases)
        assert run(engine, tok, [cases[i], cases[j]]) == [want[i], want[j]]
    assert engine.compile_counts() == compiled  # switching policies and states recompiled nothing


def test_a_state_of_the_wrong_shape_or_without_its_rules_is_refused(server):
    svc, _ = server
    with pytest.raises(ValueError, match="needs a policy with evidence"):
        svc.engine.submit(EngineRequest(prompt=[5], max_new=1, sink=print,
                                        evidence_state=gating.initial_evidence_state()))
    with pytest.raises(ValueError, match="shapes"):
        svc.engine.submit(EngineRequest(prompt=[5], max_new=1, sink=print, policy=svc.book.compile(svc.book.deployment),
                                        grounding_state=gating.initial_grounding_state(1, gating.StateSizes(nodes=64))))


# ------------------------------------------------------------------------------------------------------ documents


def test_a_protected_span_never_reaches_an_uncleared_principal_and_stays_protected(server):
    _, url = server
    r = chat(url, extra_body=docs(SECRET, session_id="span-1"))
    assert r.choices[0].message.content == REDACTED
    a = aq(r)
    assert a["disclosure"] == {"protected_spans": 1, "active": 1}
    assert a["documents"] == {"used": [{"index": 0, "label": "confidential", "kind": "document"}], "withheld": []}
    assert [(x["kind"], x["action"]) for x in a["rules"]] == [("disclosure", "substitute")]
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(url, stream=True, extra_body=docs(SECRET))
                       if c.choices)
    assert streamed == REDACTED
    # cleared principals get it: carol (confidential), and bob for an internal document
    assert chat(url, who="carol", extra_body=docs(SECRET)).choices[0].message.content == ALPHABET
    internal = {**SECRET, "label": "internal"}
    assert chat(url, who="bob", extra_body=docs(internal)).choices[0].message.content == ALPHABET
    assert chat(url, who="bob", extra_body=docs(SECRET)).choices[0].message.content == REDACTED
    # later turns of the session, without the document: still protected; another session: not
    r = chat(url, extra_body={"session_id": "span-1"})
    assert r.choices[0].message.content == REDACTED and aq(r)["disclosure"]["protected_spans"] == 1
    assert "documents" not in aq(r)
    assert chat(url, extra_body={"session_id": "span-2"}).choices[0].message.content == ALPHABET
    s = session(url, "span-1")
    assert s.json()["protected_spans"] == 1 and "qrstuv" not in s.text  # the session never shows the span
    rec = audit_record(url, a["audit_id"])
    assert "disclosure: 1 protected spans in the session (1 new), 1 protected from this principal" in [
        e["rule_text"] for e in rec["events"]]


def test_a_confidential_figure_never_appears_for_an_uncleared_principal(server):
    _, url = server
    balance = {"text": "the balance is 3456 EUR", "label": "confidential"}  # its figure is protected (4 digits)
    assert complete(url, who="carol", prompt="x2", max_tokens=12, extra_body=docs(balance)).choices[0].text \
        == "3456 wxyz"
    # alice: grounding leaves the figure out of her evidence, so it cannot even begin (the model wanted "3")
    r = complete(url, prompt="x2", max_tokens=12, extra_body=docs(balance, session_id="fig-1"))
    assert r.choices[0].text == " wxyz" and "3456" not in r.choices[0].text
    assert [(x["kind"], x["action"]) for x in aq(r)["rules"]] == [("grounding", "suppress")]
    # later in the session, the same figure in a public document is still protected from her
    public = {"text": "a public copy: 3456", "label": "public"}
    r = complete(url, prompt="x2", max_tokens=12, extra_body=docs(public, session_id="fig-1"))
    assert r.choices[0].text == " wxyz" and aq(r)["disclosure"] == {"protected_spans": 1, "active": 1}
    assert complete(url, prompt="x2", max_tokens=12, extra_body=docs(public)).choices[0].text == "3456 wxyz"


def test_a_figure_not_in_the_evidence_never_appears(server):
    _, url = server
    r = complete(url, prompt="x2", max_tokens=12)
    assert r.choices[0].text == " wxyz"  # "3" begins no figure of the evidence (the prompt's "2" does)
    assert complete(url, prompt="x2", max_tokens=12, extra_body=docs({"text": "34 and 3456"})).choices[0].text \
        == "3456 wxyz"  # an unlabeled document is public
    # what the user wrote is evidence too: a figure of the prompt may be repeated
    assert complete(url, prompt="3 or x2", max_tokens=12).choices[0].text == "3 wxyz"


def test_documents_a_principal_may_not_read_are_withheld(server, mock):
    _, url = server
    confidential = {"text": "balance 3456", "label": "confidential"}
    public = {"text": "opening hours 9 to 5", "label": "public"}
    r = complete(url, who="dave", prompt="x2", max_tokens=12, extra_body=docs(confidential, public))
    assert r.choices[0].text == " wxyz"  # the withheld figure is no evidence
    a = aq(r)
    assert a["documents"] == {
        "used": [{"index": 1, "label": "public", "kind": "document"}],
        "withheld": [{"index": 0, "label": "confidential", "kind": "document",
                      "reason": "label 'confidential' is not readable by 'dave'"}]}
    assert a["evidence"]["evidence_tokens"] == len(public["text"])
    texts = [e["rule_text"] for e in audit_record(url, a["audit_id"], who="dave")["events"]]
    assert "context: withheld document 0 (label 'confidential' is not readable by 'dave')" in texts
    # a principal the policy does not list reads nothing labeled, and is cleared for nothing
    r = complete(url, who="erin", prompt="x2", max_tokens=12, extra_body=docs(public))
    assert [w["index"] for w in aq(r)["documents"]["withheld"]] == [0] and r.choices[0].text == " wxyz"


def test_tool_results_and_documents_count_as_evidence(server):
    _, url = server
    messages = [{"role": "user", "content": "balance?"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "get_balance", "arguments": json.dumps({"account": "checking"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1200 EUR"}]
    r = chat(url, messages=messages, max_tokens=5, extra_body=docs({"text": "hello", "kind": "tool_result"}))
    assert r.choices[0].message.content == ALPHABET[:5]
    ev = aq(r)["evidence"]
    n = len("1200 EUR") + len("hello")
    assert ev["evidence_tokens"] == n and ev["budget"] == 16.0 + 2.0 * n


def test_bad_documents_get_400_in_openai_shape(server):
    _, url = server
    many = " ".join(f"{i:02d}{i * 7 % 100:02d}" for i in range(10, 55))  # 45 figures: a trie of 141 nodes
    assert len(build_trie([many])[0]) > 128
    spans = {"text": "x", "label": "confidential", "spans": [f"span{c}" * 2 for c in "abcdefghi"]}  # 9 > 8
    cases = [
        (dict(extra_body=docs({"text": "x", "label": "secret"})), "documents.0.label", "unknown_label", "'secret'"),
        (dict(extra_body=docs({"text": "x", "label": "public", "spans": ["a b"]})), "documents.0.spans.0",
         "invalid_value", "shorter than 4"),
        (dict(extra_body=docs({"text": many, "label": "public"})), "documents", "evidence_too_large", "141 nodes"),
        (dict(extra_body=docs(spans)), "documents", "too_many_protected_spans", "9 protected spans"),
        (dict(extra_body=docs({"text": "x", "kind": "email"})), "documents.0.kind", "invalid_value", "kind"),
    ]
    for kw, param, code, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            chat(url, max_tokens=1, **kw)
        err = e.value.body
        assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
        assert words in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:
        complete(url, prompt=[5, 6], extra_body=docs({"text": "x"}))
    assert e.value.body["param"] == "documents"


# ------------------------------------------------------------------------------------------------------ budget


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
    assert "evidence budget: clarify threshold crossed" in texts
    # the principal's roles add to the budget (carol is an auditor: +20 nats), and so do documents (2 per token)
    r = complete(url, who="carol")
    assert (r.choices[0].text, aq(r)["evidence"]["budget"]) == (expected_tildes(mock, 36.0)[0], 36.0)
    r = complete(url, prompt="~", extra_body=docs({"text": "abcdefghij"}))
    assert (r.choices[0].text, aq(r)["evidence"]["budget"]) == (expected_tildes(mock, 36.0)[0], 36.0)


# ------------------------------------------------------------------------------------------------------ escalation


def test_escalation_fires_exactly_at_its_threshold_across_requests(server, mock):
    _, url = server
    sid = {"session_id": "esc-1"}
    refuse_cde = {**sid, "policy": {"phrases": [{"phrase": "cde", "action": "refuse"}]}}
    h = step_entropy(mock)
    steps = []
    for turn in range(4):  # refused, answered, refused, answered
        if turn % 2 == 0:
            r = chat(url, extra_body=refuse_cde)
            assert (r.choices[0].message.content, aq(r)["verdict"]) == ("abcd" + REFUSAL, "REFUSE")
        else:
            r = complete(url, extra_body=sid)
        steps.append(aq(r))
    assert [s["escalation"]["counters"]["refusals"] for s in steps] == [0, 1, 1, 2]
    halves = 'escalation: refusals >= 2 -> {"budget_scale":0.5}'
    assert [s["escalation"]["active"] for s in steps] == [[], [], [], [halves]]  # from the turn after it reached 2
    # the budget halves exactly then: "~" under 16 nats clarifies after two, under 8 one step jumps past refuse
    assert steps[1]["evidence"]["budget"] == 16.0 and steps[3]["evidence"]["budget"] == 8.0
    assert steps[3]["verdict"] == "REFUSE" and expected_tildes(mock, 8.0) == ("~" + REFUSAL, Verdict.REFUSE)
    assert steps[3]["confidence"] == pytest.approx(max(0.0, 1 - 2 * h / 8), abs=1e-4)
    # a refusal by a phrase is a violation too (a content rule that acted visibly)
    s = session(url, "esc-1").json()
    assert s["counters"] == {"violations": 2, "refusals": 3, "blocked": 0} and s["turns"] == 4


def test_blocked_actions_escalate_to_forbidding_a_tool(server):
    _, url = server
    named = {"type": "function", "function": {"name": "transfer"}}
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_balance", "transfer")]
    sid = {"session_id": "esc-tools"}
    calls = []
    for _ in range(6):  # the amount must be grounded: the user's message names it
        r = chat(url, who="bob", content="transfer 123 to the landlord", tools=tools, tool_choice=named,
                 extra_body=sid)
        calls.append((r.choices[0], aq(r)))
    # The mock reaches for get_balance first (alphabetical), which the named choice masks: that is the caller's
    # choice, not an attempt against bob's authority, so it blocks nothing. Two transfers fit bob's quota; the
    # third, fourth and fifth are refused in-band (blocked, each counted once the turn ends: aq shows the counters
    # the turn started with), and from the sixth turn on transfer is forbidden.
    assert [c.finish_reason for c, _ in calls] == ["tool_calls"] * 2 + ["content_filter"] * 4
    assert json.loads(calls[0][0].message.tool_calls[0].function.arguments) == {"to": "landlord", "amount": 123}
    assert [a["escalation"]["counters"]["blocked"] for _, a in calls] == [0, 0, 0, 1, 2, 3]
    assert ("quota", "tool transfer: session quota spent") in [(x["kind"], x["text"]) for x in calls[2][1]["rules"]]
    assert [a["escalation"]["forbidden_tools"] for _, a in calls] == [[]] * 5 + [["transfer"]]
    last = calls[5][1]
    assert {"name": "transfer", "reason": "forbidden by escalation"} in last["tools"]["unavailable"]
    assert last["tools"]["offered"] == ["get_balance"] and last["verdict"] == "REFUSE"
    assert [(x["kind"], x["text"]) for x in last["rules"]] == [
        ("authority", "tool transfer: not granted to the principal (or forbidden)")]
    # what is left may still be called
    r = chat(url, who="bob", tools=tools, tool_choice="required", extra_body=sid)
    assert r.choices[0].message.tool_calls[0].function.name == "get_balance"


def test_another_principal_never_gets_a_sessions_state(server):
    _, url = server
    # alice's esc-1 has 3 refusals and span-1 a protected span (tests above); carol's sessions of the same ids are
    # her own, and bob (uncleared for confidential too) is not protected by alice's span either
    r = complete(url, who="carol", extra_body={"session_id": "esc-1"})
    assert aq(r)["escalation"]["counters"]["refusals"] == 0 and aq(r)["evidence"]["budget"] == 36.0
    assert session(url, "esc-1", who="carol").json()["turns"] == 1
    assert session(url, "esc-1", who="alice").json()["counters"]["refusals"] == 3
    r = chat(url, who="bob", extra_body={"session_id": "span-1"})
    assert r.choices[0].message.content == ALPHABET and aq(r)["disclosure"]["protected_spans"] == 0


def test_a_restart_keeps_counters_and_spans(tmp_path, mock):
    refuse_cde = {"session_id": "r", "policy": {"phrases": [{"phrase": "cde", "action": "refuse"}]}}
    with running(make_config(tmp_path), model=mock) as (_, url):
        assert chat(url, extra_body=docs(SECRET, session_id="r")).choices[0].message.content == REDACTED
        for _ in range(2):
            assert aq(chat(url, extra_body=refuse_cde))["verdict"] == "REFUSE"
    with running(make_config(tmp_path), model=mock) as (svc, url):  # the same state directory
        r = complete(url, extra_body={"session_id": "r"})
        counters = {"violations": 3, "refusals": 2, "blocked": 0}  # the withheld span and two refusals: violations
        assert aq(r)["escalation"]["counters"] == counters and aq(r)["evidence"]["budget"] == 8.0
        # the span is still protected, and three violations made "xyz" a refused topic
        r = chat(url, extra_body={"session_id": "r"})
        assert r.choices[0].message.content == REDACTED[:-1] + REFUSAL
        assert verify(svc.audit.path).ok


# ------------------------------------------------------------------------------------------------------ bank.toml


def test_the_shipped_bank_config_names_the_policys_principals():
    from gate.policy import load_policy
    from serving.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "bank.toml"))
    assert cfg.policy == os.path.join(ROOT, "policies", "bank.yaml")
    principals = {p.name: p.roles for p in load_policy(cfg.policy).principals}
    who = {k: cfg.keys.authenticate(f"aq-bank-{k}") for k in ("alice", "bob", "carol", "auditor")}
    assert {k: principals.get(p.name) for k, p in who.items()} == {
        "alice": ("viewer",), "bob": ("payments",), "carol": ("viewer", "auditor"), "auditor": None}
    assert who["auditor"].can_audit and not who["carol"].can_audit


@pytest.mark.slow
def test_bank_yaml_on_the_real_model_keeps_a_confidential_balance_from_an_uncleared_principal(smollm2, tmp_path):
    """configs/bank.toml (policies/bank.yaml) on SmolLM2-135M: alice (cleared for public only) and carol (cleared for
    confidential) ask for a balance that only a confidential document holds."""
    from serving.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "bank.toml"))
    cfg = dataclasses.replace(cfg, port=free_port(), state_dir=str(tmp_path), warmup=False, model_name="smollm2",
                              engine=dataclasses.replace(cfg.engine, slots=2, max_len=512, prefill_chunk=128,
                                                         min_prompt_bucket=128, logprobs=False, evidence_nodes=256))
    document = {"text": "Account 4471 (checking): balance 12,345.67 EUR as of 3 March.", "label": "confidential"}
    question = [{"role": "user", "content": "What is the balance of my checking account? Answer with the figure."}]
    with running(cfg, model=smollm2) as (_, url):
        replies = {}
        for who in ("alice", "carol"):
            c = openai.OpenAI(api_key=f"aq-bank-{who}", base_url=url + "/v1", max_retries=0, timeout=300)
            r = c.chat.completions.create(model="smollm2", messages=question, temperature=0, max_tokens=20,
                                          extra_body={"documents": [document]})
            replies[who] = (r.choices[0].message.content, aq(r))
    text, a = replies["alice"]
    assert not any(f in text.replace(",", "") for f in ("12345", "4471")), text
    assert a["disclosure"] == {"protected_spans": 2, "active": 2}  # 4471 and 12,345.67: figures of 4+ digits
    assert "12,345.67" in replies["carol"][0] and replies["carol"][1]["disclosure"]["active"] == 0
