"""The serving engine against the mock model (serving/mock.py), whose every output can be worked out by hand,
and against a tiny random Llama for the invariant "a row in the running batch equals the same row alone"."""

import threading

import jax
import numpy as np
import pytest

from aqjax.engine import Generator
from aqjax.sampling import SamplingConfig
from gate.core import Verdict
from gate.policy import compile_policy, parse_policy
from serving.engine import Draining, Engine, EngineConfig, EngineRequest, Finished, QueueFull, Tokens
from serving.gating import SlotPolicy
from serving.mock import load_mock, mock_reply

CONFIG = EngineConfig(slots=4, max_len=128, chunk_steps=4, prefill_chunk=32, prefill_budget=32, min_prompt_bucket=32,
                      max_queue=8, min_active_slots=2)


class Sink:
    """Collects a request's events (called from the engine)."""

    def __init__(self):
        self.tokens, self.chunks, self.result = [], [], None
        self.done = threading.Event()

    def __call__(self, event):
        if isinstance(event, Tokens):
            self.tokens += event.tokens
            self.chunks.append(list(event.tokens))
        else:
            assert isinstance(event, Finished), event
            self.result = event.result
            self.done.set()


@pytest.fixture(scope="module")
def mock():
    return load_mock()


@pytest.fixture(scope="module")
def policies(mock):
    base = parse_policy("""
aqjax_policy: 1
name: test
levels:
  deployment:
    phrases:
      - {phrase: "qqq", action: suppress}
""")
    tok = mock.tokenizer
    return {
        "suppress": SlotPolicy.from_compiled(compile_policy(base.merge_child(
            "turn", {"phrases": [{"phrase": "def", "action": "suppress"}]}), tok)),
        "substitute": SlotPolicy.from_compiled(compile_policy(base.merge_child(
            "turn", {"phrases": [{"phrase": "klm", "action": "substitute"}]}), tok)),
        "refuse": SlotPolicy.from_compiled(compile_policy(base.merge_child(
            "turn", {"phrases": [{"phrase": "stu", "action": "refuse"}]}), tok)),
        "json": SlotPolicy.from_compiled(compile_policy(base.merge_child("turn", {"structure": {"json_schema": {
            "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}}}), tok)),
        "za": SlotPolicy.from_compiled(compile_policy(parse_policy(
            "aqjax_policy: 1\nname: za\nlevels:\n  session:\n    phrases: [{phrase: za, action: suppress}]\n"), tok)),
    }


@pytest.fixture
def make_engine(mock, policies):
    """Engines of one shape: every test shares the same compiled programs."""

    def make(config=CONFIG):
        engine = Engine(mock.cfg, mock.params, config, stop_ids=mock.tokenizer.stop_ids, eos_id=mock.tokenizer.eos_id)
        for p in policies.values():
            engine.fit_policy(p)
        return engine

    return make


def text_prompt(mock, text):
    return mock.tokenizer.encode(text, parse_special=False)


def chat_prompt(mock, text="hi"):
    tok = mock.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def submit(engine, prompt, max_new, **kw):
    sink = Sink()
    engine.submit(EngineRequest(prompt=prompt, max_new=max_new, sink=sink, **kw))
    return sink


def run_until_done(engine, sinks, limit=500):
    for _ in range(limit):
        if all(s.result is not None for s in sinks):
            return
        engine.step()
    raise AssertionError("requests did not finish")


def expected(last: str, max_new: int) -> tuple[str, str]:
    text = mock_reply(last, max_new)
    return text, ("stop" if len(mock_reply(last, max_new + 1)) < max_new else "length")


def test_mock_model_answers_by_hand(mock, make_engine):
    engine = make_engine()
    chat, hello = submit(engine, chat_prompt(mock), 40), submit(engine, text_prompt(mock, "hello"), 40)
    run_until_done(engine, [chat, hello])
    assert mock.tokenizer.decode(chat.tokens) == "abcdefghijklmnopqrstuvwxyz"
    assert mock.tokenizer.decode(hello.tokens) == "pqrstuvwxyz"
    assert chat.result.finish_reason == hello.result.finish_reason == "stop"
    assert chat.result.tokens == chat.tokens  # what was streamed is the output


def test_requests_join_and_leave_between_chunks_without_recompiling(mock, make_engine):
    engine = make_engine()
    engine.warmup()
    compiled = engine.compile_counts()
    rng = np.random.default_rng(0)
    prompts = ["hello", "x", "7", "abc", "the quick brown fox", "3 1", "q" * 40, "zz", "m" * 70, "5"]
    plan = {}  # step -> requests submitted before it
    for text in prompts:
        plan.setdefault(int(rng.integers(0, 12)), []).append((text, int(rng.integers(1, 30))))
    sinks = []
    for step in range(200):
        for text, max_new in plan.get(step, []):
            sinks.append((text, max_new, submit(engine, text_prompt(mock, text), max_new)))
        engine.step()
        if step > max(plan) and all(s.result is not None for _, _, s in sinks):
            break
    assert len(sinks) == len(prompts)
    for text, max_new, sink in sinks:
        want, finish = expected(text[-1], max_new)
        assert mock.tokenizer.decode(sink.tokens) == want, text
        assert sink.result.finish_reason == finish, text
    assert engine.compile_counts() == compiled  # joining, leaving and queueing never recompiled anything
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_long_prompt_is_prefilled_in_pieces_between_decode_chunks(mock, make_engine):
    engine = make_engine()
    running = submit(engine, text_prompt(mock, "1"), 100)
    engine.step()
    assert len(running.tokens) == 1 + CONFIG.chunk_steps  # inserted (first token), then one chunk
    long = submit(engine, text_prompt(mock, "ab" * 50), 10)  # 100 tokens: 3 pieces of 32, then the last 4
    seen = []
    while not long.tokens:
        before = len(running.tokens)
        engine.step()
        seen.append(len(running.tokens) - before)
    assert seen == [CONFIG.chunk_steps] * 4  # 4 iterations; the running stream advanced in every one
    run_until_done(engine, [running, long])
    assert mock.tokenizer.decode(long.tokens) == "cdefghijkl"
    assert mock.tokenizer.decode(running.tokens) == ("2345678901" * 10)


def test_cancel_frees_the_slot_for_a_waiting_request(mock, make_engine):
    engine = make_engine()
    runners = [submit(engine, text_prompt(mock, "0"), 120) for _ in range(CONFIG.slots)]
    waiting = submit(engine, text_prompt(mock, "hello"), 20)
    engine.step()
    engine.step()
    assert engine.busy_slots == CONFIG.slots and engine.queue_depth == 1 and not waiting.tokens
    victim = runners[1]
    engine.cancel(EngineRequestRef(engine, 1))
    engine.step()
    assert victim.result is not None and victim.result.finish_reason == "cancelled"
    assert victim.result.tokens == victim.tokens and 0 < len(victim.tokens) < 120
    assert engine.queue_depth == 0 and waiting.tokens  # it took the freed slot in the same iteration
    n_victim = len(victim.tokens)
    run_until_done(engine, [*runners[:1], *runners[2:], waiting])
    assert len(victim.tokens) == n_victim  # the cancelled row stopped advancing
    assert mock.tokenizer.decode(waiting.tokens) == "pqrstuvwxyz"
    assert all(mock.tokenizer.decode(r.tokens) == ("1234567890" * 12) for r in runners if r is not victim)


def EngineRequestRef(engine, slot):  # noqa: N802 (the request occupying a slot)
    return engine._slots[slot].req


def test_queue_full_raises_with_retry_after_and_everything_admitted_completes(mock, make_engine):
    engine = make_engine()
    sinks = [submit(engine, text_prompt(mock, "w"), 5) for _ in range(CONFIG.slots + CONFIG.max_queue)]
    with pytest.raises(QueueFull) as info:
        submit(engine, text_prompt(mock, "w"), 5)
    assert info.value.retry_after >= 1
    run_until_done(engine, sinks)
    assert all(mock.tokenizer.decode(s.tokens) == "xyz" for s in sinks)
    submit(engine, text_prompt(mock, "w"), 5)  # there is room again


def test_each_slot_is_governed_by_its_own_policy(mock, policies, make_engine):
    engine = make_engine()
    engine.warmup()
    compiled = engine.compile_counts()
    tok = mock.tokenizer
    cases = {name: submit(engine, chat_prompt(mock), 60, policy=policies[name])
             for name in ("suppress", "substitute", "refuse", "json")}
    free = submit(engine, chat_prompt(mock), 60)
    run_until_done(engine, [*cases.values(), free])
    assert tok.decode(free.tokens) == "abcdefghijklmnopqrstuvwxyz"
    # "def" masked: the model's second choice is a space, after which it says "wxyz"
    assert tok.decode(cases["suppress"].tokens) == "abcde wxyz"
    assert tok.decode(cases["substitute"].tokens) == "abcdefghijkl[REDACTED] wxyz"
    refuse = cases["refuse"].result
    assert tok.decode(refuse.tokens) == "abcdefghijklmnopqrstI can't help with that."
    assert (refuse.finish_reason, refuse.verdict) == ("gate", Verdict.REFUSE)
    rules = policies["refuse"].compiled.rules
    assert rules[refuse.rule].text == "stu"
    import json

    assert json.loads(tok.decode(cases["json"].tokens))["answer"] in ("yes", "no")
    assert engine.compile_counts() == compiled  # mixing policies in one batch recompiles nothing


def test_a_saved_phrase_state_resumes_across_turns(mock, policies, make_engine):
    engine = make_engine()
    tok, za = mock.tokenizer, policies["za"]
    first = submit(engine, chat_prompt(mock), 60, policy=za)
    run_until_done(engine, [first])
    assert tok.decode(first.tokens) == "abcdefghijklmnopqrstuvwxyz"
    state = first.result.gate_state[0]  # the phrase gate's state: the text ends in "z", a prefix of "za"
    resumed = submit(engine, chat_prompt(mock), 60, policy=za, phrase_state=state)
    fresh = submit(engine, chat_prompt(mock), 60, policy=za)
    run_until_done(engine, [resumed, fresh])
    assert tok.decode(resumed.tokens) == " wxyz"  # "a" would complete "za" across the two turns
    assert tok.decode(fresh.tokens) == "abcdefghijklmnopqrstuvwxyz"
    assert jax.tree.leaves(resumed.result.gate_state_before[0])[0].tolist() == np.asarray(state.ac).tolist()


def test_drain_finishes_running_requests_and_refuses_new_ones(mock, make_engine):
    engine = make_engine().start()
    try:
        with engine.paused():
            sinks = [submit(engine, text_prompt(mock, "hello"), 20) for _ in range(6)]
            drained = []
            t = threading.Thread(target=lambda: drained.append(engine.drain(timeout=60)))
            t.start()
            while not engine.draining:
                pass
            with pytest.raises(Draining):
                submit(engine, text_prompt(mock, "hello"), 20)
        t.join(60)
        assert drained == [True]
        assert all(mock.tokenizer.decode(s.tokens) == "pqrstuvwxyz" for s in sinks)
    finally:
        engine.stop()


def test_a_row_in_the_batch_equals_the_same_row_alone():
    """Tiny random Llama (GQA): staggered joins, chunked prefill and sampling give exactly Generator's tokens."""
    import pathlib

    from models.loader import load_model

    m = load_model(pathlib.Path(__file__).parent / "data" / "tiny_llama_gqa")
    cfg = EngineConfig(slots=4, max_len=64, chunk_steps=3, prefill_chunk=16, min_prompt_bucket=16, governed=False)
    engine = Engine(m.cfg, m.params, cfg, stop_ids=())
    gen = Generator(m.cfg, m.params, stop_ids=())
    rng = np.random.default_rng(1)
    reqs = [(rng.integers(3, 128, size=n).tolist(), k, s) for n, k, s in
            ((5, 20, SamplingConfig()), (37, 12, SamplingConfig()), (12, 30, SamplingConfig(temperature=0.8, seed=3)),
             (20, 9, SamplingConfig(top_p=0.9, temperature=1.0, seed=11)), (3, 25, SamplingConfig()))]
    sinks = []
    for step in range(100):
        if step < len(reqs):  # one request joins per iteration
            prompt, k, sampling = reqs[step]
            sinks.append(submit(engine, prompt, k, sampling=sampling))
        engine.step()
        if len(sinks) == len(reqs) and all(s.result is not None for s in sinks):
            break
    # the same requests alone, each in its own row of one Generator batch (rows of a batch are independent)
    alone = gen.generate([r[0] for r in reqs], [r[2] for r in reqs], [r[1] for r in reqs])
    for sink, want in zip(sinks, alone, strict=True):
        assert sink.tokens == want.tokens


# ------------------------------------------------------------------------------------------ batched insert


def record_inserts(engine):
    """Wraps the engine's insert: the returned list gets each insert's slots, in call order."""
    calls, insert = [], engine._insert

    def recording(group):
        calls.append([i for i, _ in group])
        insert(group)

    engine._insert = recording
    return calls


def test_one_insert_prefills_many_requests_each_in_its_own_row(mock, make_engine):
    """Different prompt lengths and limits in one insert, rows ending at their first token or at a stop: every row
    gets its own hand-computed answer, and a stream running beside an insert with a padding row is untouched."""
    engine = make_engine()
    inserts = record_inserts(engine)
    tok = mock.tokenizer
    firsts = [submit(engine, text_prompt(mock, t), 1) for t in ("ab", "q", "  ")]
    runner = submit(engine, text_prompt(mock, "5"), 100)  # the last slot: where a padding row's write would land
    engine.step()
    assert inserts == [[0, 1, 2, 3]]  # one insert of four rows; three finished at their first token
    assert [tok.decode(s.tokens) for s in firsts] == ["c", "r", "w"]
    assert all(s.result.finish_reason == "length" for s in firsts)
    cases = [("hello", 40), ("7", 3), ("xyz", 9)]  # lengths 5, 1, 3 in one prompt bucket
    sinks = [submit(engine, text_prompt(mock, t), k) for t, k in cases]
    engine.step()
    assert inserts[1] == [0, 1, 2]  # three rows in the bucket of four: one padding row
    run_until_done(engine, [runner, *sinks])
    for (text, k), sink in zip(cases, sinks, strict=True):
        want, finish = expected(text[-1], k)
        assert (tok.decode(sink.tokens), sink.result.finish_reason) == (want, finish), text
    assert sinks[2].tokens == [] and sinks[2].result.finish_reason == "stop"  # "z" stops at once
    assert tok.decode(runner.tokens) == "6789012345" * 10 and runner.result.finish_reason == "length"
    assert len(inserts) == 2


def test_one_insert_keeps_each_rows_policy_gate_state_and_logprobs(mock, policies, make_engine):
    """Four governed requests in one insert: a resumed phrase state, a fresh one under the same policy, two other
    policies, one of them asking for logprobs; each row keeps its own."""
    engine = make_engine()
    tok, za = mock.tokenizer, policies["za"]
    earlier = submit(engine, chat_prompt(mock), 60, policy=za)
    run_until_done(engine, [earlier])
    saved = earlier.result.gate_state[0]
    inserts = record_inserts(engine)
    suppress = LogprobSink()
    fresh = submit(engine, chat_prompt(mock), 60, policy=za)
    engine.submit(EngineRequest(prompt=chat_prompt(mock), max_new=60, sink=suppress, top_logprobs=3,
                                policy=policies["suppress"]))
    resumed = submit(engine, chat_prompt(mock), 60, policy=za, phrase_state=saved)
    refuse = submit(engine, chat_prompt(mock), 60, policy=policies["refuse"])
    run_until_done(engine, [fresh, suppress, resumed, refuse])
    assert inserts == [[0, 1, 2, 3]]
    assert tok.decode(fresh.tokens) == "abcdefghijklmnopqrstuvwxyz"
    assert tok.decode(resumed.tokens) == " wxyz"  # "a" would complete "za" across the two turns
    assert tok.decode(suppress.tokens) == "abcde wxyz"
    assert tok.decode(refuse.tokens) == "abcdefghijklmnopqrstI can't help with that."
    assert refuse.result.verdict == Verdict.REFUSE and fresh.result.verdict == Verdict.ADMIT
    before = jax.tree.leaves(resumed.result.gate_state_before[0])[0].tolist()
    assert before == np.asarray(saved.ac).tolist() != jax.tree.leaves(fresh.result.gate_state_before[0])[0].tolist()
    assert len(suppress.logprobs) == len(suppress.tokens)
    lp, alts = suppress.logprobs[0]  # the first token's, from the insert: "a" after the marker, logit 10 of 10
    assert alts[0][0] == tok.encode("a", parse_special=False)[0] and lp == pytest.approx(alts[0][1])


def test_a_request_in_a_batched_insert_equals_the_same_request_alone():
    """Tiny random Llama: prompts of different lengths (some in pieces), limits, seeds and logprobs submitted at once
    give exactly the tokens (and the log-probabilities) each one gets alone."""
    import pathlib

    from models.loader import load_model

    m = load_model(pathlib.Path(__file__).parent / "data" / "tiny_llama_gqa")
    cfg = EngineConfig(slots=4, max_len=64, chunk_steps=3, prefill_chunk=16, min_prompt_bucket=8, governed=False,
                       max_top_logprobs=2)
    rng = np.random.default_rng(2)
    reqs = [(rng.integers(3, 128, size=n).tolist(), k, s) for n, k, s in
            ((5, 20, SamplingConfig()), (7, 1, SamplingConfig()), (12, 30, SamplingConfig(temperature=0.8, seed=3)),
             (3, 25, SamplingConfig(temperature=1.0, seed=4)), (20, 9, SamplingConfig(top_p=0.9, temperature=1.0)),
             (13, 12, SamplingConfig()), (37, 6, SamplingConfig(temperature=0.7, seed=5)))]

    def run(engine, batch):
        sinks = [LogprobSink() for _ in batch]
        for (prompt, k, sampling), sink in zip(batch, sinks, strict=True):
            engine.submit(EngineRequest(prompt=prompt, max_new=k, sink=sink, sampling=sampling, top_logprobs=2))
        run_until_done(engine, sinks)
        return sinks

    engine = Engine(m.cfg, m.params, cfg, stop_ids=())
    alone = [run(engine, [r])[0] for r in reqs]
    inserts = record_inserts(engine)
    together = run(engine, reqs)
    assert max(len(g) for g in inserts) >= 3  # rows did share inserts
    for a, t in zip(alone, together, strict=True):
        assert t.tokens == a.tokens
        np.testing.assert_allclose([lp for lp, _ in t.logprobs], [lp for lp, _ in a.logprobs], atol=1e-5)
        assert [[i for i, _ in alts] for _, alts in t.logprobs] == [[i for i, _ in alts] for _, alts in a.logprobs]


def test_insert_rows_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="insert_rows"):
        EngineConfig(insert_rows=3)
    with pytest.raises(ValueError, match="insert_rows"):
        EngineConfig(insert_rows=0)


# ------------------------------------------------------------------------------------------------ logprobs


class LogprobSink(Sink):
    def __init__(self):
        super().__init__()
        self.logprobs = []

    def __call__(self, event):
        if isinstance(event, Tokens) and event.logprobs is not None:
            assert len(event.logprobs) == len(event.tokens)
            self.logprobs += event.logprobs
        super().__call__(event)


def test_logprobs_ride_with_the_tokens_are_governed_and_recompile_nothing(mock, make_engine, policies):
    import jax.numpy as jnp

    from aqjax import decode

    engine = make_engine()
    engine.warmup()
    compiled = engine.compile_counts()
    prompt = chat_prompt(mock)
    plain = submit(engine, prompt, 40)
    wants, gated = LogprobSink(), LogprobSink()
    engine.submit(EngineRequest(prompt=prompt, max_new=40, sink=wants, top_logprobs=5))
    engine.submit(EngineRequest(prompt=prompt, max_new=40, sink=gated, top_logprobs=3, policy=policies["suppress"]))
    run_until_done(engine, [plain, wants, gated])
    assert engine.compile_counts() == compiled  # asking for logprobs recompiled nothing
    assert wants.tokens == plain.tokens and len(wants.logprobs) == len(wants.tokens) > 0
    # against an independent teacher-forced pass: the raw logits' log_softmax (this request has no policy)
    logits = decode.score(engine.params, jnp.asarray([prompt + wants.tokens]), cfg=mock.cfg)[0].astype(jnp.float32)
    ref = np.asarray(jax.nn.log_softmax(logits, axis=-1))[len(prompt) - 1:]
    for j, (t, (lp, alts)) in enumerate(zip(wants.tokens, wants.logprobs, strict=True)):
        np.testing.assert_allclose(lp, ref[j, t], atol=1e-4)
        vals = [v for _, v in alts]
        assert len(alts) == 5 and vals == sorted(vals, reverse=True)
        np.testing.assert_allclose(vals, ref[j, [a for a, _ in alts]], atol=1e-4)
    # governed: "def" is suppressed, and no alternative offered at any step would have completed it
    tok = mock.tokenizer
    assert len(gated.logprobs) == len(gated.tokens) and "def" not in tok.decode(gated.tokens)
    for j, (lp, alts) in enumerate(gated.logprobs):
        before = tok.decode(gated.tokens[:j])
        assert 0 < len(alts) <= 3 and lp <= 0
        assert all("def" not in before + tok.decode([a]) for a, _ in alts), (before, alts)


def test_an_engine_without_logprob_buffers_refuses_them(mock):
    import dataclasses

    engine = Engine(mock.cfg, mock.params, dataclasses.replace(CONFIG, logprobs=False))
    assert engine._state.logprobs is None
    with pytest.raises(ValueError, match="log-probabilities"):
        engine.submit(EngineRequest(prompt=[1, 2], max_new=2, sink=Sink(), top_logprobs=0))
    with pytest.raises(ValueError, match="top_logprobs"):
        make = Engine(mock.cfg, mock.params, CONFIG)
        make.submit(EngineRequest(prompt=[1, 2], max_new=2, sink=Sink(), top_logprobs=CONFIG.max_top_logprobs + 1))
