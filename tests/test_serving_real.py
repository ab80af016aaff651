"""End to end on the default model (SmolLM2-135M-Instruct) with the official `openai` client: a few short
answers, streamed and not, governed by the shipped default policy plus request-level fragments."""

import json
import os

import pytest
from test_serving_api import client, free_port, running

from gate.normalize import Normalization
from gate.phrases import contains_banned
from serving.config import ServerConfig
from serving.engine import EngineConfig
from serving.governance import KeyRing, Principal, hash_key

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPITAL = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    cfg = ServerConfig(host="127.0.0.1", port=free_port(), model_name="smollm2",
                       policy=os.path.join(ROOT, "policies", "default.yaml"),
                       state_dir=str(tmp_path_factory.mktemp("real")), warmup=False, default_max_tokens=16,
                       engine=EngineConfig(slots=2, max_len=512, chunk_steps=8, prefill_chunk=64),
                       keys=KeyRing({hash_key("key-alice"): Principal("alice")}))
    with running(cfg, model=smollm2) as (svc, url):
        yield svc, url


def ask(url, content=CAPITAL, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 12)
    return client(url).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": content}], **kw)


def test_chat_streamed_and_not(server):
    _, url = server
    r = ask(url)
    text = r.choices[0].message.content
    assert "Paris" in text and r.usage.completion_tokens <= 12
    assert r.model_extra["aq"]["verdict"] == "ADMIT"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(url, stream=True) if c.choices)
    assert streamed == text  # greedy: the same tokens whichever slot and batch they ran in


def test_a_request_policy_governs_the_real_model(server):
    _, url = server
    r = ask(url, max_tokens=16, extra_body={"policy": {"phrases": [{"phrase": "paris", "action": "substitute"}]}})
    text = r.choices[0].message.content
    assert "[REDACTED]" in text and not contains_banned(text, ["paris"], Normalization())
    rules = r.model_extra["aq"]["rules"]
    assert [(x["text"], x["level"]) for x in rules] == [("paris", "turn")]


def test_json_schema_on_the_real_model(server):
    _, url = server
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    r = ask(url, max_tokens=24, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert set(json.loads(text)) == {"capital"}
    else:  # cut by max_tokens: still a prefix of the structure
        assert text.startswith('{"capital"') or text.startswith('{ "capital"')


TOOLS_POLICY = """aqjax_policy: 1
name: real-tools
tools:
  get_balance:
    description: Look up the balance of one of the customer's accounts.
    parameters:
      type: object
      properties:
        account: {type: string, enum: [checking, savings]}
      required: [account]
  transfer:
    description: Move money from the customer's checking account to a payee.
    parameters:
      type: object
      properties:
        to: {type: string, enum: [savings, landlord, utility]}
        amount: {type: integer, minimum: 1, maximum: 10000}
      required: [to, amount]
    quota_argument: amount
roles:
  viewer: {tools: [get_balance]}
principals:
  alice: {roles: [viewer]}
"""


def test_a_governed_tool_call_on_the_real_model(smollm2, tmp_path):
    """SmolLM2-135M has no tool convention: the fallback prompt describes the granted tool, the gate writes the
    call's grammar, and the openai client gets an admitted call of the only tool alice may use."""
    (tmp_path / "policy.yaml").write_text(TOOLS_POLICY)
    cfg = ServerConfig(host="127.0.0.1", port=free_port(), model_name="smollm2", policy=str(tmp_path / "policy.yaml"),
                       state_dir=str(tmp_path / "state"), warmup=False, default_max_tokens=48,
                       engine=EngineConfig(slots=2, max_len=512, chunk_steps=8, prefill_chunk=256),
                       keys=KeyRing({hash_key("key-alice"): Principal("alice")}))
    tools = [{"type": "function", "function": {"name": n}} for n in ("get_balance", "transfer")]
    with running(cfg, model=smollm2) as (_, url):
        r = client(url).chat.completions.create(
            model="smollm2", temperature=0, max_tokens=48, tools=tools, tool_choice="required",
            messages=[{"role": "user", "content": "How much money is in my savings account?"}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_balance"  # transfer is not granted to alice: never called
    assert json.loads(call.function.arguments)["account"] in ("checking", "savings")
    assert r.model_extra["aq"]["tools"]["unavailable"] == [{"name": "transfer", "reason": "not granted to 'alice'"}]
