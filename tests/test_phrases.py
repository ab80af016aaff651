"""Phrase gate: normalization, the suppress mask against a brute-force oracle, substitution and refusal flows,
jit / vmap / batching invariants, and the real SmolLM2 vocabulary."""

import functools
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate.core import NO_RULE, NO_TOKEN, Action, Gate, Verdict, chain, unpack_bits
from gate.normalize import Normalization
from gate.phrases import (
    CompiledPhrases,
    PhraseError,
    PhraseRule,
    PhraseState,
    _compile_host,
    _demo_phrases,
    bench,
    compile_phrases,
    contains_banned,
    phrase_gate,
)

NORM = Normalization()
MARKER = "<X>"  # normalizes to "x", a letter no test phrase uses: it cannot complete or continue a phrase
TOY_V = 512  # toy policies are padded to one logits width, so the jitted gate functions are shared


class ToyTokenizer:
    """Greedy longest-match tokenizer over given pieces; id 0 is the special '<eos>'."""

    def __init__(self, pieces):
        self.pieces = ["<eos>"] + [p for p in dict.fromkeys(pieces) if p and p != "<eos>"]
        self.vocab_size = len(self.pieces)
        self.eos_id = 0
        self.special_ids = frozenset({0})
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        self._longest = max(map(len, self.pieces))

    def token_bytes(self):
        return [p.encode() for p in self.pieces]

    def encode(self, text, *, add_bos=False, parse_special=True):
        out, i = [], 0
        while i < len(text):
            for n in range(min(self._longest, len(text) - i), 0, -1):
                j = self._ids.get(text[i : i + n])
                if j is not None and (j not in self.special_ids or parse_special):
                    out.append(j)
                    i += n
                    break
            else:
                raise ValueError(f"cannot tokenize {text[i]!r}")
        return out

    def text(self, t: int) -> str:
        return "" if t in self.special_ids or t >= self.vocab_size else self.pieces[t]


_LOOK = {"o": "0", "i": "1", "l": "1", "e": "3", "a": "4", "s": "5"}


def toy_vocab(phrases, rng=None) -> ToyTokenizer:
    """An adversarial vocabulary: single characters, every split of every phrase, 2-4 character fragments,
    punctuated, spaced, upper-case and look-alike spellings."""
    pieces = list("abcdefghijklmnopqrstuvwyzABCDEFGHIJKLMNOPQRSTUVWYZ0123456789 .-_,!@$#<X>[]")
    for p in phrases:
        pieces += [p, " " + p, p.upper(), p.title()]
        for i in range(1, len(p)):
            pieces += [p[:i], p[i:], " " + p[i:], p[:i] + ".", "." + p[i:]]
        for n in (2, 3, 4):
            pieces += [p[i : i + n] for i in range(len(p) - n + 1)]
        pieces += ["".join(_LOOK.get(c, c) for c in p[:3]), ".".join(p[:3]), "-".join(p[-3:]), p[::-1][:3]]
    if rng is not None:
        letters = sorted(set("".join(phrases).replace(" ", "")))
        pieces += ["".join(rng.choice(letters, int(rng.integers(2, 5)))) for _ in range(30)]
    return ToyTokenizer(pieces)


def jitted(gate: Gate) -> Gate:
    """The gate with every function jitted (eager dispatch of the per-token walk is slow in tests)."""
    return Gate(jax.jit(gate.init, static_argnums=1), *(jax.jit(f) for f in gate[1:]))


def host_of(rules, tok, norm=NORM, vocab_size=None):
    return _compile_host(rules, tok.token_bytes(), tok.special_ids, norm, vocab_size or tok.vocab_size,
                         lambda s: tok.encode(s, parse_special=False))


def oracle_completes(context: str, piece: str, phrases, norm=NORM) -> bool:
    """Does the text after `piece` hold a phrase occurrence that ends inside `piece` (context is clean)?"""
    return contains_banned(context + piece, phrases, norm) and not contains_banned(context, phrases, norm)


# ------------------------------------------------------------------------------------------ normalization


def test_normalization():
    assert NORM.normalize("b.a-d w o r d") == NORM.normalize("bad word") == "badword"
    assert NORM.normalize("B4D W0RD") == "badword"
    assert NORM.normalize("P@$$w0rd") == "password"
    assert NORM.normalize("1 l i I L") == "iiiii"
    assert NORM.normalize("ＢＡＤ") == "bad"  # full-width letters: NFKC
    assert NORM.normalize("Straße") == "strasse"
    assert NORM.normalize("ba\u200bd") == "bad"  # zero-width space
    assert NORM.char_class(".") == "" and NORM.char_class("$") == "s"
    assert contains_banned("see the therapist", ["the rapist"], NORM)  # documented consequence
    plain = Normalization(casefold=False, nfkc=False, skip_separators=False, lookalikes=False)
    assert plain.normalize("B4D w.o") == "B4D w.o"
    assert not contains_banned("b.a.d", ["bad"], plain)
    assert contains_banned("a bad one", ["bad"], plain)


def test_errors():
    tok = toy_vocab(["bad"])
    with pytest.raises(PhraseError, match="'...'"):
        compile_phrases([PhraseRule("...", Action.SUPPRESS, 0)], tok)
    with pytest.raises(PhraseError, match="'evil'.*needs a message"):
        compile_phrases([PhraseRule("evil", Action.SUBSTITUTE, 0)], tok)
    with pytest.raises(PhraseError, match="'evil'.*DEFER"):
        compile_phrases([PhraseRule("evil", Action.DEFER, 0)], tok)
    with pytest.raises(PhraseError, match="no phrase rules"):
        compile_phrases([], tok)
    # "ba" then the marker "d" would spell the suppressed "bad": the marker is rejected.
    with pytest.raises(PhraseError, match="'evil'.*'d'.*complete the suppressed phrase 'bad'"):
        compile_phrases([PhraseRule("bad", Action.SUPPRESS, 0), PhraseRule("evil", Action.SUBSTITUTE, 1, "d")], tok)


# ------------------------------------------------------------------------------------ mask vs brute force

ORACLE_CASES = [
    (["bad word", "word", "or"], NORM),
    (["abab", "bab", "ba b c"], NORM),
    (["aaa", "aab", "b a"], NORM),
    (["no way", "o w", "say no"], Normalization(skip_separators=False)),
    (["5ecret", "crete", "t p"], Normalization(lookalikes=True, casefold=False)),
    (["straße", "ﬁne", "sse f"], NORM),  # one character normalizing to two: "ß" -> "ss", "ﬁ" -> "fi"
]


@pytest.mark.parametrize("phrases,norm", ORACLE_CASES)
def test_mask_equals_brute_force(phrases, norm):
    tok = toy_vocab(phrases, np.random.default_rng(1))
    rules = [PhraseRule(p, Action.SUPPRESS, i) for i, p in enumerate(phrases)]
    host = host_of(rules, tok, norm)
    t = host.tables
    V = tok.vocab_size
    banned = np.asarray(unpack_bits(jnp.asarray(t["suppress_bits"][t["mask_row"]]), V))
    pieces = [tok.text(i) for i in range(V)]
    checked = 0
    # Every state, reached by its own text.
    for s, ctx in enumerate(host.state_text):
        assert norm.normalize(ctx) == ctx
        if contains_banned(ctx, phrases, norm):
            continue  # unreachable: the mask never lets a banned phrase be completed
        expect = np.array([oracle_completes(ctx, p, phrases, norm) for p in pieces])
        np.testing.assert_array_equal(banned[s], expect, err_msg=f"state {s} ({ctx!r})")
        checked += 1
    assert checked > 1
    # Random clean contexts made of tokens, their state found by walking the goto table.
    rng = np.random.default_rng(0)
    for _ in range(60):
        ids = rng.integers(1, V, int(rng.integers(1, 6)))
        ctx = "".join(pieces[i] for i in ids)
        if contains_banned(ctx, phrases, norm):
            continue
        s = 0
        for i in ids:
            for c in t["tok_chars"][i]:
                s = t["goto"][s, c] if c >= 0 else s
        expect = np.array([oracle_completes(ctx, p, phrases, norm) for p in pieces])
        np.testing.assert_array_equal(banned[s], expect, err_msg=f"context {ctx!r}")


# ------------------------------------------------------------------------------------- generation property

@functools.cache
def _toy_gate() -> Gate:
    return jitted(phrase_gate(TOY_V))


def _ends_in_piece(norm_ctx: str, norm_piece: str, norm_phrases) -> bool:
    """`oracle_completes` on normalized strings (normalization is per character, so they concatenate)."""
    full = norm_ctx + norm_piece
    return any(p in full[max(0, len(norm_ctx) - len(p) + 1) :] for p in norm_phrases)


def _progress(norm_text: str, norm_phrases) -> int:
    """Length of the longest phrase prefix that the normalized text ends with."""
    return max((k for p in norm_phrases for k in range(1, len(p) + 1) if norm_text.endswith(p[:k])), default=0)


phrase_st = st.lists(
    st.builds(
        lambda w, cut, sp: (w[:cut] + " " + w[cut:]) if sp and 0 < cut < len(w) else w,
        st.text("abdeilorst", min_size=2, max_size=8), st.integers(0, 8), st.booleans(),
    ),
    min_size=1, max_size=6, unique=True,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phrases=phrase_st, subst=st.lists(st.booleans(), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_generation_never_emits_banned(phrases, subst, seed):
    rng = np.random.default_rng(seed)
    rules = [PhraseRule(p, Action.SUBSTITUTE if s else Action.SUPPRESS, 100 + i, MARKER if s else None)
             for i, (p, s) in enumerate(zip(phrases, subst, strict=False))]
    sup = [r.phrase for r in rules if r.action == Action.SUPPRESS]
    sub = [r.phrase for r in rules if r.action == Action.SUBSTITUTE]
    tok = toy_vocab(phrases, rng)
    assert tok.vocab_size <= TOY_V
    policy = compile_phrases(rules, tok, vocab_size=TOY_V)
    g = _toy_gate()
    B = 3
    state = g.init(policy, B)
    texts = [""] * B
    pieces = [tok.text(i) for i in range(TOY_V)]
    norm_pieces = [NORM.normalize(p) for p in pieces]
    norm_all, norm_sup, norm_sub = ([NORM.normalize(p) for p in ps] for ps in (phrases, sup, sub))
    real = np.arange(TOY_V) < tok.vocab_size
    marker_ids = tok.encode(MARKER, parse_special=False)
    for _ in range(40):
        d = g.evaluate(policy, state, jnp.zeros((B, TOY_V)))
        mask, forced = np.asarray(d.mask), np.asarray(d.forced)
        sampled = np.zeros(B, np.int32)
        for b in range(B):
            ctx = NORM.normalize(texts[b])
            completes_sup = np.array([_ends_in_piece(ctx, p, norm_sup) for p in norm_pieces])
            np.testing.assert_array_equal(mask[b], ~completes_sup, err_msg=f"context {texts[b]!r}")
            # The attacker prefers tokens that advance or complete a phrase; the mask must stop it.
            score = np.array([_progress(ctx + p, norm_all) for p in norm_pieces], float)
            logits = np.where(real, 3 * score + rng.gumbel(size=TOY_V), -np.inf)
            sampled[b] = np.argmax(np.where(mask[b], logits, -np.inf))
        token = np.where(forced != NO_TOKEN, forced, sampled)
        o = g.check(policy, state, jnp.asarray(token))
        out = np.asarray(o.token)
        for b in range(B):
            fires = forced[b] == NO_TOKEN and _ends_in_piece(NORM.normalize(texts[b]), norm_pieces[token[b]], norm_sub)
            assert (out[b] != token[b]) == fires, (texts[b], pieces[token[b]])
            if fires:
                assert out[b] == marker_ids[0] and int(o.rule[b]) in [r.rule_id for r in rules]
            texts[b] += pieces[out[b]]
            assert not contains_banned(texts[b], sup + sub, NORM), texts[b]
        state = g.advance(policy, state, jnp.asarray(out), jnp.ones(B, bool), jnp.asarray(token))


# ---------------------------------------------------------------------------------- flows and invariants

FLOW_RULES = [
    PhraseRule("bad word", Action.SUPPRESS, 7),
    PhraseRule("evil", Action.SUBSTITUTE, 8, MARKER),
    PhraseRule("boom", Action.REFUSE, 9, "no<X>"),
]
FLOW_TOK = toy_vocab(["bad word", "evil", "boom"])


def _ids(*pieces):
    """Ids of pieces that are single tokens of the flow vocabulary."""
    ids = [FLOW_TOK.encode(p) for p in pieces]
    assert all(len(i) == 1 for i in ids), pieces
    return [i[0] for i in ids]


def _feed(policy, gate, state, pieces):
    for t in _ids(*pieces):
        state = gate.advance(policy, state, jnp.array([t]), jnp.array([True]))
    return state


def test_substitution_and_refusal_flow():
    policy = compile_phrases(FLOW_RULES, FLOW_TOK)
    g = jitted(phrase_gate(FLOW_TOK.vocab_size))
    V = FLOW_TOK.vocab_size
    marker = FLOW_TOK.encode(MARKER)
    assert len(marker) == 3
    # "ev" + "il": the completing token is replaced by the marker, which is then forced in full.
    state = _feed(policy, g, g.init(policy, 1), ["ev"])
    (il,) = _ids("il")
    o = g.check(policy, state, jnp.array([il]))
    assert int(o.token[0]) == marker[0] and int(o.rule[0]) == 8 and int(o.verdict[0]) == Verdict.ADMIT
    assert not bool(o.stop[0])
    state = g.advance(policy, state, o.token, jnp.array([True]), jnp.array([il]))
    for m in marker[1:]:
        d = g.evaluate(policy, state, jnp.zeros((1, V)))
        assert int(d.forced[0]) == m and int(d.rule[0]) == 8
        o = g.check(policy, state, d.forced)  # the marker does not re-trigger
        assert int(o.token[0]) == m and not bool(o.stop[0])
        state = g.advance(policy, state, d.forced, jnp.array([True]))
    d = g.evaluate(policy, state, jnp.zeros((1, V)))
    assert int(d.forced[0]) == NO_TOKEN and int(state.forced_rule[0]) == -1
    # The same phrase later is substituted again.
    state2 = _feed(policy, g, state, ["e", "vi"])
    assert int(g.check(policy, state2, jnp.array(_ids("l"))).token[0]) == marker[0]
    # Refusal: verdict REFUSE throughout, the row stops after the message's last token.
    msg = FLOW_TOK.encode("no<X>")
    state = _feed(policy, g, g.init(policy, 1), ["bo"])
    (om,) = _ids("om")
    o = g.check(policy, state, jnp.array([om]))
    assert int(o.token[0]) == msg[0] and int(o.verdict[0]) == Verdict.REFUSE and not bool(o.stop[0])
    state = g.advance(policy, state, o.token, jnp.array([True]), jnp.array([om]))
    for k, m in enumerate(msg[1:], start=1):
        d = g.evaluate(policy, state, jnp.zeros((1, V)))
        assert int(d.forced[0]) == m and int(d.verdict[0]) == Verdict.REFUSE and int(d.rule[0]) == 9
        o = g.check(policy, state, d.forced)
        assert bool(o.stop[0]) == (k == len(msg) - 1) and int(o.verdict[0]) == Verdict.REFUSE
        state = g.advance(policy, state, d.forced, jnp.array([True]))
    assert int(state.forced_rule[0]) == -1  # a carried state starts the next turn clean
    # Rows that did not emit keep their state.
    kept = g.advance(policy, state, jnp.array(_ids("b")), jnp.array([False]))
    chex.assert_trees_all_equal(kept, state)


def test_marker_does_not_retrigger_and_priority():
    tok = toy_vocab(["evil"])
    rules = [PhraseRule("evil", Action.SUBSTITUTE, 1, "[evil]"), PhraseRule("zap", Action.SUPPRESS, 2)]
    policy = compile_phrases(rules, tok)
    g = jitted(phrase_gate(tok.vocab_size))
    marker = tok.encode("[evil]")
    assert len(marker) == 3
    state = g.init(policy, 1)
    (evil,) = tok.encode("evil")
    o = g.check(policy, state, jnp.array([evil]))
    assert int(o.token[0]) == marker[0]
    state = g.advance(policy, state, o.token, jnp.array([True]), jnp.array([evil]))
    for m in marker[1:]:
        d = g.evaluate(policy, state, jnp.zeros((1, tok.vocab_size)))
        assert int(d.forced[0]) == m
        assert int(g.check(policy, state, d.forced).token[0]) == m  # "evil" inside the marker does not fire
        state = g.advance(policy, state, d.forced, jnp.array([True]), d.forced)
    assert int(state.forced_rule[0]) == -1
    # Two rules firing inside one token: the higher-priority action wins, wherever it ends.
    rules = [PhraseRule("evil", Action.SUBSTITUTE, 1, "<X>"), PhraseRule("ev", Action.REFUSE, 2, "no")]
    policy = compile_phrases(rules, tok)
    o = g.check(policy, g.init(policy, 1), jnp.array([evil]))
    assert int(o.rule[0]) == 2 and int(o.verdict[0]) == Verdict.REFUSE


def test_inside_chain():
    """Through `gate.core.chain` (which replays checks to hand each gate its `seen`), after another gate."""
    policy = compile_phrases(FLOW_RULES, FLOW_TOK)
    inner = phrase_gate(FLOW_TOK.vocab_size)
    g = jitted(chain(inner, inner))  # the second copy sees the first one's rewrite
    policies = (policy, policy)
    state = g.init(policies, 1)
    emitted = []
    for t in _ids("e", "vi", "l", "e", "vil"):
        d = g.evaluate(policies, state, jnp.zeros((1, FLOW_TOK.vocab_size)))
        while int(d.forced[0]) != NO_TOKEN:
            emitted.append(int(d.forced[0]))
            state = g.advance(policies, state, d.forced, jnp.array([True]), d.forced)
            d = g.evaluate(policies, state, jnp.zeros((1, FLOW_TOK.vocab_size)))
        o = g.check(policies, state, jnp.array([t]))
        emitted.append(int(o.token[0]))
        state = g.advance(policies, state, o.token, jnp.array([True]), jnp.array([t]))
    text = "".join(FLOW_TOK.text(i) for i in emitted)
    assert text == "evi<X>e<" and int(state[0].forced_rule[0]) == 1
    # The second copy saw the marker, not "evil": it follows the same text but queues no message of its own.
    assert int(state[1].ac[0]) == int(state[0].ac[0]) and int(state[1].forced_rule[0]) == -1


def _batch_state(policy, gate):
    """Four rows in different states: root, mid-phrase, mid-substitution, and one after a space."""
    rows = [[], ["bad", " w", "or"], ["ev"], ["bad", " "]]
    states = [_feed(policy, gate, gate.init(policy, 1), r) for r in rows]
    # Row 2 starts the substitution of "evil".
    (il,) = _ids("il")
    o = gate.check(policy, states[2], jnp.array([il]))
    states[2] = gate.advance(policy, states[2], o.token, jnp.array([True]), jnp.array([il]))
    return jax.tree.map(lambda *x: jnp.concatenate(x), *states)


def _rows(fn):
    """fn applied to each row alone (a batch of one), through vmap."""

    def one(*args):
        out = fn(*jax.tree.map(lambda a: a[None], args))
        return jax.tree.map(lambda a: a[0], out)

    return jax.vmap(one)


class PhraseGateVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_batched_rows_match_single_rows(self):
        policy = compile_phrases(FLOW_RULES, FLOW_TOK)
        g = phrase_gate(FLOW_TOK.vocab_size)
        V = FLOW_TOK.vocab_size
        state = _batch_state(policy, g)
        tokens = jnp.array(_ids("d", "d", "X", "evil"), jnp.int32)
        logits = jax.nn.one_hot(tokens.at[2].set(tokens[0]), V)  # every row's top token is "d" but row 3's

        evaluate = self.variant(lambda s, x: g.evaluate(policy, s, x))
        check = self.variant(lambda s, t: g.check(policy, s, t))
        advance = self.variant(lambda s, t, e: g.advance(policy, s, t, e))

        d = evaluate(state, logits)
        mask = np.asarray(d.mask)
        (d_id,) = _ids("d")
        assert mask[0, d_id] and not mask[1, d_id]  # "bad w" + "or" + "d" completes "bad word"
        assert int(d.forced[2]) == FLOW_TOK.encode(MARKER)[1] and int(d.forced[0]) == NO_TOKEN
        assert d.block_rule.tolist() == [NO_RULE, 7, NO_RULE, NO_RULE]  # the audit learns which rule blocked
        o = check(state, tokens)
        assert int(o.token[2]) == int(tokens[2])  # forced rows do not fire
        assert int(o.rule[3]) == 8 and int(o.rule[0]) == NO_RULE
        new = advance(state, o.token, jnp.array([True, True, True, False]))
        chex.assert_trees_all_equal(jax.tree.map(lambda a: a[3], new), jax.tree.map(lambda a: a[3], state))

        chex.assert_trees_all_equal(_rows(lambda s, x: g.evaluate(policy, s, x))(state, logits), d)
        chex.assert_trees_all_equal(_rows(lambda s, t: g.check(policy, s, t))(state, tokens), o)
        chex.assert_trees_all_equal(
            _rows(lambda s, t, e: g.advance(policy, s, t, e))(state, o.token, jnp.array([True, True, True, False])),
            new)


def test_no_retrace_for_a_new_policy_of_the_same_bucket():
    tok = toy_vocab(["bad word", "evil", "good", "nice day"])
    a = compile_phrases([PhraseRule("bad word", Action.SUPPRESS, 0), PhraseRule("evil", Action.SUBSTITUTE, 1, MARKER)],
                        tok)
    b = compile_phrases([PhraseRule("nice day", Action.SUPPRESS, 5), PhraseRule("good", Action.SUBSTITUTE, 6, "<#>")],
                        tok)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
    g = phrase_gate(tok.vocab_size)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(policy, state, logits, token):
        d = g.evaluate(policy, state, logits)
        o = g.check(policy, state, jnp.where(d.forced != NO_TOKEN, d.forced, token))
        return d.mask, g.advance(policy, state, o.token, ~d.stop, token)

    for policy in (a, b, a):
        mask, state = step(policy, g.init(policy, 2), jnp.zeros((2, tok.vocab_size)), jnp.array([1, 2]))
    assert isinstance(state, PhraseState) and mask.shape == (2, tok.vocab_size)


# ---------------------------------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from models.gguf import read_gguf_metadata
    from models.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_gguf))


@pytest.fixture(scope="module")
def smol_policy(smol_tok) -> CompiledPhrases:
    rules = [PhraseRule(p, Action.SUPPRESS, i) for i, p in enumerate(_demo_phrases(1000))]
    t0 = time.perf_counter()
    policy = compile_phrases(rules, smol_tok)
    dt = time.perf_counter() - t0
    shapes = {k: tuple(getattr(policy, k).shape) for k in CompiledPhrases.__dataclass_fields__}
    print(f"\n1000 phrases on a {smol_tok.vocab_size}-token vocabulary: compiled in {dt:.2f} s, "
          f"tables {policy.nbytes / 1e6:.1f} MB, shapes {shapes}")
    return policy


@pytest.mark.slow
@pytest.mark.parametrize("text", [
    "secret password", "s3cr3t p4ssw0rd", "s.e.c.r.e.t p.a.s.s.w.o.r.d", "SECRET-PASSWORD", "my SeCrEt PaSs WoRd!",
    "kill   switch", "k1ll sw1tch",
])
def test_real_vocab_blocks_at_the_completing_token(smol_tok, smol_policy, text):
    V = smol_tok.vocab_size
    g = phrase_gate(V)
    evaluate, advance = jax.jit(g.evaluate), jax.jit(g.advance)
    banned = ["secret password", "kill switch"]
    natural = smol_tok.encode(text)
    one_char = [i for ch in text for i in smol_tok.encode(ch)]
    for ids in (natural, one_char):
        done = next(k for k in range(len(ids)) if contains_banned(smol_tok.decode(ids[: k + 1]), banned, NORM))
        state = g.init(smol_policy, 1)
        for k, t in enumerate(ids[: done + 1]):
            admissible = bool(evaluate(smol_policy, state, jnp.zeros((1, V))).mask[0, t])
            assert admissible == (k < done), (text, [smol_tok.decode([i]) for i in ids], k)
            state = advance(smol_policy, state, jnp.array([t]), jnp.array([True]))


@pytest.mark.slow
def test_real_vocab_substitution_and_bench(smol_tok):
    rules = [PhraseRule("secret password", Action.SUBSTITUTE, 1, "[REDACTED]"),
             PhraseRule("kill switch", Action.REFUSE, 2, "I can't help with that.")]
    policy = compile_phrases(rules, smol_tok)
    g = jitted(phrase_gate(smol_tok.vocab_size))
    state = g.init(policy, 1)
    out = []
    for t in smol_tok.encode("the secret password is x"):
        d = g.evaluate(policy, state, jnp.zeros((1, smol_tok.vocab_size)))
        while int(d.forced[0]) != NO_TOKEN:
            out.append(int(d.forced[0]))
            state = g.advance(policy, state, d.forced, jnp.array([True]))
            d = g.evaluate(policy, state, jnp.zeros((1, smol_tok.vocab_size)))
        o = g.check(policy, state, jnp.array([t]))
        out.append(int(o.token[0]))
        state = g.advance(policy, state, o.token, jnp.array([True]), jnp.array([t]))
    assert smol_tok.decode(out) == "the secret[REDACTED] is x"

    r = bench(smol_tok, n_phrases=50, steps=8, batches=(1,))
    assert r["table_bytes"] > 0 and r["us_per_step"][1] > 0


@pytest.mark.slow
def test_walk_equals_a_column_by_column_walk(smol_tok, smol_policy):
    """The jitted walk (plain steps for the first columns, then a loop to the batch's longest token) against a numpy
    walk over every column: random tokens, the vocabulary's longest, tokens of exactly the unrolled length and one
    more, single rows and mixed batches, from random automaton states."""
    from gate.phrases import _UNROLL, _walk, _walk_np

    p = smol_policy
    tc, goto, out = np.asarray(p.tok_chars), np.asarray(p.goto), np.asarray(p.out_suppress)
    n = (tc >= 0).sum(1)
    V = tc.shape[0]
    rng = np.random.default_rng(0)
    longest = np.argsort(-n, kind="stable")[:8]
    edge = [np.flatnonzero(n == k)[:4] for k in (_UNROLL - 1, _UNROLL, _UNROLL + 1)]
    assert n[longest[0]] > _UNROLL and all(len(e) for e in edge)
    batches = [rng.integers(0, V, 32), longest, *edge, longest[:1], edge[1][:1], edge[2][:1], rng.integers(0, V, 1),
               np.concatenate([rng.integers(0, V, 5), edge[2][:1]]), np.flatnonzero(n == 0)[:3]]
    walk = jax.jit(_walk)
    for toks in batches:
        toks = np.asarray(toks, np.int32)
        ac = rng.integers(0, goto.shape[0], len(toks)).astype(np.int32)
        s, best = walk(p, jnp.asarray(ac), jnp.asarray(toks), p.out_suppress)
        chars = tc[toks]
        trail = np.concatenate([ac[None], _walk_np(goto, ac, chars)])[1:]
        rules = np.where((chars.T >= 0) & (out[trail] >= 0), out[trail], np.iinfo(np.int32).max).min(0)
        np.testing.assert_array_equal(np.asarray(s), trail[-1], err_msg=str(toks))
        np.testing.assert_array_equal(np.asarray(best), np.where(rules == np.iinfo(np.int32).max, -1, rules))


@pytest.mark.slow
def test_block_rule_equals_the_walk_of_the_top_token(smol_tok, smol_policy):
    """evaluate walks the top token only when some row's top token is banned: its block_rule equals walking every
    row's top token, for banned and admissible top tokens alike."""
    from gate.phrases import _walk

    p, V = smol_policy, smol_tok.vocab_size
    g = phrase_gate(V)
    evaluate = jax.jit(g.evaluate)
    rng = np.random.default_rng(1)
    S = np.asarray(p.goto).shape[0]
    banned_rows = 0
    for trial in range(6):
        ac = rng.integers(0, S, 16).astype(np.int32)
        state = g.init(p, 16).replace(ac=jnp.asarray(ac))
        banned = ~np.asarray(evaluate(p, state, jnp.zeros((16, V))).mask)
        top = rng.integers(0, V, 16)
        for b in range(16):  # even trials: a banned top token where the state has one
            if trial % 2 == 0 and banned[b].any() and rng.random() < 0.5:
                top[b] = rng.choice(np.flatnonzero(banned[b]))
        banned_rows += int(banned[np.arange(16), top].sum())
        d = evaluate(p, state, jax.nn.one_hot(jnp.asarray(top), V))
        _, hit = _walk(p, jnp.asarray(ac), jnp.asarray(top, jnp.int32), p.out_suppress)
        expect = np.where(np.asarray(hit) >= 0, np.asarray(p.rule_id)[np.maximum(np.asarray(hit), 0)], NO_RULE)
        np.testing.assert_array_equal(np.asarray(d.block_rule), expect)
    assert banned_rows > 0
