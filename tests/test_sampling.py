"""Sampling: exact supports of top-k / top-p / min-p against a numpy reference, greedy, seeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aqjax.sampling import SamplingConfig, SamplingError, SamplingParams, sample, support

_jit_support = jax.jit(support)
_sample = jax.jit(sample)


def _np_support(logits, temperature, top_k, top_p, min_p, eps=0.0):
    """Independent reference: the kept token set, ties broken by lower token id.

    `eps` moves the top-p and min-p thresholds, to bracket float32 rounding at a boundary.
    """
    z = logits / (temperature if temperature > 0 else 1.0)
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    kept = order if top_k == 0 else order[:top_k]
    p = np.exp(z[kept] - z[kept].max())
    p /= p.sum()
    out, mass = [], 0.0
    for i, pi in zip(kept, p):
        if top_p >= 1.0 or mass < top_p + eps or not out:
            out.append(i)
        mass += pi
    zmax = max(z[i] for i in out)
    return {i for i in out if z[i] >= zmax + np.log(min_p) - eps} if min_p > 0 else set(out)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    top_k=st.sampled_from([0, 1, 2, 5, 31]),
    top_p=st.sampled_from([1.0, 0.9, 0.5, 0.05]),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_support_matches_reference(seed, temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 40)).astype(np.float32) * 3
    logits[1, :8] = logits[1, 0]  # ties
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    params = SamplingParams.from_configs([cfg, cfg])
    got = np.asarray(_jit_support(jnp.asarray(logits), params))
    for r in range(2):
        z = logits[r].astype(np.float64)
        lo = _np_support(z, temperature, top_k, top_p, min_p, eps=-1e-5)
        hi = _np_support(z, temperature, top_k, top_p, min_p, eps=1e-5)
        assert lo <= set(np.flatnonzero(got[r])) <= hi
        if top_k:
            assert len(np.flatnonzero(got[r])) <= top_k


def test_rows_use_their_own_parameters():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32))
    cfgs = [SamplingConfig(temperature=1.0, top_k=3), SamplingConfig(temperature=1.0, top_p=0.2),
            SamplingConfig(temperature=1.0)]
    sup = np.asarray(support(logits, SamplingParams.from_configs(cfgs)))
    assert sup[0].sum() == 3 and sup[2].sum() == 50 and 1 <= sup[1].sum() < 50


def test_top1_equals_greedy_and_samples_stay_in_support():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 300)).astype(np.float32))
    greedy = _sample(logits, SamplingParams.from_configs([SamplingConfig()] * 4), jnp.zeros(4, jnp.int32))
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(logits.argmax(-1)))
    top1 = SamplingParams.from_configs([SamplingConfig(temperature=1.3, top_k=1, seed=s) for s in range(4)])
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(_sample(logits, top1, jnp.full(4, i))), np.asarray(greedy))
    p = SamplingParams.from_configs([SamplingConfig(temperature=1.0, top_p=0.5, seed=s) for s in range(4)])
    sup = np.asarray(support(logits, p))
    for i in range(20):
        tok = np.asarray(_sample(logits, p, jnp.full(4, i)))
        assert sup[np.arange(4), tok].all()


def test_masked_tokens_are_never_drawn():
    logits = jnp.zeros((1, 10)).at[0, 3].set(-jnp.inf).at[0, 7].set(-jnp.inf)
    p = SamplingParams.from_configs([SamplingConfig(temperature=5.0, seed=9)])
    drawn = {int(_sample(logits, p, jnp.array([i]))[0]) for i in range(200)}
    assert 3 not in drawn and 7 not in drawn and len(drawn) == 8


def test_seeds_are_reproducible_and_independent_of_the_batch():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1000)).astype(np.float32))
    a = SamplingParams.from_configs([SamplingConfig(temperature=1.0, seed=42)])
    batch = SamplingParams.from_configs([SamplingConfig(temperature=1.0, seed=7), SamplingConfig(temperature=1.0, seed=42)])
    alone = [int(_sample(logits, a, jnp.array([i]))[0]) for i in range(10)]
    again = [int(_sample(logits, a, jnp.array([i]))[0]) for i in range(10)]
    in_batch = [int(_sample(jnp.tile(logits, (2, 1)), batch, jnp.array([i, i]))[1]) for i in range(10)]
    assert alone == again == in_batch
    other = [int(_sample(logits, SamplingParams.from_configs([SamplingConfig(temperature=1.0, seed=43)]),
                        jnp.array([i]))[0]) for i in range(10)]
    assert other != alone


def test_temperature_one_matches_softmax_frequencies():
    # 4,000 draws from a 4-token distribution: each frequency within 5 standard errors (p ~ 1e-6 of a false alarm).
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0).astype(np.float32))
    p = SamplingParams.from_configs([SamplingConfig(temperature=1.0, seed=s) for s in range(4000)])
    tok = np.asarray(_sample(logits, p, jnp.zeros(4000, jnp.int32)))
    freq = np.bincount(tok, minlength=4) / 4000
    se = np.sqrt(probs * (1 - probs) / 4000)
    assert np.all(np.abs(freq - probs) < 5 * se), freq


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(min_p=2), dict(seed=-1)])
def test_bad_sampling_settings_are_rejected(kw):
    with pytest.raises(SamplingError, match=next(iter(kw))):
        SamplingConfig(**kw)
