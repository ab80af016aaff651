"""Speculative decoding: greedy equality with plain decoding, exact gated distribution, admissibility.

Tiny random models carry the invariants (any drafter, forced tokens and stops, streaming, rollback of the
drafter, no retracing), a statistical test of the sampled distribution against exact enumeration (and of its
power against a wrong acceptance rule), and a hypothesis property test; the real default model carries greedy
equality for every drafter, with and without a policy.
"""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqjax import speculative
from aqjax.cache import KVCache
from aqjax.decode import score
from aqjax.drafters import (
    DraftModel,
    load_draft,
    load_feature_draft,
    random_draft,
    random_feature_draft,
    save_draft,
    save_feature_draft,
)
from aqjax.engine import Generator, RequestError
from aqjax.sampling import SamplingConfig, SamplingParams, filter_logits
from aqjax.speculative import SpeculativeGenerator, speculative_generator
from gate.core import NO_RULE, NO_TOKEN, Decision, Gate, Outcome, Verdict
from models.config import tiny_config
from models.params import init_params

CFG = tiny_config(max_seq_len=256)
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7], [10, 11, 12], list(range(20, 40))]
MAX_NEW = [24, 7, 30]


@pytest.fixture(scope="module")
def tiny():
    gen = Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])
    p = gen.params
    # The target as its own draft: every draft is accepted (exercises full windows and the pending token).
    perfect = DraftModel(cfg=CFG, params={"layers": p["layers"], "final_norm": p["final_norm"], "head": p["lm_head"]},
                         vocab_ids=np.arange(CFG.vocab_size))
    rand = random_draft(CFG, p, jax.random.key(3), n_layers=1, head_vocab=128)
    feat = random_feature_draft(CFG, jax.random.key(4), head_vocab=160)
    # min_confidence 0: the random heads' drafts run their full length (the floor has its own test)
    return gen, SpeculativeGenerator(gen, draft=rand, feature=feat, self_layers=1, head_vocab=None,
                                     min_confidence=0.0), \
        SpeculativeGenerator(gen, "draft", draft=perfect)


@functools.cache  # one Gate object per vocabulary: a new one would be a new static argument (a recompile)
def _busy_gate(vocab: int):
    """Masks the policy's token id and one more that depends on the step; downgrades at step 4, forces token 3
    at steps 9 and 10, rewrites a sampled 5 into 6, stops at step 14. The state counts emitted tokens."""

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], vocab)
        mask = d.mask.at[:, policy].set(False)
        mask = mask & (jnp.arange(vocab)[None, :] != (state[:, None] * 7) % vocab)
        return d.replace(mask=mask, block_rule=jnp.where(~mask[jnp.arange(len(state)), logits.argmax(-1)], 7, NO_RULE),
                         forced=jnp.where((state == 9) | (state == 10), 3, NO_TOKEN), stop=state >= 14,
                         verdict=jnp.where(state >= 14, Verdict.DEFER, jnp.where(state == 4, Verdict.DOWNGRADE, 0)),
                         rule=jnp.where(state >= 14, 11, NO_RULE), confidence=jnp.where(state >= 4, 0.5, 1.0))

    def check(policy, state, token):
        return Outcome.unchanged(token).replace(token=jnp.where(token == 5, 6, token))

    return Gate(lambda p, b: jnp.zeros((b,), jnp.int32), evaluate, check,
                lambda p, s, t, e, seen: s + e.astype(s.dtype))


def _assert_same(res, ref):
    """Same tokens, finish, verdict, rule and audit events (entropy/mass up to float rounding)."""
    for r, q in zip(res, ref, strict=True):
        assert (r.tokens, r.finish_reason, r.verdict, r.rule) == (q.tokens, q.finish_reason, q.verdict, q.rule)
        assert r.confidence == pytest.approx(q.confidence)
        assert len(r.events) == len(q.events)
        for a, b in zip(r.events, q.events, strict=True):
            assert (a.step, a.kind, a.token, a.emitted, a.rule, a.verdict) == \
                (b.step, b.kind, b.token, b.emitted, b.rule, b.verdict)
            assert a.entropy == pytest.approx(b.entropy, abs=1e-4) and a.mass == pytest.approx(b.mass, abs=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_greedy_equals_plain_decoding_for_any_drafter(tiny, gated):
    gen, sg, perfect = tiny
    kw = dict(gate=_busy_gate(CFG.vocab_size), policy=jnp.int32(17)) if gated else {}
    ref, ref_state = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, return_state=True, **kw)
    if gated:  # the premise: the gate masked, forced, rewrote, downgraded and stopped
        kinds = {e.kind for r in ref for e in r.events}
        assert kinds >= {"block", "force", "stop", "verdict"} and any(r.finish_reason == "gate" for r in ref)
    # the two code paths (deterministic lookup; a model drafter, bad or perfect): "self" is the model path too
    runs = [(sg, "lookup", 4), (perfect, "draft", 4), (sg, "feature", 3), (sg, "hybrid", 4)] + \
        ([] if gated else [(sg, "draft", 2)])
    for g, kind, k in runs:
        res, state, stats = g.generate(PROMPTS, max_new_tokens=MAX_NEW, speculative=kind, draft_k=k, **kw,
                                       return_state=True, return_stats=True)
        _assert_same(res, ref)
        if gated:  # the gate state followed exactly the emitted tokens
            np.testing.assert_array_equal(np.asarray(state.gate_state), np.asarray(ref_state.gate_state))
        elif g is perfect:
            assert stats.acceptance == 1.0 and stats.tokens_per_step > k  # full windows plus the bonus token


def test_drafter_rollback_is_exact(tiny):
    """The target as its own draft, but with a head over 200 of the 256 ids: a draft is accepted exactly when the
    target's token is in the head. Any error in the drafter's rollback (cache lengths, the pending token after a
    full window, skipped draft steps of the adaptive length) would reject more; the steps taken must equal a
    host simulation of the accepted lengths."""
    gen, _, _ = tiny
    p = gen.params
    ids = np.sort(np.random.default_rng(0).choice(CFG.vocab_size, 200, replace=False)).astype(np.int32)
    sub = DraftModel(cfg=CFG, params={"layers": p["layers"], "final_norm": p["final_norm"],
                                      "head": p["lm_head"][:, ids]}, vocab_ids=ids)
    k, limits = 4, [60, 50, 61]
    res, stats = SpeculativeGenerator(gen, "draft", draft=sub, draft_k=k, adaptive=True).generate(
        PROMPTS, max_new_tokens=limits, return_stats=True)
    drafted = np.isin(np.arange(CFG.vocab_size), ids)
    for r, limit, steps in zip(res, limits, stats.steps, strict=True):
        n_out, n_steps, avg, k_row = 1, 0, float(k), k
        while n_out < limit:
            a = 0
            while a < min(k_row, limit - n_out - 1) and drafted[r.tokens[n_out + a]]:
                a += 1
            n_out, n_steps = n_out + a + 1, n_steps + 1
            avg = 0.5 * avg + 0.5 * a
            k_row = int(np.clip(np.round(avg) + 1, 1, k))
        assert steps == n_steps
    assert 0.4 < stats.acceptance < 1.0


def _exact_feature_setup():
    """(params, Generator, FeatureDraft): a target whose layers add nothing (zero output projections, unit final
    norm): its hidden state at a position is rms(embedding of the token there), so a feature net computing
    z = f - rms(f) + rms(e) predicts the next hidden state exactly and every draft is accepted."""
    from aqjax.drafters import FeatureDraft, init_feature_net

    p = init_params(CFG, jax.random.key(0))
    p = p | {"final_norm": jnp.ones_like(p["final_norm"]),
             "layers": p["layers"] | {"wo": jnp.zeros_like(p["layers"]["wo"]),
                                      "w_down": jnp.zeros_like(p["layers"]["w_down"])}}
    gen = Generator(CFG, p, stop_ids=[])
    net = init_feature_net(jax.random.key(1), CFG.d_model, blocks=1, hidden=8)
    eye = jnp.eye(CFG.d_model, dtype=jnp.float32)
    net["w_in"] = jnp.concatenate([-eye, eye])
    return p, gen, FeatureDraft(net=net, vocab_ids=np.arange(CFG.vocab_size), d_model=CFG.d_model)


def test_feature_drafter_starts_each_window_from_the_targets_own_hidden_state(tiny):
    """After every verification the feature drafter's state (and `DecodeState.last_h`) must be the target's final
    hidden state at the position that produced the row's last token: checked at the end against a teacher-forced
    forward over prompt + output, for a drafter that is always rejected (the state comes from verified position
    0) and one that is always accepted (position k): an index off by one picks a neighbouring position."""
    from models.llama import forward

    gen_rand, sg_rand, _ = tiny
    _, gen_exact, fd = _exact_feature_setup()
    k = 3
    for gen, sg, accepted in ((gen_rand, sg_rand, False),
                              (gen_exact, SpeculativeGenerator(gen_exact, "feature", feature=fd, min_confidence=0.0),
                               True)):
        n, st, run = sg.start(PROMPTS, max_new_tokens=MAX_NEW, speculative="feature", draft_k=k)
        dparams = run.pop("dparams")
        st = speculative.jit_spec_until_done(gen.params, dparams, st, None, **run)
        res = sg.results(st, n, [len(p) for p in PROMPTS])
        assert [r.tokens for r in res] == [r.tokens for r in gen.generate(PROMPTS, max_new_tokens=MAX_NEW)]
        stats = speculative._stats(st, n)
        if accepted:  # full windows plus the bonus token
            assert stats.acceptance == 1.0 and stats.tokens_per_step > k
        else:
            assert stats.acceptance == 0.0
        # plain decoding carries the same hidden state when asked
        _, dec = gen.start(PROMPTS, max_new_tokens=MAX_NEW, keep_hidden=True)
        dec = speculative._decode.jit_decode_until_done(gen.params, dec, cfg=CFG)
        for b, (p, r) in enumerate(zip(PROMPTS, res, strict=True)):
            seq = jnp.asarray([p + r.tokens[:-1]], jnp.int32)
            h, _ = forward(gen.params, seq, KVCache.init(CFG, 1, seq.shape[1], jnp.float32), cfg=CFG)
            want = np.asarray(h[0, -1])
            np.testing.assert_allclose(np.asarray(st.draft.feat[b]), want, atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(np.asarray(st.dec.last_h[b]), want, atol=2e-4, rtol=1e-4)
            np.testing.assert_allclose(np.asarray(dec.last_h[b]), want, atol=2e-4, rtol=1e-4)


def test_feature_draft_checkpoint_round_trip_and_errors(tiny, tmp_path):
    gen, sg, _ = tiny
    fd = sg._feature
    path = save_feature_draft(tmp_path / "feature", fd, target_cfg=CFG)
    loaded = load_feature_draft(path, CFG)
    assert np.array_equal(loaded.vocab_ids, fd.vocab_ids) and loaded.d_model == CFG.d_model
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded.net, fd.net)))
    a = sg.generate(PROMPTS, max_new_tokens=MAX_NEW, speculative="feature", draft_k=2)
    b = SpeculativeGenerator(gen, "feature", feature=str(path), draft_k=2).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    with pytest.raises(FileNotFoundError, match="train_feature_drafter.py"):
        load_feature_draft(tmp_path / "missing")
    other = tiny_config(max_seq_len=256, d_model=CFG.d_model * 2)
    with pytest.raises(ValueError, match="width"):
        load_feature_draft(path, other)


def test_stop_ids_and_ragged_limits(tiny):
    gen, sg, perfect = tiny
    free = gen.generate(PROMPTS, max_new_tokens=MAX_NEW)
    stop = free[2].tokens[5]
    ref = gen.generate(PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[stop])
    _assert_same(sg.generate(PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[stop], speculative="lookup"), ref)
    _assert_same(perfect.generate(PROMPTS, max_new_tokens=MAX_NEW, stop_ids=[stop], draft_k=4), ref)
    r = sg.generate(PROMPTS, max_new_tokens=[0, 3, 1], speculative="lookup")
    assert [len(x.tokens) for x in r] == [0, 3, 1] and r[0].finish_reason == "length"


def test_sampled_rows_depend_only_on_their_seed_and_stream_equals_generate(tiny):
    gen, sg, _ = tiny
    cfgs = [SamplingConfig(temperature=1.0, top_p=0.9, seed=s) for s in (1, 2, 3)]
    order = [2, 0, 1]
    for kind, k in (("lookup", 4), ("draft", 2)):
        batch = sg.generate(PROMPTS, cfgs, max_new_tokens=MAX_NEW, speculative=kind, draft_k=k)
        # the same rows in another order (other neighbours, other batch slots): the same tokens
        moved = sg.generate([PROMPTS[i] for i in order], [cfgs[i] for i in order],
                            max_new_tokens=[MAX_NEW[i] for i in order], speculative=kind, draft_k=k)
        assert [r.tokens for r in moved] == [batch[i].tokens for i in order]
        assert [len(r.tokens) for r in batch] == MAX_NEW
    streamed = [[] for _ in PROMPTS]
    for new, _ in sg.stream(PROMPTS, cfgs, max_new_tokens=MAX_NEW, chunk_size=3, speculative="draft", draft_k=2):
        for i, toks in enumerate(new):
            streamed[i] += toks
    assert streamed == [r.tokens for r in batch]


def test_known_bucket_never_recompiles(tiny):
    _, sg, _ = tiny
    sg.generate(PROMPTS, max_new_tokens=MAX_NEW, speculative="lookup")
    sg.generate(PROMPTS, SamplingConfig(temperature=1.0, seed=1), max_new_tokens=MAX_NEW, speculative="lookup")
    size = speculative.jit_spec_until_done._cache_size()
    # other lengths, contents and sampling settings within the same buckets (greedy-only and sampled batches
    # are two variants: greedy-only ones do not compile the sampling paths)
    other = [list(range(40, 58)), [1], [2, 3]]
    sg.generate(other, max_new_tokens=19, speculative="lookup")
    sg.generate(other, [SamplingConfig(temperature=0.7, top_k=5, seed=3),
                SamplingConfig(), SamplingConfig(min_p=0.1, temperature=2.0)], max_new_tokens=19,
                speculative="lookup")
    assert speculative.jit_spec_until_done._cache_size() == size


def test_draft_checkpoint_round_trip(tiny, tmp_path):
    gen, _, _ = tiny
    dm = random_draft(CFG, gen.params, jax.random.key(5), n_layers=1, head_vocab=128)  # the fixture's shapes
    path = save_draft(tmp_path / "draft", dm, target_cfg=CFG)
    loaded = load_draft(path, CFG)
    assert loaded.cfg == dm.cfg and np.array_equal(loaded.vocab_ids, dm.vocab_ids)
    chex_equal = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded.params, dm.params)
    assert all(jax.tree.leaves(chex_equal))
    a = SpeculativeGenerator(gen, "draft", draft=dm, draft_k=2).generate(PROMPTS, max_new_tokens=MAX_NEW)
    b = SpeculativeGenerator(gen, "draft", draft=str(path), draft_k=2).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    with pytest.raises(FileNotFoundError, match="train_draft.py"):
        load_draft(tmp_path / "missing")


def test_api_errors_and_entry_point(tiny):
    gen, sg, _ = tiny
    assert speculative_generator(gen, "none") is gen
    assert isinstance(speculative_generator(gen, "lookup", 3), SpeculativeGenerator)
    with pytest.raises(RequestError, match="speculative must be"):
        sg.generate(PROMPTS, speculative="medusa")
    with pytest.raises(RequestError, match="draft_k"):
        sg.generate(PROMPTS, draft_k=0)
    # "none" through the speculative API is plain decoding
    assert [r.tokens for r in sg.generate(PROMPTS, max_new_tokens=MAX_NEW, speculative="none")] == \
        [r.tokens for r in gen.generate(PROMPTS, max_new_tokens=MAX_NEW)]


# ---------------------------------------------------------------------------------- the sampled distribution

SMALL = tiny_config(vocab_size=8, max_seq_len=64)
SENTINEL = SMALL.vocab_size


def _mod_mask(prev, offset, V):
    """Admissible tokens after `prev` (SENTINEL at the start): t with (t + 2 prev + offset) % 3 != 0."""
    t = jnp.arange(V)
    return (t[None, :] + 2 * prev[:, None] + offset) % 3 != 0


@functools.cache
def _mod_gate(V: int):
    """A gate whose mask depends on the previous token (so every draft position has its own mask)."""

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], logits.shape[-1])
        return d.replace(mask=_mod_mask(state, policy, V))

    def advance(policy, state, token, emitted, seen):
        return jnp.where(emitted, token, state)

    return Gate(lambda p, b: jnp.full((b,), SENTINEL, jnp.int32), evaluate, lambda p, s, t: Outcome.unchanged(t),
                advance)


@pytest.fixture(scope="module")
def small():
    gen = Generator(SMALL, init_params(SMALL, jax.random.key(11)), stop_ids=[])
    draft = random_draft(SMALL, gen.params, jax.random.key(12), n_layers=1)
    return gen, SpeculativeGenerator(gen, draft=draft, feature=random_feature_draft(SMALL, jax.random.key(13)),
                                     min_confidence=0.0)


def _exact_joint(gen, prompt, sampling: SamplingConfig, offset: int, n: int = 3):
    """P(t_0..t_{n-1}) of plain gated sampling, by enumeration: prod_i normalize(filter(p_i) * mask_i)."""
    V = SMALL.vocab_size
    seqs = np.asarray([prompt + list(c) for c in itertools.product(range(V), repeat=n - 1)], np.int32)
    logits = np.asarray(score(gen.params, jnp.asarray(seqs), cfg=SMALL))[:, len(prompt) - 1:]  # [V^(n-1), n, V]
    sp = SamplingParams.from_configs([sampling] * len(seqs))
    joint = np.ones((len(seqs),) + (V,) * n)
    for i in range(n):
        prev = np.full(len(seqs), SENTINEL) if i == 0 else seqs[:, len(prompt) + i - 1]
        masked = jnp.where(_mod_mask(jnp.asarray(prev), offset, V), logits[:, i], -jnp.inf)
        p = np.asarray(jax.nn.softmax(filter_logits(masked, sp), axis=-1))  # [V^(n-1), V]
        shape = [len(seqs)] + [1] * n
        shape[i + 1] = V
        joint = joint * p.reshape(shape)
    # row c of `seqs` fixes t_0..t_{n-2}: keep its own entries
    idx = np.asarray(list(itertools.product(range(V), repeat=n - 1)))
    out = np.zeros((V,) * n)
    for c, pre in enumerate(idx):
        out[tuple(pre)] = joint[(c,) + tuple(pre)]
    return out


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled; any count in an impossible cell
    (probability 0, e.g. an inadmissible token) gives p = 0."""
    counts, probs = counts.ravel(), probs.ravel()
    N = counts.sum()
    if counts[probs <= 1e-12].sum() > 0:
        return 0.0
    exp = N * probs
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    e = np.append(exp[big], exp[~big].sum())
    keep = e > 0
    stat = float(np.sum((obs[keep] - e[keep]) ** 2 / e[keep]))
    return float(jax.scipy.stats.chi2.sf(stat, keep.sum() - 1))


ALPHA = 1e-3
N_SAMPLES = 8192


def _sample_first_tokens(sg, prompt, sampling, offset, kind, n=3):
    cfgs = [SamplingConfig(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                           min_p=sampling.min_p, seed=1000 + i) for i in range(N_SAMPLES)]
    res = sg.generate([prompt] * N_SAMPLES, cfgs, max_new_tokens=n, gate=_mod_gate(SMALL.vocab_size),
                      policy=jnp.int32(offset), speculative=kind, draft_k=3)
    toks = np.asarray([r.tokens for r in res])
    counts = np.zeros((SMALL.vocab_size,) * n)
    np.add.at(counts, tuple(toks.T), 1)
    return counts


# The lookup drafter proposes from the repeated prompt (one-hot q); the random draft model and the random feature
# drafter draw from their own gated, filtered q'. Each must give exactly the distribution of plain gated sampling.
STAT_CASES = [("lookup", [1, 2, 3, 1, 2, 3, 1, 2], SamplingConfig(temperature=1.0, top_p=0.9), 1),
              ("draft", [4, 0, 6, 1], SamplingConfig(temperature=1.3, top_k=4), 2),
              ("feature", [2, 5, 1], SamplingConfig(temperature=0.9, min_p=0.05), 0),
              ("hybrid", [3, 1, 4, 3, 1, 4, 3], SamplingConfig(temperature=1.1, top_p=0.95), 1)]


@pytest.mark.parametrize("kind,prompt,sampling,offset", STAT_CASES)
def test_speculative_samples_follow_the_gated_target_distribution(small, kind, prompt, sampling, offset):
    """Chi-square goodness of fit at alpha = 1e-3 of the first 3 tokens (the 2nd and 3rd are speculative) over
    8192 independently seeded rows against exact enumeration (a false alarm once in a thousand seeds)."""
    gen, sg = small
    exact = _exact_joint(gen, prompt, sampling, offset)
    counts = _sample_first_tokens(sg, prompt, sampling, offset, kind)
    assert _chi_square_p(counts, exact) > ALPHA


def test_the_statistical_test_rejects_ungated_p_in_the_acceptance_rule(small, monkeypatch):
    """The same test with p (ungated) in place of p' in the acceptance ratio and the residual: rejected."""
    gen, sg = small
    monkeypatch.setattr(speculative, "_acceptance_logits", lambda raw, masked: raw)
    # a new function object: JAX's trace cache (keyed by the function) must not hand back the correct trace
    monkeypatch.setattr(speculative, "jit_spec_until_done", jax.jit(
        lambda *a, **kw: speculative.spec_until_done(*a, **kw), static_argnames=speculative._STATIC))
    kind, prompt, sampling, offset = STAT_CASES[1]
    counts = _sample_first_tokens(sg, prompt, sampling, offset, kind)
    assert _chi_square_p(counts, _exact_joint(gen, prompt, sampling, offset)) < ALPHA


@settings(max_examples=12, deadline=None)
@given(prompt=st.lists(st.integers(0, SMALL.vocab_size - 1), min_size=2, max_size=12),
       seed=st.integers(0, 2**31 - 1), offset=st.integers(0, 2), temperature=st.floats(0.0, 5.0),
       kind=st.sampled_from(["lookup", "draft", "feature", "hybrid"]))
def test_no_emitted_token_is_ever_inadmissible(small, prompt, seed, offset, temperature, kind):
    _, sg = small
    # a mixed batch: greedy, low and high temperature rows
    cfgs = [SamplingConfig(temperature=t, seed=seed + i) for i, t in enumerate((0.0, 0.8, 3.0, temperature))]
    res = sg.generate([prompt] * 4, cfgs, max_new_tokens=12, gate=_mod_gate(SMALL.vocab_size),
                      policy=jnp.int32(offset), speculative=kind, draft_k=3)
    for r in res:
        assert len(r.tokens) == 12
        prev = [SENTINEL] + r.tokens[:-1]
        ok = np.asarray(_mod_mask(jnp.asarray(prev), offset, SMALL.vocab_size))[np.arange(12), r.tokens]
        assert ok.all(), (r.tokens, offset)


# ------------------------------------------------------------------------------------------ the real model

JSON_ASK = "Give the capital of France as a JSON object with the keys city and country."
GROUNDED = ("Repeat the key facts of this text: The observatory on the ridge was founded in 1911 by amateur "
            "astronomers. Its first telescope had a lens of twenty centimetres. In 1923 a storm tore the canvas "
            "dome away, and a copper dome replaced it.")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"], "additionalProperties": False}
# One policy with both gates: a suppressed phrase and a JSON schema (the chained gate masks, blocks and ends).
POLICY = f"""
aqjax_policy: 1
name: spec-phrases-json
levels:
  deployment:
    phrases:
      - {{phrase: "paris", action: suppress}}
  turn:
    structure: {{json_schema: {json.dumps(SCHEMA)}}}
"""


@pytest.fixture(scope="module")
def real(smollm2):
    from gate.policy import compile_policy, parse_policy

    tok = smollm2.tokenizer
    gen = Generator(smollm2.cfg, smollm2.params, stop_ids=tok.stop_ids)
    draft = random_draft(smollm2.cfg, gen.params, jax.random.key(0), n_layers=1, head_vocab=4096)
    feature = random_feature_draft(smollm2.cfg, jax.random.key(1), head_vocab=4096)
    sg = SpeculativeGenerator(gen, draft=draft, feature=feature, self_layers=4)
    compiled = compile_policy(parse_policy(POLICY), tok)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}])) for t in (JSON_ASK, GROUNDED)]
    return tok, gen, sg, compiled, prompts


@pytest.mark.slow
@pytest.mark.parametrize("governed", [False, True])
def test_real_model_greedy_equality_for_every_drafter(real, governed):
    tok, gen, sg, compiled, prompts = real
    kw = dict(gate=compiled.gate, policy=compiled.arrays) if governed else {}
    ref = gen.generate(prompts, max_new_tokens=32, **kw)
    text = tok.decode(ref[0].tokens)
    # the premises: ungoverned, the answer names Paris; governed, the gate blocked it and the JSON parses
    assert ref[0].finish_reason == "stop" and set(json.loads(text)) == {"city", "country"}
    assert ("Paris" in text) != governed and (not governed or ref[0].events)
    for kind in ("lookup", "self", "draft", "feature", "hybrid"):
        res, stats = sg.generate(prompts, max_new_tokens=32, speculative=kind, return_stats=True, **kw)
        _assert_same(res, ref)
        if kind in ("lookup", "hybrid") and not governed:
            assert stats.tokens_per_step > 1.5  # the grounded answer copies from its prompt


@pytest.mark.slow
def test_governed_turn_through_the_speculative_generator(real):
    from gate.turn import governed_generate

    tok, gen, sg, compiled, prompts = real
    plain = governed_generate(gen, tok, compiled, prompts, max_new_tokens=32)
    spec = governed_generate(sg, tok, compiled, prompts, max_new_tokens=32)
    for a, b in zip(spec, plain, strict=True):
        assert (a.text, a.verdict, a.finish_reason) == (b.text, b.verdict, b.finish_reason)
        assert [e["action"] for e in a.events] == [e["action"] for e in b.events]
        for x, y in zip(jax.tree.leaves(a.gate_state), jax.tree.leaves(b.gate_state), strict=True):
            np.testing.assert_array_equal(x, y)


def test_lookup_state_rebuilt_from_prompt_and_output_equals_the_carried_one():
    """`lookup_state` (what the serving engine builds at each speculative chunk) equals the state `init` and the
    commits since would have carried, for ragged rows."""
    import jax.numpy as jnp

    from aqjax.drafters import lookup_drafter, lookup_state

    d = lookup_drafter()
    S, M = 24, 24
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50, size=n).tolist() for n in (5, 1, 9)]
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = max(lengths)
    prompt = np.zeros((3, T), np.int32)
    history = np.zeros((3, S), np.int32)
    for i, p in enumerate(prompts):
        prompt[i, :len(p)] = p
        history[i, :len(p)] = p
    first = jnp.asarray([7, 8, 9], jnp.int32)
    out = np.full((3, M), -1, np.int32)
    out[:, 0] = np.asarray(first)
    n_out = np.ones((3,), np.int32)

    class Cache:
        max_len = S

    st = d.init((), jnp.asarray(prompt), jnp.asarray(lengths), first, Cache())
    for step in range(3):  # commits of ragged lengths (0 = a row that emitted nothing)
        n = np.array([[2, 0, 3], [1, 4, 0], [3, 1, 2]][step], np.int32)
        toks = rng.integers(0, 50, size=(3, 5)).astype(np.int32)
        st = d.commit((), st, jnp.asarray(toks), jnp.asarray(n))
        for b in range(3):
            out[b, n_out[b]: n_out[b] + n[b]] = toks[b, : n[b]]
        n_out += n
    rebuilt = lookup_state(jnp.asarray(history), jnp.asarray(lengths), jnp.asarray(out), jnp.asarray(n_out))
    np.testing.assert_array_equal(rebuilt.length, st.length)
    for b in range(3):
        L = int(st.length[b])
        np.testing.assert_array_equal(np.asarray(rebuilt.buf)[b, :L], np.asarray(st.buf)[b, :L])
        assert np.all(np.asarray(rebuilt.buf)[b, L:] == -1)


def test_hybrid_drafts_lookups_continuation_where_it_matches_and_the_feature_head_elsewhere():
    """Row 0 repeats earlier text (lookup matches, 3 tokens of continuation known), row 1 matches nothing: row 0's
    draft is the looked-up tokens with a one-hot q', ending where lookup's does; row 1's is exactly the feature
    drafter's own proposal (same draws)."""
    from aqjax.drafters import _feature_propose, _hybrid_propose, feature_drafter, hybrid_drafter, lookup_drafter

    k, B, S = 4, 2, 32
    gen = Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])
    dparams = random_feature_draft(CFG, jax.random.key(4), head_vocab=200).dparams(gen.params, CFG)
    prompt = np.zeros((B, 8), np.int32)
    prompt[0] = [5, 6, 7, 8, 6, 7, 0, 0]  # 5 6 7 8 6 7 | last = 8: "6 7 8" recurs, continued by 6 7 8, then unknown
    prompt[1] = [20, 21, 22, 23, 24, 25, 26, 27]
    lengths = jnp.asarray([6, 8], jnp.int32)
    last = jnp.asarray([8, 30], jnp.int32)

    class Cache:
        max_len = S

    last_h = jax.random.normal(jax.random.key(1), (B, CFG.d_model), jnp.float32)
    st = hybrid_drafter().init(dparams, jnp.asarray(prompt), lengths, last, Cache(), last_h)
    look, _, _ = lookup_drafter().propose((), st.lookup, last, None, None, jnp.full((B,), k), k=k)
    assert list(np.asarray(look.valid[0])) == [True, True, True, False] and not np.asarray(look.valid[1]).any()
    assert list(np.asarray(look.tokens[0, :3])) == [6, 7, 8]
    sp = SamplingParams.from_configs([SamplingConfig(temperature=1.0, seed=s) for s in (1, 2)])
    keys = speculative._step_keys(sp, jnp.zeros((B,), jnp.int32))
    choose = speculative._make_choose(None, None, sp, keys, CFG.vocab_size, True)
    n_draft = jnp.full((B,), k, jnp.int32)
    prop, _, _ = _hybrid_propose(dparams, st, last, choose, None, n_draft, k=k, max_ngram=3, min_ngram=2)
    ref, _, _ = _feature_propose(dparams, st.feature, last, choose, None, n_draft, k=k)
    toks, q = np.asarray(prop.tokens), np.exp(np.asarray(prop.q_logp))
    np.testing.assert_array_equal(toks[0, :3], [6, 7, 8])
    assert list(np.asarray(prop.valid[0])) == [True, True, True, False]
    assert prop.q_ids is None  # q' over the whole vocabulary
    for j in range(3):  # one-hot q' at the looked-up token
        assert int(prop.q_col[0, j]) == toks[0, j] and q[0, j, toks[0, j]] == 1.0 and q[0, j].sum() == 1.0
    np.testing.assert_array_equal(toks[1], np.asarray(ref.tokens[1]))
    ids = np.asarray(ref.q_ids)  # the feature head's q' at its token ids, nothing elsewhere
    np.testing.assert_allclose(np.asarray(prop.q_logp[1])[:, ids], np.asarray(ref.q_logp[1]))
    assert np.all(np.delete(q[1], ids, axis=1) == 0.0)
    np.testing.assert_array_equal(np.asarray(prop.q_col[1]), ids[np.asarray(ref.q_col[1])])
    assert np.asarray(prop.valid[1]).all()
    assert feature_drafter().needs_hidden and hybrid_drafter().needs_hidden


def test_verification_widths_hold_every_draft_length():
    """A step verifies `last` and its drafts in the narrowest compiled width that holds the longest draft of any
    running row: 1 (no drafts: a plain step), 3, 5, 9, and k + 1."""
    from aqjax.speculative import verify_widths

    assert verify_widths(4) == (1, 3, 5)
    assert verify_widths(8) == (1, 3, 5, 9)
    assert verify_widths(6) == (1, 3, 5, 7)
    assert verify_widths(1) == (1, 2)
    for k in range(1, speculative.MAX_DRAFT_K + 1):
        w = verify_widths(k)
        assert w[0] == 1 and w[-1] == k + 1 and list(w) == sorted(set(w))


def test_confidence_floor_ends_each_draft_where_the_heads_own_confidence_falls():
    """With min_confidence c, a row's feature draft ends before the first position where the product of the head's
    top probabilities along the draft falls below c (recomputed here step by step from the net and the head);
    the tokens before are the unfloored drafter's. End to end, greedy output stays plain decoding's while fewer
    drafts are proposed."""
    from aqjax.drafters import _feature_propose, feature_drafter, feature_step

    k, B = 4, 8
    gen = Generator(CFG, init_params(CFG, jax.random.key(0)), stop_ids=[])
    fd = random_feature_draft(CFG, jax.random.key(4), head_vocab=40)
    fd.net["w_in"] = fd.net["w_in"] * 8.0  # sharper draft distributions: top probabilities spread over (0, 1)
    dparams = fd.dparams(gen.params, CFG)
    feat = jax.random.normal(jax.random.key(5), (B, CFG.d_model), jnp.float32)
    last = jnp.arange(B, dtype=jnp.int32) + 3
    sp = SamplingParams.from_configs([SamplingConfig()] * B)
    choose = speculative._make_choose(None, None, sp, speculative._step_keys(sp, jnp.zeros((B,), jnp.int32)),
                                      CFG.vocab_size, False)
    n_draft = jnp.full((B,), k, jnp.int32)
    state = feature_drafter().init(dparams, None, None, last, None, feat)

    # the confidences, independently: the net one position at a time, the head's softmax, the running product
    f, tok, conf, confs, toks = feat, last, np.ones(B), [], []
    for _ in range(k):
        f = feature_step(dparams["net"], f, dparams["embed"][tok].astype(jnp.float32))
        probs = np.asarray(jax.nn.softmax(f @ dparams["head"], axis=-1))
        conf = conf * probs.max(axis=-1)
        tok = dparams["vocab_ids"][probs.argmax(axis=-1)]
        confs.append(conf)
        toks.append(np.asarray(tok))
    confs, toks = np.stack(confs, axis=1), np.stack(toks, axis=1)  # [B, k]
    floor = float(np.median(confs[:, 1]))
    assert 0 < floor < 1 and confs[:, 0].max() >= floor  # some rows draft, some stop early

    full, _, _ = _feature_propose(dparams, state, last, choose, None, n_draft, k=k)
    cut, _, _ = _feature_propose(dparams, state, last, choose, None, n_draft, k=k, min_confidence=floor)
    assert np.asarray(full.valid).all()
    np.testing.assert_array_equal(np.asarray(full.tokens), toks)
    np.testing.assert_array_equal(np.asarray(cut.valid), confs >= floor)
    v = np.asarray(cut.valid)
    np.testing.assert_array_equal(np.asarray(cut.tokens)[v], toks[v])
    assert 0 < v.sum() < B * k

    plain = gen.generate(PROMPTS, max_new_tokens=MAX_NEW)
    drafted = {}
    for c in (0.0, floor):
        res, stats = SpeculativeGenerator(gen, "feature", feature=fd, min_confidence=c).generate(
            PROMPTS, max_new_tokens=MAX_NEW, return_stats=True)
        assert [r.tokens for r in res] == [r.tokens for r in plain]
        drafted[c] = sum(stats.drafted)
    assert drafted[floor] < drafted[0.0]
    with pytest.raises(ValueError, match="min_confidence"):
        SpeculativeGenerator(gen, "feature", feature=fd, min_confidence=1.0)
