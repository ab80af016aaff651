"""Governed log-probabilities of the decode loop on a tiny random model: the raw logits renormalised over what the
gate admitted, checked against an independent teacher-forced forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax import decode
from aqjax.engine import Generator, RequestError
from aqjax.sampling import SamplingConfig
from gate.core import NO_TOKEN, Decision, Gate, Outcome
from models.config import tiny_config
from models.params import init_params

CFG = tiny_config(max_seq_len=256)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40))]
TOL = 1e-4  # f32 logits of the cached decode against the teacher-forced pass


@pytest.fixture(scope="module")
def gen():
    return Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])


def _ban_top_gate(vocab: int, n_ban: int = 3):
    """Masks the model's n_ban most likely tokens at every step (what a policy blocks is often what the model
    wants most)."""

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], vocab)
        _, top = jax.lax.top_k(logits, n_ban)
        return d.replace(mask=~jnp.any(jnp.arange(vocab)[None, :, None] == top[:, None, :], axis=-1))

    return Gate(lambda p, b: jnp.zeros((b,), jnp.int32), evaluate, lambda p, s, t: Outcome.unchanged(t),
                lambda p, s, t, e, seen: s + e.astype(s.dtype))


def _teacher_forced(gen, prompt, tokens):
    """Float[n, V] log_softmax of the raw logits that predicted each generated token (independent of the loop)."""
    logits = decode.score(gen.params, jnp.asarray([prompt + tokens]), cfg=CFG)[0].astype(jnp.float32)
    return np.asarray(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)])


def _masked_log_softmax(logits, banned):
    x = np.array(logits, np.float64)
    x[banned] = -np.inf
    m = x.max()
    return x - m - np.log(np.sum(np.exp(x - m)))


def test_off_allocates_nothing_and_on_changes_no_token(gen):
    cfgs = [SamplingConfig(temperature=0.9, seed=s) for s in range(3)]
    off, s_off = gen.generate(PROMPTS, cfgs, max_new_tokens=10, return_state=True)
    on, s_on = gen.generate(PROMPTS, cfgs, max_new_tokens=10, return_state=True, top_logprobs=4)
    assert s_off.logprobs is None and all(r.logprobs is None for r in off)
    assert [r.tokens for r in on] == [r.tokens for r in off]
    assert s_on.logprobs.top_ids.shape == s_on.out.shape + (4,)
    for r in on:
        assert len(r.logprobs) == len(r.tokens) and all(len(alts) == 4 for _, alts in r.logprobs)


def test_ungated_logprobs_equal_teacher_forced_log_softmax(gen):
    # sampled at temperature 1.5: the log-probabilities are still the raw model's (no temperature, no top-p)
    cfgs = [SamplingConfig(temperature=1.5, top_p=0.9, seed=s) for s in range(3)]
    res = gen.generate(PROMPTS, cfgs, max_new_tokens=8, top_logprobs=5)
    for prompt, r in zip(PROMPTS, res, strict=True):
        ref = jax.nn.log_softmax(jnp.asarray(_teacher_forced(gen, prompt, r.tokens)), axis=-1)
        ref = np.asarray(ref)
        for j, (t, (lp, alts)) in enumerate(zip(r.tokens, r.logprobs, strict=True)):
            np.testing.assert_allclose(lp, ref[j, t], atol=TOL)
            ids = [i for i, _ in alts]
            np.testing.assert_array_equal(ids, np.argsort(-ref[j], kind="stable")[:5])
            np.testing.assert_allclose([v for _, v in alts], ref[j, ids], atol=TOL)


def test_gated_logprobs_are_renormalised_over_the_mask_and_never_show_blocked_tokens(gen):
    gate = _ban_top_gate(CFG.vocab_size, 3)
    res = gen.generate(PROMPTS, max_new_tokens=8, gate=gate, policy=(), top_logprobs=8)
    for prompt, r in zip(PROMPTS, res, strict=True):
        logits = _teacher_forced(gen, prompt, r.tokens)
        for j, (t, (lp, alts)) in enumerate(zip(r.tokens, r.logprobs, strict=True)):
            banned = np.argsort(-logits[j], kind="stable")[:3]
            ref = _masked_log_softmax(logits[j], banned)
            assert t not in banned
            np.testing.assert_allclose(lp, ref[t], atol=TOL)
            ids, vals = [i for i, _ in alts], [v for _, v in alts]
            assert not set(ids) & set(banned.tolist())  # what the gate blocked never leaks
            assert vals == sorted(vals, reverse=True) and len(ids) == 8
            assert ids[0] == t  # greedy: the chosen token is the most likely admissible one
            np.testing.assert_allclose(vals, ref[ids], atol=TOL)


def test_forced_or_rewritten_token_outside_the_mask_gets_the_floor(gen):
    """A gate that admits only even ids but forces token 3 from the second step on."""

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], CFG.vocab_size)
        return d.replace(mask=jnp.broadcast_to(jnp.arange(CFG.vocab_size) % 2 == 0, d.mask.shape),
                         forced=jnp.where(state >= 1, 3, NO_TOKEN))

    g = Gate(lambda p, b: jnp.zeros((b,), jnp.int32), evaluate, lambda p, s, t: Outcome.unchanged(t),
             lambda p, s, t, e, seen: s + e.astype(s.dtype))
    res = gen.generate(PROMPTS, max_new_tokens=4, gate=g, policy=(), top_logprobs=3)
    for r in res:
        assert r.tokens[1:] == [3, 3, 3]
        assert r.logprobs[0][0] > decode.LOGPROB_FLOOR and r.tokens[0] % 2 == 0
        assert [lp for lp, _ in r.logprobs[1:]] == [decode.LOGPROB_FLOOR] * 3
        assert len(r.logprobs[0][1]) == 3 and all(alts == () for _, alts in r.logprobs[1:])  # forced: none offered
        assert all(i % 2 == 0 for _, alts in r.logprobs for i, _ in alts)


def test_zero_alternatives_and_bad_values(gen):
    r = gen.generate(PROMPTS[:1], max_new_tokens=3, top_logprobs=0)[0]
    assert len(r.logprobs) == 3 and all(alts == () and lp <= 0 for lp, alts in r.logprobs)
    with pytest.raises(RequestError):
        gen.generate(PROMPTS[:1], max_new_tokens=3, top_logprobs=-1)


def test_streamed_state_holds_the_same_logprobs(gen):
    one_shot = gen.generate(PROMPTS, max_new_tokens=9, top_logprobs=2)
    state = None
    for _new, s in gen.stream(PROMPTS, max_new_tokens=9, chunk_size=4, top_logprobs=2):
        state = s
    assert [r.logprobs for r in gen.results(state, 3, [len(p) for p in PROMPTS])] == [r.logprobs for r in one_shot]


def test_tokens_the_gate_would_rewrite_are_no_alternatives(gen):
    """Admitted by the mask but rewritten by `check` (how substitution and refusal rules work): such a token is
    never offered as an alternative, since that would reveal what the policy hides."""
    free = gen.generate(PROMPTS, max_new_tokens=6, top_logprobs=6)
    hidden = [alts[1][0] for r in free for _, alts in r.logprobs]  # each step's runner-up

    def check(policy, state, token):
        o = Outcome.unchanged(token)
        return o.replace(token=jnp.where(jnp.any(token[:, None] == policy[None, :], axis=-1), 0, token))

    g = Gate(lambda p, b: jnp.zeros((b,), jnp.int32), lambda p, s, lg: Decision.admit_all(lg.shape[0], CFG.vocab_size),
             check, lambda p, s, t, e, seen: s + e.astype(s.dtype))
    res = gen.generate(PROMPTS, max_new_tokens=6, gate=g, policy=jnp.asarray(hidden, jnp.int32), top_logprobs=6)
    for r in res:
        assert all(a not in hidden for _, alts in r.logprobs for a, _ in alts)
        assert all(len(alts) >= 1 for _, alts in r.logprobs)


@pytest.mark.slow
def test_real_model_never_offers_what_a_phrase_rule_hides(smollm2):
    from gate.phrases import contains_banned
    from gate.policy import compile_policy, parse_policy

    tok = smollm2.tokenizer
    real = Generator(smollm2.cfg, smollm2.params, stop_ids=tok.stop_ids)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True))
    free = real.generate([prompt], max_new_tokens=8, top_logprobs=5)[0]
    assert "Paris" in tok.decode(free.tokens)  # ungated, the model says it (and offers it)
    for action in ("suppress", "substitute"):
        compiled = compile_policy(parse_policy(
            f"aqjax_policy: 1\nname: lp\nlevels:\n  deployment:\n    phrases: [{{phrase: paris, action: {action}}}]\n"),
            tok)
        r = real.generate([prompt], max_new_tokens=8, gate=compiled.gate, policy=compiled.arrays, top_logprobs=5)[0]
        assert len(r.logprobs) == len(r.tokens)
        for j, (_, alts) in enumerate(r.logprobs):
            before = tok.decode(r.tokens[:j])
            for a, _ in alts:
                assert not contains_banned(before + tok.decode([a]), ["paris"], compiled.normalization), (action, a)
