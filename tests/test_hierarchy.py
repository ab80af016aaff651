"""Composition and hierarchy: a lower level only tightens what the level above admits, token by token.

Parent and child policies are compiled separately for the same tokenizer and driven side by side along
random walks that the child admits; at every step the child's mask must be a subset of the parent's, and the
child's verdict at least the parent's.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.core import Decision, Verdict, chain, merge_decisions
from gate.policy import Policy, compile_policy

WORDS = ["secret", "password", "launch", "code", "bomb", "recipe", "hello", "world", "json", "answer"]


# jitted with the gate static: gates of the same kinds are the same object, so shape buckets are compiled once
_evaluate = jax.jit(lambda g, *a: g.evaluate(*a), static_argnums=0)
_check = jax.jit(lambda g, *a: g.check(*a), static_argnums=0)
_advance = jax.jit(lambda g, *a: g.advance(*a), static_argnums=0)

phrase_sets = st.lists(st.tuples(st.sampled_from(WORDS), st.sampled_from(WORDS[:4])), min_size=0, max_size=3,
                       unique=True)


@settings(max_examples=15, deadline=None)
@given(parent=phrase_sets, child=phrase_sets, with_structure=st.booleans(), seed=st.integers(0, 2**16))
def test_child_never_admits_what_the_parent_forbids(bpe, parent, child, with_structure, seed):
    def phrases(pairs):
        return [{"phrase": f"{a} {b}", "action": "suppress"} for a, b in pairs]

    doc = {"aqjax_policy": 1, "name": "parent", "messages": {"redaction": "[#]"},
           "levels": {"deployment": {"phrases": phrases(parent)}}}
    try:
        parent_policy = Policy.from_dict(doc)
        fragment = {"phrases": phrases(child)}
        if with_structure:
            fragment["structure"] = {"regex": "[a-z ]{0,12}"}
        child_policy = parent_policy.merge_child("session", fragment)
    except ValueError:
        return  # a fragment the rules reject (e.g. duplicate phrases): nothing to compare
    p = compile_policy(parent_policy, bpe)
    c = compile_policy(child_policy, bpe)
    V = bpe.vocab_size
    rng = np.random.default_rng(seed)
    ps, cs = p.gate.init(p.arrays, 1), c.gate.init(c.arrays, 1)
    logits = jnp.asarray(rng.normal(size=(1, V)).astype(np.float32))
    yes = jnp.ones((1,), bool)
    for _ in range(12):
        dp = _evaluate(p.gate, p.arrays, ps, logits)
        dc = _evaluate(c.gate, c.arrays, cs, logits)
        assert not np.any(np.asarray(dc.mask) & ~np.asarray(dp.mask))
        assert int(dc.verdict[0]) >= int(dp.verdict[0])
        allowed = np.flatnonzero(np.asarray(dc.mask[0]))
        if dc.stop[0] or allowed.size == 0:
            break
        t = jnp.asarray([int(rng.choice(allowed))])
        t = jnp.where(dc.forced >= 0, dc.forced, t)
        tok = _check(c.gate, c.arrays, cs, t).token
        ps = _advance(p.gate, p.arrays, ps, tok, yes, tok)
        cs = _advance(c.gate, c.arrays, cs, tok, yes, t)


def _toy_gate(mask_row, verdict, rule):
    """A gate with a fixed decision, to check the composition rules of `chain` directly."""
    from gate.core import Gate, Outcome

    def evaluate(policy, state, logits):
        d = Decision.admit_all(logits.shape[0], logits.shape[1])
        return d.replace(mask=jnp.broadcast_to(jnp.asarray(mask_row), d.mask.shape),
                         verdict=jnp.full_like(d.verdict, verdict), rule=jnp.full_like(d.rule, rule))

    return Gate(lambda p, b: (), evaluate, lambda p, s, t: Outcome.unchanged(t), lambda p, s, t, e, seen=None: s)


def test_chain_intersects_masks_and_keeps_the_highest_verdict():
    outer = _toy_gate([True, True, False, True], Verdict.DOWNGRADE, 3)
    inner = _toy_gate([True, False, True, True], Verdict.DEFER, 9)
    g = chain(outer, inner)
    d = g.evaluate(((), ()), ((), ()), jnp.zeros((2, 4)))
    np.testing.assert_array_equal(np.asarray(d.mask[0]), [True, False, False, True])
    assert int(d.verdict[0]) == Verdict.DEFER and int(d.rule[0]) == 9
    # order does not change the verdict or the mask
    d2 = chain(inner, outer).evaluate(((), ()), ((), ()), jnp.zeros((2, 4)))
    np.testing.assert_array_equal(np.asarray(d2.mask), np.asarray(d.mask))
    assert int(d2.verdict[0]) == Verdict.DEFER
    # merging is associative on the mask and verdict
    a, b, c = (Decision.admit_all(1, 3).replace(mask=jnp.asarray([m]), verdict=jnp.asarray([v]))
               for m, v in (([1, 1, 0], 0), ([1, 0, 1], 2), ([0, 1, 1], 1)))
    left, right = merge_decisions(merge_decisions(a, b), c), merge_decisions(a, merge_decisions(b, c))
    for x, y in ((left.mask, right.mask), (left.verdict, right.verdict)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    jax.block_until_ready(left.mask)
