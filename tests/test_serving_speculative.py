"""Speculative decoding in the serving engine (EngineConfig.speculative = "lookup"): every request gets what the
same engine without speculation gives it (greedy tokens, verdicts, audit events, log-probabilities), whether its
chunks speculate or not, and nothing recompiles once warmed up."""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from aqjax.engine import Generator
from aqjax.sampling import SamplingConfig
from serving.engine import Engine, EngineConfig, EngineRequest, Finished, Tokens
from tests.test_serving_engine import CONFIG, LogprobSink, chat_prompt, mock, policies  # noqa: F401 (fixtures)

SPEC = dataclasses.replace(CONFIG, speculative="lookup", draft_k=4, speculative_rows=4)


class Sink:
    def __init__(self):
        self.tokens, self.result = [], None

    def __call__(self, event):
        if isinstance(event, Tokens):
            self.tokens += event.tokens
        else:
            assert isinstance(event, Finished), event
            self.result = event.result


def drive(engine, reqs, *, stagger=True, limit=400):
    """Submits the requests (one per iteration when staggered) and runs the engine until all have finished."""
    sinks = []
    for it in range(limit):
        while len(sinks) < len(reqs) and (not stagger or len(sinks) <= it):
            kw = reqs[len(sinks)]
            sinks.append(kw.pop("sink", None) or Sink())
            engine.submit(EngineRequest(sink=sinks[-1], **kw))
            if stagger:
                break
        if len(sinks) == len(reqs) and all(s.result is not None for s in sinks):
            return sinks
        engine.step()
    raise AssertionError("requests did not finish")


def test_config_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineConfig(speculative="self")
    with pytest.raises(FileNotFoundError, match="train_feature_drafter.py"):
        from models.config import tiny_config
        from models.params import init_params

        cfg = tiny_config()
        Engine(cfg, init_params(cfg, jax.random.key(0)), EngineConfig(speculative="feature", max_len=64,
                                                                      feature_draft="/no/such/draft"))
    with pytest.raises(ValueError, match="draft_k"):
        EngineConfig(speculative="lookup", draft_k=0)
    with pytest.raises(ValueError, match="speculative_rows"):
        EngineConfig(speculative_rows=-1)
    with pytest.raises(ValueError, match="draft_min_confidence"):
        EngineConfig(speculative="hybrid", draft_min_confidence=1.5)


def test_greedy_rows_equal_generator_tokens_while_joining_and_leaving():
    """Tiny random Llama: staggered joins, chunked prefill (prompt history written piece by piece), every chunk
    speculative; each greedy request's tokens are exactly Generator's plain greedy tokens."""
    from models.loader import load_model

    m = load_model(pathlib.Path(__file__).parent / "data" / "tiny_llama_gqa")
    cfg = EngineConfig(slots=4, max_len=64, chunk_steps=3, prefill_chunk=16, min_prompt_bucket=16, governed=False,
                       speculative="lookup", draft_k=3, speculative_rows=4)
    engine = Engine(m.cfg, m.params, cfg, stop_ids=())
    rng = np.random.default_rng(1)
    reqs = [(rng.integers(3, 128, size=n).tolist(), k) for n, k in ((5, 20), (37, 12), (12, 30), (20, 9), (3, 25))]
    sinks = drive(engine, [dict(prompt=p, max_new=k) for p, k in reqs])
    alone = Generator(m.cfg, m.params, stop_ids=()).generate([p for p, _ in reqs], None, [k for _, k in reqs])
    for sink, want in zip(sinks, alone, strict=True):
        assert sink.tokens == want.tokens
        assert sink.result.tokens == want.tokens and sink.result.finish_reason == "length"
    assert engine.spec_chunks == engine.chunks > 0
    # the drafts were used: fewer verification steps than tokens (this random model repeats itself)
    assert 0 < engine.spec_accepted <= engine.spec_drafted
    assert engine.spec_steps < sum(k for _, k in reqs) - len(reqs)


def governed_requests(mock, policies):  # noqa: F811
    letters = chat_prompt(mock, "abcdefghijklmnopqrstuvwxyz abcdefghij")
    digits = chat_prompt(mock, "0123456789012345678901234567890")
    return [
        dict(prompt=letters, max_new=40, policy=policies["suppress"], sink=LogprobSink(), top_logprobs=3),
        dict(prompt=letters, max_new=40, policy=policies["substitute"]),
        dict(prompt=letters, max_new=40, policy=policies["refuse"], sink=LogprobSink(), top_logprobs=2),
        dict(prompt=letters, max_new=40, policy=policies["json"]),
        dict(prompt=digits, max_new=45, sink=LogprobSink(), top_logprobs=5),
    ]


def outcome(sink):
    r = sink.result
    return (sink.tokens, r.tokens, r.finish_reason, r.verdict, r.rule, r.events)


@pytest.mark.parametrize("speculative_rows", [4, 2])
def test_governed_requests_get_what_the_plain_engine_gives(mock, policies, speculative_rows):  # noqa: F811
    """Mock model, a policy per slot (suppress, substitute, refuse, JSON schema), log-probabilities: the same
    tokens, finish reasons, verdicts, rules, audit events and log-probabilities as without speculation. With
    speculative_rows=2 the engine moves between speculative chunks (at most the first two slots decoding) and
    plain ones (all four)."""

    def run(config, stagger):
        engine = Engine(mock.cfg, mock.params, config, stop_ids=mock.tokenizer.stop_ids,
                        eos_id=mock.tokenizer.eos_id)
        for p in policies.values():
            engine.fit_policy(p)
        return engine, drive(engine, governed_requests(mock, policies), stagger=stagger)

    plain_engine, plain = run(CONFIG, True)
    spec_engine, spec = run(dataclasses.replace(SPEC, speculative_rows=speculative_rows), True)
    assert plain_engine.spec_chunks == 0 and spec_engine.spec_chunks > 0
    if speculative_rows == 2:
        assert 0 < spec_engine.spec_chunks < spec_engine.chunks
    assert spec_engine.chunks < plain_engine.chunks  # drafts accepted: fewer chunks for the same tokens
    assert 0 < spec_engine.spec_accepted <= spec_engine.spec_drafted
    for a, b in zip(plain, spec, strict=True):
        assert outcome(a) == outcome(b)
        if isinstance(a, LogprobSink):
            assert len(a.logprobs) == len(b.logprobs) == len(a.tokens) > 0
            for (lp_a, alts_a), (lp_b, alts_b) in zip(a.logprobs, b.logprobs, strict=True):
                np.testing.assert_allclose(lp_a, lp_b, atol=1e-4)
                assert [t for t, _ in alts_a] == [t for t, _ in alts_b]
                np.testing.assert_allclose([v for _, v in alts_a], [v for _, v in alts_b], atol=1e-4)
    tok = mock.tokenizer
    suppressed = tok.decode(spec[0].tokens)
    assert suppressed == "abcde wxyz"  # "f" masked inside the window of drafts "fghi"


def test_warmed_up_engine_compiles_nothing_more_and_sampled_rows_finish(mock, policies):  # noqa: F811
    engine = Engine(mock.cfg, mock.params, dataclasses.replace(SPEC, speculative_rows=2),
                    stop_ids=mock.tokenizer.stop_ids, eos_id=mock.tokenizer.eos_id)
    for p in policies.values():
        engine.fit_policy(p)
    engine.warmup()
    compiled = engine.compile_counts()
    reqs = governed_requests(mock, policies)
    for r in reqs[:3]:
        r["sampling"] = SamplingConfig(temperature=0.7, seed=5)
    sinks = drive(engine, reqs, stagger=False)
    assert engine.compile_counts() == compiled
    for r, s in zip(reqs, sinks, strict=True):
        assert 0 < len(s.tokens) <= r["max_new"] and s.result.tokens == s.tokens


def test_the_server_speculates_and_answers_as_without(tmp_path):
    """`[engine] speculative = "lookup"` end to end, with the openai client on the mock model: the governed answers
    (a substitution inside a speculative window, streamed and not) are those of the server without speculation
    (tests/test_serving_api.py), and /metrics counts the accepted drafts."""
    import httpx

    from tests.test_serving_api import ANSWER, POLICY, chat, client, make_config, running

    (tmp_path / "policy.yaml").write_text(POLICY)
    config = make_config(tmp_path / "state", tmp_path / "policy.yaml", speculative="lookup", draft_k=4,
                         speculative_rows=2)
    with running(config) as (svc, url):
        c = client(url)
        # the user's text holds the alphabet: lookup drafts the model's answer from it
        r = chat(c, "abcdefghijklmnopqrstuvwxyz")
        assert r.choices[0].message.content == ANSWER and r.choices[0].finish_reason == "stop"
        stream = chat(c, "abcdefghijklmnopqrstuvwxyz", stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == ANSWER
        assert chat(c, max_tokens=10).choices[0].message.content == "abcdefghij"
        metrics = httpx.get(url + "/metrics").text
        values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                  if line.startswith("aqjax_speculative_")}
        assert values["aqjax_speculative_chunks_total"] > 0
        assert 0 < values["aqjax_speculative_accepted_total"] <= values["aqjax_speculative_drafted_total"]


def test_low_yield_falls_back_to_plain_chunks_and_probes_again(mock):  # noqa: F811
    """A chat answer the prompt does not contain: lookup's drafts fail (about one token per step), so after the first
    speculative chunk the engine decodes plainly, speculating again once per `speculative_probe` plain chunks."""
    config = dataclasses.replace(SPEC, chunk_steps=2, speculative_min_tokens=1.5, speculative_probe=3)
    engine = Engine(mock.cfg, mock.params, config, stop_ids=mock.tokenizer.stop_ids, eos_id=mock.tokenizer.eos_id)
    prompt = chat_prompt(mock, "hi")
    (sink,) = drive(engine, [dict(prompt=prompt, max_new=26)])
    assert mock.tokenizer.decode(sink.tokens) == "abcdefghijklmnopqrstuvwxyz"
    plain = engine.chunks - engine.spec_chunks
    assert engine.spec_steps > 0 and engine.spec_accepted < engine.spec_steps  # < 1 draft accepted per step
    # chunks: the first speculates, then probes after every 3 plain ones (S P P P S P P P ...)
    assert engine.spec_chunks == 1 + (engine.chunks - 1) // 4 and plain >= 3


def test_new_requests_start_by_the_engines_recent_yield(mock):  # noqa: F811
    """After low-yield answers, a new request starts plainly (no speculative chunk before a probe); a request whose
    drafts succeed is found by the next probe and keeps speculating."""
    config = dataclasses.replace(SPEC, chunk_steps=2, speculative_min_tokens=1.5, speculative_probe=2)
    engine = Engine(mock.cfg, mock.params, config, stop_ids=mock.tokenizer.stop_ids, eos_id=mock.tokenizer.eos_id)
    drive(engine, [dict(prompt=chat_prompt(mock, "hi"), max_new=26)])  # low yield: the engine learns it
    engine._plain_since_spec = 0
    spec_before, chunks_before = engine.spec_chunks, engine.chunks
    (low,) = drive(engine, [dict(prompt=chat_prompt(mock, "hi"), max_new=26)])
    assert mock.tokenizer.decode(low.tokens) == "abcdefghijklmnopqrstuvwxyz"
    chunks, specs = engine.chunks - chunks_before, engine.spec_chunks - spec_before
    assert specs == chunks // 3  # only the probes (P P S P P S ...), not the request's first chunk
    spec_before, chunks_before = engine.spec_chunks, engine.chunks
    (high,) = drive(engine, [dict(prompt=chat_prompt(mock, "abcdefghijklmnopqrstuvwxyz"), max_new=26)])
    assert mock.tokenizer.decode(high.tokens) == "abcdefghijklmnopqrstuvwxyz"
    chunks, specs = engine.chunks - chunks_before, engine.spec_chunks - spec_before
    assert specs > chunks // 2  # once a probe has seen its drafts succeed, it speculates


def _feature_engine(tmp_path, params, cfg, kind, draft, **kw):
    """A small ungoverned engine speculating with `draft` (saved and loaded as the server does)."""
    from aqjax.drafters import save_feature_draft

    path = save_feature_draft(tmp_path / kind, draft, target_cfg=cfg)
    kw = {"draft_min_confidence": 0.0} | kw  # the random heads' drafts run their full length
    return Engine(cfg, params, EngineConfig(slots=4, max_len=64, chunk_steps=3, prefill_chunk=16, min_prompt_bucket=16,
                                            governed=False, speculative=kind, draft_k=3, feature_draft=str(path),
                                            speculative_rows=1, speculative_min_tokens=0.0, **kw), stop_ids=())


@pytest.mark.parametrize("kind", ["feature", "hybrid"])
def test_feature_drafters_in_the_engine_give_generator_tokens(tmp_path, kind):
    """A random feature draft (mostly rejected) on the tiny Llama: staggered joins, chunked prefill, plain chunks
    (several slots decoding) between speculative ones (speculative_rows = 1): Generator's greedy tokens."""
    from aqjax.drafters import random_feature_draft
    from models.loader import load_model

    m = load_model(pathlib.Path(__file__).parent / "data" / "tiny_llama_gqa")
    fd = random_feature_draft(m.cfg, jax.random.key(2), head_vocab=100)
    engine = _feature_engine(tmp_path, m.params, m.cfg, kind, fd)
    rng = np.random.default_rng(1)
    reqs = [(rng.integers(3, 128, size=n).tolist(), k) for n, k in ((5, 20), (37, 12), (12, 30), (20, 9), (3, 25))]
    sinks = drive(engine, [dict(prompt=p, max_new=k) for p, k in reqs])
    alone = Generator(m.cfg, m.params, stop_ids=()).generate([p for p, _ in reqs], None, [k for _, k in reqs])
    for sink, want in zip(sinks, alone, strict=True):
        assert sink.tokens == want.tokens and sink.result.finish_reason == "length"
    assert 0 < engine.spec_chunks < engine.chunks  # both kinds of chunk ran
    assert engine.spec_drafted > 0


def test_engine_hands_the_feature_drafter_the_slots_true_hidden_state(tmp_path):
    """The target whose hidden state is rms(embedding) and the feature net that predicts it exactly (see
    tests/test_speculative.py): every draft must be accepted, which holds only if each slot's last hidden state
    is right after its insert, after plain chunks (several slots decoding) and after speculative ones."""
    from tests.test_speculative import CFG, _exact_feature_setup

    p, gen, fd = _exact_feature_setup()
    engine = _feature_engine(tmp_path, p, CFG, "feature", fd)
    reqs = [([5, 6, 7, 8], 24), ([10, 11, 12], 10), ([20, 30, 40, 50, 60], 30)]
    sinks = drive(engine, [dict(prompt=q, max_new=k) for q, k in reqs])
    alone = gen.generate([q for q, _ in reqs], None, [k for _, k in reqs])
    assert [s.tokens for s in sinks] == [r.tokens for r in alone]
    assert 0 < engine.spec_chunks < engine.chunks
    assert engine.spec_drafted > 0 and engine.spec_accepted == engine.spec_drafted
