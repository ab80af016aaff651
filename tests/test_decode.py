"""The compiled decode loop on a tiny random model: invariants, stopping, streaming, the hook slot, retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax import decode
from aqjax.engine import Generator, RequestError, bucket
from aqjax.sampling import SamplingConfig
from models.config import tiny_config
from gate.core import NO_RULE, NO_TOKEN, Decision, Gate, Outcome, Verdict
from models.params import init_params

CFG = tiny_config(max_seq_len=256)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]


@pytest.fixture(scope="module")
def gen():
    return Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])


def test_greedy_generation_equals_teacher_forced_argmax(gen):
    res = gen.generate(PROMPTS, max_new_tokens=12)
    for prompt, r in zip(PROMPTS, res):
        assert len(r.tokens) == 12 and r.finish_reason == "length"
        logits = decode.score(gen.params, jnp.asarray([prompt + r.tokens]), cfg=CFG)
        tf = np.asarray(logits[0].argmax(-1))[len(prompt) - 1:-1]
        np.testing.assert_array_equal(tf, r.tokens)


def test_prompt_alone_equals_prompt_in_ragged_batch(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert gen.generate([p], max_new_tokens=10)[0].tokens == batch[i].tokens
    # sampled rows too: a row's draws depend only on its seed
    cfgs = [SamplingConfig(temperature=1.0, seed=s) for s in (1, 2, 3)]
    sampled = gen.generate(PROMPTS, cfgs, max_new_tokens=10)
    assert gen.generate([PROMPTS[1]], cfgs[1], max_new_tokens=10)[0].tokens == sampled[1].tokens


def test_streaming_chunks_equal_one_shot_generation(gen):
    cfgs = [SamplingConfig(temperature=0.8, top_p=0.9, seed=s) for s in range(3)]
    one_shot = gen.generate(PROMPTS, cfgs, max_new_tokens=[7, 12, 3])
    streamed = [[] for _ in PROMPTS]
    for new, _ in gen.stream(PROMPTS, cfgs, max_new_tokens=[7, 12, 3], chunk_size=5):
        for i, toks in enumerate(new):
            streamed[i] += toks
    assert streamed == [r.tokens for r in one_shot]
    assert [len(r.tokens) for r in one_shot] == [7, 12, 3]


def test_stop_tokens_end_rows_and_are_not_emitted(gen):
    free = gen.generate(PROMPTS, max_new_tokens=12)
    stop = free[0].tokens[4]
    first = free[0].tokens.index(stop)
    res = gen.generate(PROMPTS, max_new_tokens=12, stop_ids=[stop])
    assert res[0].tokens == free[0].tokens[:first] and res[0].finish_reason == "stop"
    for f, r in zip(free[1:], res[1:]):
        cut = f.tokens.index(stop) if stop in f.tokens else len(f.tokens)
        assert r.tokens == f.tokens[:cut]


def test_zero_max_tokens_and_request_errors(gen):
    r = gen.generate([PROMPTS[0]], max_new_tokens=0)[0]
    assert r.tokens == [] and r.finish_reason == "length"
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        gen.generate([[1, 2], []])
    with pytest.raises(RequestError, match="exceed the context of 256"):
        gen.generate([[1] * 200], max_new_tokens=100)
    with pytest.raises(RequestError, match="outside"):
        gen.generate([[1, CFG.vocab_size]])


def _ban_gate(vocab: int):
    """A toy gate: the policy is a banned token id; the per-row state counts emitted tokens."""

    def init(policy, batch):
        return jnp.zeros((batch,), jnp.int32)

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], vocab)
        return d.replace(mask=d.mask.at[:, policy].set(False),
                         block_rule=jnp.where(logits.argmax(-1) == policy, 7, NO_RULE))

    def check(policy, state, token):
        return Outcome.unchanged(token)

    def advance(policy, state, token, emitted, seen):
        return state + emitted.astype(state.dtype)

    return Gate(init, evaluate, check, advance)


BAN = _ban_gate(CFG.vocab_size)


def test_gate_masks_tokens_carries_state_and_records_blocks(gen):
    free = gen.generate(PROMPTS, max_new_tokens=12)
    banned = free[0].tokens[0]
    res, state = gen.generate(PROMPTS, max_new_tokens=12, gate=BAN, policy=jnp.int32(banned), return_state=True)
    assert all(banned not in r.tokens for r in res)
    # the gate state counted exactly the emitted tokens of each real row
    np.testing.assert_array_equal(np.asarray(state.gate_state)[:3], [len(r.tokens) for r in res])
    # row 0's very first top choice was blocked: the audit event names the token, rule and admissible mass
    ev = res[0].events[0]
    assert (ev.step, ev.kind, ev.token, ev.rule) == (0, "block", banned, 7)
    assert 0.0 < ev.mass < 1.0 and ev.entropy > 0
    assert all(e.kind == "block" and e.token == banned for r in res for e in r.events)
    # the same gate with another policy value reuses the compiled loop
    sizes = decode.jit_decode_until_done._cache_size()
    gen.generate(PROMPTS, max_new_tokens=12, gate=BAN, policy=jnp.int32(free[1].tokens[0]))
    assert decode.jit_decode_until_done._cache_size() == sizes


def test_gate_state_restores_across_turns(gen):
    _, s1 = gen.generate(PROMPTS[:1], max_new_tokens=5, gate=BAN, policy=jnp.int32(0), return_state=True)
    carried = jax.tree.map(lambda x: x[:1], s1.gate_state)
    _, s2 = gen.generate(PROMPTS[:1], max_new_tokens=4, gate=BAN, policy=jnp.int32(0), gate_state=carried,
                         return_state=True)
    assert int(s2.gate_state[0]) == 9


def _messages_gate(vocab: int):
    """Forces token 3 at every step after the first, rewrites sampled token 5 into 6, stops after 4 tokens."""

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], vocab)
        return d.replace(forced=jnp.where(state >= 1, 3, NO_TOKEN), stop=state >= 4,
                         verdict=jnp.where(state >= 4, Verdict.DEFER, Verdict.ADMIT),
                         rule=jnp.where(state >= 4, 11, NO_RULE), confidence=jnp.where(state >= 2, 0.5, 1.0))

    def check(policy, state, token):
        o = Outcome.unchanged(token)
        return o.replace(token=jnp.where(token == 5, 6, token))

    return Gate(lambda p, b: jnp.zeros((b,), jnp.int32), evaluate, check,
                lambda p, s, t, e, seen: s + e.astype(s.dtype))


def test_forced_tokens_stop_and_verdicts():
    gen = Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])
    res = gen.generate(PROMPTS, max_new_tokens=12, gate=_messages_gate(CFG.vocab_size), policy=())
    for r in res:
        assert r.tokens[1:] == [3, 3, 3] and r.finish_reason == "gate"
        assert r.verdict == Verdict.DEFER and r.rule == 11 and r.confidence == 0.5
        assert [e.kind for e in r.events] == ["force", "force", "force", "stop"]


def test_empty_admissible_set_refuses_cleanly(gen):
    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], CFG.vocab_size)
        return d.replace(mask=jnp.broadcast_to(state[:, None] < 2, d.mask.shape))

    g = Gate(lambda p, b: jnp.zeros((b,), jnp.int32), evaluate, lambda p, s, t: Outcome.unchanged(t),
             lambda p, s, t, e, seen: s + e.astype(s.dtype))
    res = gen.generate(PROMPTS, max_new_tokens=12, gate=g, policy=())
    for r in res:
        assert len(r.tokens) == 2 and r.finish_reason == "gate" and r.verdict == Verdict.REFUSE
        assert all(0 <= t < CFG.vocab_size for t in r.tokens)
        assert r.events[-1].kind == "stop" and np.isfinite(r.events[-1].entropy)


def test_known_bucket_never_recompiles(gen):
    gen.generate([[1, 2, 3]], max_new_tokens=5)
    sizes = (decode.jit_start._cache_size(), decode.jit_decode_until_done._cache_size())
    # different lengths, contents and sampling settings within the same buckets
    gen.generate([[4, 5, 6, 7, 8, 9]], SamplingConfig(temperature=0.7, top_k=5, seed=3), max_new_tokens=9)
    assert (decode.jit_start._cache_size(), decode.jit_decode_until_done._cache_size()) == sizes
    assert bucket(3) == 4 and bucket(17, 16) == 32 and bucket(1, 16) == 16


def test_decode_step_traces_once():
    cfg = CFG
    g = Generator(cfg, init_params(cfg, jax.random.key(1)), stop_ids=[])
    step = jax.jit(chex.assert_max_traces(decode.decode_step, n=1), static_argnames=("cfg", "gate"))
    for prompt in ([1, 2, 3], [9, 8, 7, 6]):
        _, state = g.start([prompt], max_new_tokens=4)
        for _ in range(3):
            state = step(g.params, state, cfg=cfg)
    chex.clear_trace_counter()
