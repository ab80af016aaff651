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
