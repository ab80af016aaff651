"""The admissibility gate end to end on the real model (SmolLM2-135M): phrases, JSON, turns, audit chain.

SmolLM2 answers "What is the capital of France?" with "The capital of France is Paris." (greedy), so a policy
that bans "paris" has something real to stop. Every assertion about outputs uses the independent reference
`contains_banned` (normalize and substring search), never the automaton.
"""

import json

import pytest

from aqjax.engine import Generator
from gate.audit import AuditLog, verify
from gate.phrases import contains_banned
from gate.policy import compile_policy, parse_policy
from gate.turn import governed_generate

CAPITAL = "What is the capital of France? Answer in one sentence."
SPELLED = "Repeat this text exactly: The city of P.a.r.i.s is lovely."
LOOKALIKE = "Repeat exactly: P4ris"


def _policy(action: str, extra: str = "") -> str:
    return f"""
aqjax_policy: 1
name: e2e-{action}
messages: {{redaction: "[REDACTED]", refusal: "I can't share that."}}
levels:
  deployment:
    phrases:
      - {{phrase: "paris", action: {action}}}
{extra}
"""


@pytest.fixture(scope="module")
def setup(smollm2):
    tok = smollm2.tokenizer
    gen = Generator(smollm2.cfg, smollm2.params, stop_ids=tok.stop_ids)

    def chat(*turns):
        messages = []
        for i, t in enumerate(turns):
            messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
        return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))

    return smollm2, tok, gen, chat


def test_ungated_model_says_the_phrase(setup):
    # the premise of the other tests: without a gate, greedy decoding produces the phrase in all three forms
    m, tok, gen, chat = setup
    texts = [tok.decode(r.tokens) for r in gen.generate([chat(CAPITAL), chat(SPELLED), chat(LOOKALIKE)],
                                                        max_new_tokens=24)]
    assert "Paris" in texts[0] and "P.A.R.I.S" in texts[1] and "P4ris" in texts[2]
    norm = compile_policy(parse_policy(_policy("suppress")), tok).normalization
    assert all(contains_banned(t, ["paris"], norm) for t in texts)


def test_suppressed_phrase_never_appears_directly_spelled_or_lookalike(setup, tmp_path):
    m, tok, gen, chat = setup
    compiled = compile_policy(parse_policy(_policy("suppress")), tok)
    norm = compiled.normalization
    with AuditLog(tmp_path / "audit.jsonl") as log:
        results = governed_generate(gen, tok, compiled, [chat(CAPITAL), chat(SPELLED), chat(LOOKALIKE)],
                                    max_new_tokens=40, audit=log)
    for r in results:
        assert not contains_banned(r.text, ["paris"], norm), r.text
        assert r.verdict == "ADMIT"
    # the direct question: the gate blocked the model's first choice and says so in the audit
    first = results[0]
    blocks = [e for e in first.events if e["action"] == "SUPPRESS"]
    assert blocks and blocks[0]["rule_text"] == "paris" and 0.0 <= blocks[0]["admissible_mass"] < 1.0
    assert "Par" in blocks[0]["token_text"] or "P" in blocks[0]["token_text"]
    assert verify(tmp_path / "audit.jsonl").ok


def test_substitute_and_refuse(setup):
    m, tok, gen, chat = setup
    sub = governed_generate(gen, tok, compile_policy(parse_policy(_policy("substitute")), tok), [chat(CAPITAL)],
                            max_new_tokens=40)[0]
    assert "[REDACTED]" in sub.text and not contains_banned(sub.text, ["paris"], _norm(tok))
    assert any(e["action"] == "SUBSTITUTE" for e in sub.events)
    ref = governed_generate(gen, tok, compile_policy(parse_policy(_policy("refuse")), tok), [chat(CAPITAL)],
                            max_new_tokens=40)[0]
    assert ref.verdict == "REFUSE" and ref.finish_reason == "refused"
    assert ref.text.endswith("I can't share that.") and not contains_banned(ref.text, ["paris"], _norm(tok))


def _norm(tok):
    return compile_policy(parse_policy(_policy("suppress")), tok).normalization


def test_state_carries_across_turns_and_the_audit_chain_links_them(setup, tmp_path):
    m, tok, gen, chat = setup
    compiled = compile_policy(parse_policy(_policy("suppress")), tok)
    path = tmp_path / "session.jsonl"
    history = [CAPITAL]
    state = None
    with AuditLog(path) as log:
        for follow_up in ("Are you sure? Please name the city again.", "Say only the city name."):
            r = governed_generate(gen, tok, compiled, [chat(*history)], max_new_tokens=32, gate_states=state,
                                  audit=log, session="s1")[0]
            assert not contains_banned(r.text, ["paris"], compiled.normalization), r.text
            if state is not None:
                assert r.record.state_hash_before == prev.record.state_hash_after
            state, prev = r.gate_state, r
            history += [r.text, follow_up]
    result = verify(path)
    assert result.ok and result.n_records == 2


def test_json_schema_output_parses_and_validates(setup):
    m, tok, gen, chat = setup
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    policy = f"""
aqjax_policy: 1
name: e2e-json
levels:
  turn:
    structure: {{json_schema: {json.dumps(schema)}}}
"""
    compiled = compile_policy(parse_policy(policy), tok)
    prompt = chat("Give the capital of France as a JSON object with the keys city and country.")
    r = governed_generate(gen, tok, compiled, [prompt], max_new_tokens=64)[0]
    assert r.finish_reason == "stop", (r.text, r.structure_report)
    obj = json.loads(r.text)
    assert set(obj) == {"city", "country"} and all(isinstance(v, str) for v in obj.values())
    # cut short by the token limit, the answer is reported as an unfinished structure
    short = governed_generate(gen, tok, compiled, [prompt], max_new_tokens=4)[0]
    assert short.finish_reason == "length" and "unfinished" in (short.structure_report or "")


def test_tampered_audit_files_are_caught(setup, tmp_path):
    m, tok, gen, chat = setup
    compiled = compile_policy(parse_policy(_policy("suppress")), tok)
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        governed_generate(gen, tok, compiled, [chat(CAPITAL), chat(SPELLED), chat(LOOKALIKE)], max_new_tokens=16,
                          audit=log)
    lines = path.read_bytes().splitlines(keepends=True)
    assert verify(path).ok and len(lines) == 3

    def check(data: bytes, bad: int):
        p = tmp_path / "t.jsonl"
        p.write_bytes(data)
        res = verify(p)
        assert not res.ok and res.first_bad == bad, res

    flipped = bytearray(lines[1])
    flipped[len(flipped) // 2] ^= 0x01
    check(lines[0] + bytes(flipped) + lines[2], 1)  # flipped byte
    check(lines[0] + lines[2], 1)  # deleted record
    check(lines[1] + lines[0] + lines[2], 0)  # reordered
