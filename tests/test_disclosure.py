"""Disclosure control: a protected span never appears (under the phrase normalization) for an uncleared principal,
over 1, 2 and 5 turns with the spans carried in the state; cleared rows are untouched; substitute and refuse."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_authority import each_row, rollout, texts, toy

from gate import disclosure as D
from gate.core import Verdict
from gate.normalize import Normalization
from gate.policy import Policy

NORM = Normalization()
POLICY = Policy.from_dict({
    "aqjax_policy": 1, "name": "labels",
    "messages": {"withheld": "[X]"},
    "classification": {"public": {"action": "none"}, "internal": {"action": "substitute", "message": "withheld"},
                       "secret": {"action": "refuse"}, "short": {"action": "substitute", "match_chars": 4}},
})
PUBLIC, INTERNAL, SECRET, SHORT = range(4)
LETTERS = "abst45"  # 4 and 5 read as a and s under the look-alike normalization


def compiled():
    return D.compile_disclosure(POLICY, toy(), label_rules=[-1, 11, 12, 13])


def gate():
    return D.disclosure_gate(toy().vocab_size)


def bias(letters: str = LETTERS) -> jnp.ndarray:
    """Logits that make a random walk write mostly the letters spans are made of."""
    return jnp.asarray([[9.0 if p in letters else 0.0 for p in toy().pieces]])


def test_default_spans_and_reference():
    text = "Q3 report: revenue 4,250,000 EUR, 12 branches, founded 1999, ratio 0.75."
    assert D.default_spans(text) == ["4,250,000", "1999"]
    assert D.leaked("it was 4.250.000!", ["4,250,000"], NORM) == ["4,250,000"]  # separators vanish
    assert D.leaked("it was 4250001", ["4,250,000"], NORM) == []


def test_substitute_refuse_and_match_chars():
    pol, g = compiled(), gate()
    spans = [[(INTERNAL, "stab", True)], [(SECRET, "stab", True)], [(SHORT, "bastas", True)],
             [(INTERNAL, "stab", False)]]
    state = D.begin_turn(spans, NORM)
    advance, check = jax.jit(g.advance), jax.jit(g.check)
    out = [[] for _ in range(4)]
    for t in toy().encode("a s-t a"):
        s = state
        o = check(pol, s, jnp.full((4,), t))
        state = advance(pol, s, o.token, jnp.ones((4,), bool), jnp.full((4,), t))
        for b in range(4):
            out[b].append(int(o.token[b]))
    # "a s-t a" normalizes to "asta": no span complete yet, nothing fires
    assert all(toy().decode(o) == "a s-t a" for o in out)
    b_ = toy().encode("b")[0]
    o = check(pol, state, jnp.full((4,), b_))
    x = toy().encode("[X]")
    assert int(o.token[0]) == x[0] and int(o.rule[0]) == 11 and int(o.verdict[0]) == Verdict.ADMIT
    assert int(o.token[1]) == toy().encode("I can't help with that.")[0] and int(o.verdict[1]) == Verdict.REFUSE
    assert int(o.token[2]) == b_ and int(o.rule[2]) == -1  # "astab" does not start "bast"
    assert int(o.token[3]) == b_  # cleared: untouched
    # match_chars = 4: "bast" alone fires the label that protects "bastas"
    cut = [lb.match_chars for lb in POLICY.labels]
    s = D.begin_turn([[(SHORT, "bastas", True)]] * 4, NORM, match_chars=cut)
    for t in toy().encode("bas"):
        s = advance(pol, s, jnp.full((4,), t), jnp.ones((4,), bool), jnp.full((4,), t))
    assert int(check(pol, s, jnp.full((4,), toy().encode("t")[0])).rule[0]) == 13


def _turns(spans, n_turns, seed, rows_cleared, letters=LETTERS):
    """Runs n_turns turns; the session's spans are carried, each turn starts a new output. Returns the outputs."""
    pol, g = compiled(), gate()
    outs = []
    key = jax.random.key(seed)
    for _ in range(n_turns):
        rows = [[(lb, s, not cleared) for lb, s in spans] for cleared in rows_cleared]
        state = D.begin_turn(rows, NORM)
        key, sub = jax.random.split(key)
        toks, state, verdict, _ = rollout(g, pol, state, sub, steps=40, logits=jnp.repeat(bias(letters), len(rows), 0))
        outs.append((texts(toy(), toks), np.asarray(verdict)))
    return outs


SPANS = st.lists(st.tuples(st.sampled_from([INTERNAL, SECRET]), st.text(alphabet=LETTERS, min_size=4, max_size=5)),
                 min_size=1, max_size=3)


@settings(max_examples=20, deadline=None)
@given(spans=SPANS, turns=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**31 - 1))
def test_a_protected_span_never_appears_for_an_uncleared_principal(spans, turns, seed):
    texts_ = [s for _, s in spans]
    for outputs, verdict in _turns(spans, turns, seed, rows_cleared=[False, False, True]):
        for b in (0, 1):
            assert D.leaked(outputs[b], texts_, NORM) == [], (outputs[b], texts_)
        # the cleared row is never rewritten
        assert "[X]" not in outputs[2] and "I can't" not in outputs[2] and verdict[2] == Verdict.ADMIT


def test_the_walks_are_not_vacuous():
    spans = [(INTERNAL, "abab"), (SECRET, "bbaa"), (INTERNAL, "a4ba")]  # "a4ba" reads "aaba"
    fired = leaked_cleared = 0
    for seed in range(4):
        for outputs, _ in _turns(spans, 1, seed, rows_cleared=[False, False, True], letters="ab4"):
            fired += sum("[X]" in o or "I can't" in o for o in outputs[:2])
            leaked_cleared += bool(D.leaked(outputs[2], [s for _, s in spans], NORM))
    assert fired >= 2 and leaked_cleared >= 1, (fired, leaked_cleared)


class DisclosureVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_rows_alone_equal_rows_in_a_batch(self):
        pol, g = compiled(), gate()
        state = D.begin_turn([[(INTERNAL, "stab", True)], [(INTERNAL, "stab", False)], [], [(SECRET, "abst", True)]],
                             NORM)
        adv = jax.jit(lambda s, t: g.advance(pol, s, t, jnp.ones((4,), bool)))
        for t in toy().encode("sta"):
            state = adv(state, jnp.full((4,), t))
        tok = jnp.full((4,), toy().encode("b")[0])
        o = self.variant(lambda s, t: g.check(pol, s, t))(state, tok)
        chex.assert_trees_all_equal(jax.jit(each_row(lambda s, t: g.check(pol, s, t)))(state, tok), o)
        assert np.asarray(o.rule).tolist() == [11, -1, -1, -1]
        new = self.variant(lambda s, t, e, x: g.advance(pol, s, t, e, x))(state, o.token, jnp.array([1, 1, 1, 0], bool),
                                                                          tok)
        assert np.asarray(new.msg_label).tolist() == [INTERNAL, -1, -1, -1]
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[3], new), jax.tree.map(lambda a: a[3], state))
        d = self.variant(lambda s, x: g.evaluate(pol, s, x))(new, jnp.zeros((4, toy().vocab_size)))
        assert int(d.forced[0]) == toy().encode("[X]")[1] and np.asarray(d.forced[1:]).tolist() == [-1, -1, -1]


def test_non_ascii_spans_match_too():
    tok = toy()
    pieces = ["Zü", "rich", "zü", "RICH", " "]
    from test_authority import ToyTokenizer

    t2 = ToyTokenizer(tok.pieces[1:] + pieces)
    pol = D.compile_disclosure(POLICY, t2, label_rules=[-1, 11, 12, 13])
    g = D.disclosure_gate(t2.vocab_size)
    s = D.begin_turn([[(INTERNAL, "Zürich", True)]] * 2, NORM)
    for text, fires in (("Zürich", True), ("züRICH", True), ("Zu rich", False)):
        state = s
        ids = t2.encode(text)
        for t in ids[:-1]:
            state = g.advance(pol, state, jnp.full((2,), t), jnp.ones((2,), bool))
        assert (int(g.check(pol, state, jnp.full((2,), ids[-1])).rule[0]) == 11) == fires, text


def test_walk_equals_a_character_by_character_shift_and():
    """The walk (all position masks gathered at once, then an elementwise recurrence) against the Shift-And update
    applied one character at a time: every token of a vocabulary with non-ASCII and long (> 16 character) pieces,
    random spans and protection per row, random match states."""
    from test_authority import ToyTokenizer

    tok = ToyTokenizer(toy().pieces[1:] + ["Zü", "rich", "ÄbSt", "üß", "stab" * 5, "Übersta" * 4, "a b s t " * 3])
    pol = D.compile_disclosure(POLICY, tok, label_rules=[-1, 11, 12, 13])
    chars, lens = np.asarray(pol.tok_chars), np.asarray(pol.tok_len)
    assert lens.max() > 16 and (chars >= 128).any()
    rng = np.random.default_rng(0)
    V = tok.vocab_size
    letters = list("abstüäß")
    spans = [[(int(rng.integers(0, 4)), "".join(rng.choice(letters, int(rng.integers(4, 12)))), bool(rng.random() < .8))
              for _ in range(int(rng.integers(0, 5)))] for _ in range(V)]
    state = D.begin_turn(spans, NORM)
    am, oc, om, last = (np.asarray(x) for x in (state.ascii_mask, state.other_chars, state.other_mask, state.last))
    assert (oc >= 128).any()
    walk = jax.jit(D._walk)
    rare = np.flatnonzero((chars >= 128).any(1) | (lens > 8))
    fired = 0
    for r in range(4):  # row b reads token b, then tokens drawn mostly from the non-ASCII and long ones
        toks = np.arange(V) if r == 0 else np.where(rng.random(V) < 0.7, rng.choice(rare, V), rng.integers(0, V, V))
        start = rng.integers(0, 2**32, state.match.shape, dtype=np.uint32)
        match, first = walk(pol, state.replace(match=jnp.asarray(start)), jnp.asarray(toks, jnp.int32))
        for b, t in enumerate(toks):
            m, hit = start[b].copy(), np.zeros(last.shape[1], bool)
            for c in chars[t, : lens[t]]:
                pos = am[b, c] if c < 128 else np.bitwise_or.reduce(np.where((oc[b] == c)[:, None], om[b], 0), axis=0)
                m = ((m << np.uint32(1)) | np.uint32(1)) & pos
                hit |= (m & last[b]) != 0
            np.testing.assert_array_equal(np.asarray(match)[b], m, err_msg=f"row {b}, token {t}")
            assert int(first[b]) == (int(np.argmax(hit)) if hit.any() else -1), (b, t)
            fired += bool(hit.any())
    assert fired > 0


def test_begin_turn_buckets_and_normalizes():
    state = D.begin_turn([[(INTERNAL, "A-b.S t", True), (SECRET, "é" + "x" * 40, False)], []], NORM)
    assert state.ascii_mask.shape == (2, 128, 8) and state.other_chars.shape == (2, 8)
    # "A-b.S t" normalizes to "abst": a at bit 0, b at bit 1, ..., the last bit marks the end; protected
    assert [int(state.ascii_mask[0, ord(c), 0]) for c in "abst"] == [1, 2, 4, 8] and int(state.last[0, 0]) == 8
    # a long span is cut to its first 32 characters; the non-ASCII "é" is in the short list; not protected: last 0
    assert int(state.other_chars[0, 0]) == ord("é") and int(state.other_mask[0, 0, 1]) == 1
    assert int(state.ascii_mask[0, ord("x"), 1]) == (1 << 32) - 2 and int(state.last[0, 1]) == 0
    assert int(np.asarray(state.last)[1].sum()) == 0


def test_classification_errors():
    import pytest

    from gate.policy import PolicyError, parse_policy

    for body, line, path, reason in [
        ("classification:\n  secret: {action: redact}", 4, "classification.secret.action", "unknown action 'redact'"),
        ("classification:\n  secret: {action: substitute, message: nope}", 4, "classification.secret.message",
         "unknown message 'nope'"),
        ("classification:\n  open: {action: none, message: refusal}", 4, "classification.open.message",
         "emits no message"),
        ("classification:\n  secret: {action: refuse, match_chars: 0}", 4, "classification.secret.match_chars",
         "out of range"),
    ]:
        with pytest.raises(PolicyError) as ei:
            parse_policy(f"aqjax_policy: 1\nname: t\n{body}\n", source="c.yaml")
        assert str(ei.value).startswith(f"c.yaml:{line}: {path}: ") and reason in str(ei.value), str(ei.value)
