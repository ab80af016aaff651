"""Escalation on session history: counters, rules that fire exactly at their counts, their effects on the other
gates, and refused topics inside the loop for the rows whose rule is active."""

import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_authority import BANK, each_row, rollout, texts, toy

from gate import escalation as X
from gate.core import Verdict
from gate.policy import PolicyError, load_policy, parse_policy

POLICY = parse_policy(textwrap.dedent("""
    aqjax_policy: 1
    name: escalating
    evidence: {base_budget: 10}
    tools:
      ping: {parameters: {type: object, properties: {}}}
      transfer: {parameters: {type: object, properties: {amount: {type: integer}}}}
    escalation:
      - {counter: refusals, at: 2, tighten: {budget_scale: 0.5}}
      - {counter: refusals, at: 4, tighten: {budget_scale: 0.5, refuse_topics: ["bas"]}}
      - {counter: blocked, at: 1, tighten: {forbid_tools: [transfer]}}
      - {counter: violations, at: 3, tighten: {refuse_topics: ["stab", "tata"]}}
    """))
RULES = [20, 21, 22, 23]


def compiled():
    return X.compile_escalation(POLICY, toy(), rules=RULES)


OUTCOMES = st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=12)


@settings(max_examples=60, deadline=None)
@given(OUTCOMES)
def test_rules_fire_exactly_at_their_counts(outcomes):
    counters = (0, 0, 0)
    for refused, blocked, violated in outcomes:
        before = X.active_rules(POLICY, counters)
        counters = X.record_turn(counters, refused=refused, blocked=blocked, violated=violated)
        v, r, b = counters
        now = X.active_rules(POLICY, counters)
        assert now == [r >= 2, r >= 4, b >= 1, v >= 3]
        assert all(n or not o for o, n in zip(before, now, strict=True))  # once active, a rule stays active
    scale, forbid, topics = X.effects(POLICY, counters)
    v, r, b = counters
    assert scale == 0.5 ** ((r >= 2) + (r >= 4))
    assert forbid == (("transfer",) if b >= 1 else ())
    assert topics == ((r >= 4) << 1) | ((v >= 3) << 3)


def test_counters_at_the_threshold_and_one_below():
    for counter, idx, at in (("refusals", 1, 2), ("blocked", 2, 1), ("violations", 0, 3)):
        below = [0, 0, 0]
        below[("violations", "refusals", "blocked").index(counter)] = at - 1
        at_ = list(below)
        at_[("violations", "refusals", "blocked").index(counter)] = at
        rule = {"refusals": 0, "blocked": 2, "violations": 3}[counter]
        assert not X.active_rules(POLICY, below)[rule] and X.active_rules(POLICY, at_)[rule]
        assert idx == ("violations", "refusals", "blocked").index(counter)


def _state(topics):
    B = len(topics)
    return X.begin_turn(None, np.zeros((B, 3), np.int32), topics)


class EscalationVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_a_topic_is_refused_only_where_its_rule_is_active(self):
        pol = compiled()
        g = X.escalation_gate(toy().vocab_size)
        state = _state([1 << 3, 0, 1 << 1, (1 << 1) | (1 << 3)])
        adv = jax.jit(lambda s, t: g.advance(pol, s, t, jnp.ones((4,), bool)))
        for t in toy().encode("xsta"):
            state = adv(state, jnp.full((4,), t))
        tok = jnp.full((4,), toy().encode("b")[0])
        o = self.variant(lambda s, t: g.check(pol, s, t))(state, tok)
        chex.assert_trees_all_equal(jax.jit(each_row(lambda s, t: g.check(pol, s, t)))(state, tok), o)
        # "xstab" completes "stab" (rule 3) and, for rows with rule 1, also... nothing: "bas" is not complete
        assert np.asarray(o.rule).tolist() == [23, -1, -1, 23]
        assert np.asarray(o.verdict).tolist() == [Verdict.REFUSE, 0, 0, Verdict.REFUSE]
        refusal = toy().encode("I can't help with that.")
        assert int(o.token[0]) == refusal[0] and int(o.token[1]) == int(tok[1])
        new = self.variant(lambda s, t, e, x: g.advance(pol, s, t, e, x))(state, o.token,
                                                                          jnp.array([1, 1, 1, 0], bool), tok)
        assert np.asarray(new.msg_rule).tolist() == [3, -1, -1, -1]
        d = self.variant(lambda s, x: g.evaluate(pol, s, x))(new, jnp.zeros((4, toy().vocab_size)))
        assert int(d.forced[0]) == refusal[1] and int(d.verdict[0]) == Verdict.REFUSE


def test_walk_equals_a_column_by_column_walk():
    """The jitted topic walk (plain steps for the first columns, then a loop to the batch's longest token) against a
    numpy walk over every column: every token, the longest ones, single rows; a row with no topic on stays."""
    from gate.phrases import _UNROLL, _walk_np

    pol = compiled()
    tc, goto, bits = np.asarray(pol.tok_chars), np.asarray(pol.goto), np.asarray(pol.out_bits)
    n = (tc >= 0).sum(1)
    assert n.max() > _UNROLL
    rng = np.random.default_rng(0)
    walk = jax.jit(X._walk)
    hits = 0
    longest = np.argsort(-n, kind="stable")
    S, V = goto.shape[0], tc.shape[0]
    every = (np.tile(np.arange(V), S), np.repeat(np.arange(S), V))  # every token from every state
    for toks, ac in (every, *((t, rng.integers(0, S, len(t))) for t in (
            longest[:4], longest[:1], *(np.flatnonzero(n == k)[:2] for k in (_UNROLL, _UNROLL + 1) if (n == k).any()),
            np.flatnonzero(n == 1)[:3]))):
        ac = ac.astype(np.int32)
        for topics in (np.full(len(toks), 0b1010), rng.integers(0, 16, len(toks)), np.zeros(len(toks), np.int32)):
            state = _state(topics).replace(ac=jnp.asarray(ac))
            s, hit = walk(pol, state, jnp.asarray(toks, jnp.int32))
            trail = _walk_np(goto, ac, tc[toks])
            expect = np.bitwise_or.reduce(np.where(tc[toks].T >= 0, bits[trail], 0), axis=0) & topics
            np.testing.assert_array_equal(np.asarray(hit), expect)
            hits += int(np.count_nonzero(expect))
            np.testing.assert_array_equal(np.asarray(s), np.where(topics != 0, trail[-1], ac))
    assert hits > 0


def test_refused_topic_ends_the_turn_with_the_refusal():
    pol = compiled()
    g = X.escalation_gate(toy().vocab_size)
    letters = jnp.asarray([[9.0 if p in "tab" else 0.0 for p in toy().pieces]])
    state = _state([1 << 3, 0, 1 << 3])
    for seed in range(3):
        toks, end, verdict, rule = rollout(g, pol, state, jax.random.key(seed), steps=60,
                                           logits=jnp.repeat(letters, 3, 0))
        out = texts(toy(), toks)
        for b in (0, 2):
            assert "tata" not in out[b].replace("I can't help with that.", "")
            if int(verdict[b]) == Verdict.REFUSE:
                assert out[b].endswith("I can't help with that.") and int(rule[b]) == 23
        assert int(verdict[1]) == Verdict.ADMIT


def test_bank_policy_escalation_rules():
    policy = load_policy(BANK)
    assert X.effects(policy, (0, 1, 2)) == (1.0, (), 0)
    assert X.effects(policy, (0, 2, 2)) == (0.5, (), 0)
    assert X.effects(policy, (3, 2, 3)) == (0.5, ("transfer",), 1 << 2)


@pytest.mark.parametrize("body,path,reason", [
    ("- {counter: refusal, at: 2, tighten: {budget_scale: 0.5}}", "escalation[0].counter", "unknown counter"),
    ("- {counter: refusals, at: 0, tighten: {budget_scale: 0.5}}", "escalation[0].at", "out of range"),
    ("- {counter: refusals, at: 2, tighten: {}}", "escalation[0].tighten", "give at least one"),
    ("- {counter: refusals, at: 2, tighten: {forbid_tools: [wire]}}", "escalation[0].tighten.forbid_tools[0]",
     "unknown tool 'wire'"),
    ("- {counter: refusals, at: 2, tighten: {budget_scale: 1.5}}", "escalation[0].tighten.budget_scale",
     "out of range"),
    ("- {counter: refusals, at: 2, tighten: {allow_tools: [ping]}}", "escalation[0].tighten.allow_tools",
     "unknown key"),
])
def test_escalation_errors_name_file_line_and_key_path(body, path, reason):
    text = textwrap.dedent("""\
        aqjax_policy: 1
        name: t
        evidence: {base_budget: 10}
        tools:
          ping: {parameters: {type: object, properties: {}}}
        escalation:
        """) + "  " + body + "\n"
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, source="p.yaml")
    assert str(ei.value).startswith(f"p.yaml:7: {path}: ") and reason in str(ei.value), str(ei.value)
