"""The structure gate: regex / JSON-schema automata as arrays, checked against outlines-core and by random walks."""

import functools
import json
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import outlines_core
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gate import structure as gs
from gate.core import NO_RULE, Verdict

# --------------------------------------------------------------------------------------------------------------
# A toy tokenizer with adversarial multi-character tokens (and one character split over two byte tokens).

# fmt: off
_PIECES = [
    b"<eos>", b"<ctl>",  # 0: EOS, 1: a control token that must never be admissible
    # 'e' and 'E' appear twice: two ids with the same bytes, as real vocabularies have
    *[bytes([c]) for c in b'{}[]",: -.+eE\\/_0123456789abcdefghijklmnopqrstuvwxyzE'],
    b"\xc3", b"\xa9", "é".encode(),  # é as two byte tokens, and whole
    b'{"', b'":', b'": ', b'", "', b'",', b'"}', b'"]', b'["', b"[]", b"{}", b", ", b' "', b"}]", b"]}", b"}}",
    b"12", b"00", b"-0", b"0.", b"1e", b"e+", b"true", b"false", b"null", b"tr", b"ue", b"nu", b"ll", b"ab",
    b"\\n", b'\\"', b"\\u", b'"a"', b'":"', b'"x', b"yes", b"no", b"up", b"down",
]
# fmt: on


def _ids(piece: bytes) -> set[int]:
    return {i for i, p in enumerate(_PIECES) if p == piece}


class ToyTokenizer:
    """The parts of `models.tokenizer.Tokenizer` the structure gate uses."""

    def __init__(self, pieces=_PIECES, eos_id=0, special_ids=(1,)):
        self._pieces = list(pieces)
        self.eos_id = eos_id
        self.special_ids = frozenset(special_ids)
        self.vocab_size = len(self._pieces)

    def token_bytes(self):
        return list(self._pieces)

    def encode(self, text: str) -> list[int]:
        """Greedy longest match (enough for hand-written test strings)."""
        data, ids = text.encode(), []
        table = {p: i for i, p in enumerate(self._pieces) if i not in self.special_ids and i != self.eos_id}
        while data:
            n = max(n for n in range(1, len(data) + 1) if data[:n] in table)
            ids.append(table[data[:n]])
            data = data[n:]
        return ids


TOY = ToyTokenizer()
V = TOY.vocab_size
GATE = gs.structure_gate(V, TOY.eos_id)


@jax.jit
def _evaluate(policy, state):
    d = GATE.evaluate(policy, state, jnp.zeros((state.state.shape[0], V)))
    return d.mask, d.stop, d.verdict, d.rule


_advance = jax.jit(GATE.advance)


def _np_mask(policy, s: int, vocab: int) -> np.ndarray:
    """Numpy reference: the admissible set of state s."""
    words = np.asarray(policy.allowed)[s]
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def _np_next(policy, s: int, t: int) -> int | None:
    """Numpy reference: the transition of state s on token t (None when there is none)."""
    offsets, tokens = np.asarray(policy.offsets), np.asarray(policy.tokens)
    lo, hi = offsets[s], offsets[s + 1]
    i = lo + np.searchsorted(tokens[lo:hi], t)
    return int(np.asarray(policy.next_state)[i]) if i < hi and tokens[i] == t else None


def _walk(policy, tokenizer, rng, *, rows=16, max_steps=150):
    """Uniform random walks through the jitted gate; returns the byte strings of the rows that reached EOS."""
    eos, pieces = tokenizer.eos_id, tokenizer.token_bytes()
    state = GATE.init(policy, rows)
    out = [b""] * rows
    running = np.ones(rows, bool)
    for _ in range(max_steps):
        mask, stop, _, _ = _evaluate(policy, state)
        mask, stop = np.asarray(mask), np.asarray(stop)
        assert not (stop & running).any(), "a walk reached a dead state"
        token = np.zeros(rows, np.int32)
        for r in np.flatnonzero(running):
            token[r] = rng.choice(np.flatnonzero(mask[r]))
            assert token[r] not in tokenizer.special_ids
        emitted = running & (token != eos)
        for r in np.flatnonzero(emitted):
            out[r] += pieces[token[r]]
        state = _advance(policy, state, jnp.asarray(token), jnp.asarray(emitted))
        running &= token != eos
        if not running.any():
            break
    assert not np.asarray(state.failed).any()
    return [o for o, r in zip(out, running, strict=True) if not r]


# --------------------------------------------------------------------------------------------------------------
# Gate functions: jit / no jit, batches of rows in different states, vmap, retracing.

REGEX = r"ab(c|d)*e"


class GateFunctionsTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.policy = gs.compile_regex(REGEX, TOY, rule=7)
        self.ids = {p: i for i, p in enumerate(_PIECES)}  # the last id of each piece
        p, ids = self.policy, self.ids
        s0 = int(p.initial)
        s_a = _np_next(p, s0, ids[b"a"])
        s_ab = _np_next(p, s0, ids[b"ab"])
        s_abe = _np_next(p, s_ab, ids[b"e"])
        # rows: start, after 'a', after 'ab', accepting after 'abe', dead
        self.states = jnp.asarray([s0, s_a, s_ab, s_abe, p.dead], jnp.int32)
        self.state = gs.StructureState(state=self.states, failed=jnp.asarray([0, 0, 0, 0, 1], bool))

    @chex.variants(with_jit=True, without_jit=True)
    def test_evaluate(self):
        evaluate = self.variant(GATE.evaluate)
        d = evaluate(self.policy, self.state, jnp.zeros((5, V)))
        chex.assert_shape(d.mask, (5, V))
        mask = np.asarray(d.mask)
        ids = self.ids
        for r, s in enumerate(np.asarray(self.states)):
            np.testing.assert_array_equal(mask[r], _np_mask(self.policy, int(s), V))
        assert set(np.flatnonzero(mask[0])) == {ids[b"a"], ids[b"ab"]}
        assert set(np.flatnonzero(mask[1])) == {ids[b"b"]}
        assert set(np.flatnonzero(mask[2])) == {ids[b"c"], ids[b"d"], *_ids(b"e")}
        assert set(np.flatnonzero(mask[3])) == {TOY.eos_id}  # EOS only where the output may end
        assert not mask[4].any()
        np.testing.assert_array_equal(d.stop, [0, 0, 0, 0, 1])
        np.testing.assert_array_equal(d.verdict, [Verdict.ADMIT] * 4 + [Verdict.REFUSE])
        np.testing.assert_array_equal(d.rule, [NO_RULE] * 4 + [7])

    @chex.variants(with_jit=True, without_jit=True)
    def test_advance(self):
        advance = self.variant(GATE.advance)
        ids = self.ids
        token = jnp.asarray([ids[b"ab"], ids[b"b"], ids[b"d"], TOY.eos_id, ids[b"a"]], jnp.int32)
        new = advance(self.policy, self.state, token, jnp.asarray([1, 1, 1, 1, 1], bool))
        want = [_np_next(self.policy, int(s), int(t)) for s, t in zip(self.states, token, strict=True)]
        want[3] = int(self.states[3])  # EOS in an accepting state stays put
        want[4] = self.policy.dead
        np.testing.assert_array_equal(new.state, want)
        np.testing.assert_array_equal(new.failed, [0, 0, 0, 0, 1])
        # a token with no transition kills the row; rows that did not emit keep their state
        bad = jnp.asarray([ids[b"e"]] * 5, jnp.int32)
        new = advance(self.policy, self.state, bad, jnp.asarray([1, 0, 1, 0, 0], bool))
        np.testing.assert_array_equal(new.state[:2], [self.policy.dead, self.states[1]])
        np.testing.assert_array_equal(new.failed, [1, 0, 0, 0, 1])
        assert int(new.state[2]) == _np_next(self.policy, int(self.states[2]), ids[b"e"])

    def test_vmap_of_single_rows_equals_batch(self):
        token = jnp.asarray([self.ids[b"a"], self.ids[b"b"], self.ids[b"c"], TOY.eos_id, 3], jnp.int32)
        emitted = jnp.asarray([1, 1, 0, 1, 1], bool)
        one = lambda x: x[None]  # noqa: E731

        def advance_row(s, t, e):
            out = GATE.advance(self.policy, jax.tree.map(one, s), t[None], e[None])
            return jax.tree.map(lambda x: x[0], out)

        def mask_row(s):
            return GATE.evaluate(self.policy, jax.tree.map(one, s), jnp.zeros((1, V))).mask[0]

        chex.assert_trees_all_equal(
            jax.vmap(advance_row)(self.state, token, emitted), GATE.advance(self.policy, self.state, token, emitted)
        )
        chex.assert_trees_all_equal(
            jax.vmap(mask_row)(self.state), GATE.evaluate(self.policy, self.state, jnp.zeros((5, V))).mask
        )

    def test_check_leaves_the_token(self):
        out = GATE.check(self.policy, self.state, jnp.arange(5, dtype=jnp.int32))
        np.testing.assert_array_equal(out.token, np.arange(5))
        assert not np.asarray(out.stop).any()


def test_gate_is_cached_and_wide_logits_are_padded():
    assert gs.structure_gate(V, 0) is GATE
    policy = gs.compile_regex("yes|no", TOY)
    d = GATE.evaluate(policy, GATE.init(policy, 2), jnp.zeros((2, V + 40)))
    chex.assert_shape(d.mask, (2, V + 40))
    assert not np.asarray(d.mask)[:, V:].any()


def test_two_schemas_of_one_bucket_share_one_trace():
    a = gs.compile_json_schema({"type": "boolean"}, TOY)
    b = gs.compile_json_schema({"enum": ["yes", "no"]}, TOY, rule=3)
    chex.assert_trees_all_equal_shapes_and_dtypes(a, b)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def gated_step(policy, state, logits):
        d = GATE.evaluate(policy, state, logits)
        token = jnp.argmax(jnp.where(d.mask, logits, -jnp.inf), axis=-1).astype(jnp.int32)
        out = GATE.check(policy, state, token)
        return GATE.advance(policy, state, out.token, ~d.stop), out.token

    logits = jax.random.normal(jax.random.key(0), (3, V))
    for policy in (a, b, a):
        state, token = gated_step(policy, GATE.init(policy, 3), logits)
        assert np.asarray(_evaluate(policy, GATE.init(policy, 3))[0])[np.arange(3), np.asarray(token)].all()


def test_length_stop_report():
    p = gs.compile_regex(REGEX, TOY)
    ids = TOY.encode("ab")
    state = GATE.init(p, 1)
    for t in ids:
        state = GATE.advance(p, state, jnp.asarray([t]), jnp.ones((1,), bool))
    assert gs.length_stop_report(p, state).startswith("unfinished structure")
    state = GATE.advance(p, state, jnp.asarray([TOY.encode("e")[0]]), jnp.ones((1,), bool))
    assert gs.length_stop_report(p, state) is None
    assert gs.length_stop_report(p, jax.tree.map(lambda x: x[0], state)) is None
    broken = GATE.advance(p, state, jnp.asarray([TOY.encode("a")[0]]), jnp.ones((1,), bool))
    assert "broken structure" in gs.length_stop_report(p, broken)


# --------------------------------------------------------------------------------------------------------------
# Tables against outlines-core's own Guide.


def _pick_by_next_state(policy, s: int, eos: int, rng) -> int:
    """A random admissible token, drawn so that every next state (and EOS) is equally likely: walks then
    leave strings (where nearly every token is admissible) instead of staying in them."""
    lo, hi = np.asarray(policy.offsets)[s : s + 2]
    tokens, targets = np.asarray(policy.tokens)[lo:hi], np.asarray(policy.next_state)[lo:hi]
    options = [*np.unique(targets)] + ([-1] if bool(policy.accepting[s]) else [])
    target = rng.choice(options)
    return eos if target == -1 else int(rng.choice(tokens[targets == target]))


def _cross_check(regex, tokenizer, rng, *, walks, steps):
    """Along random admissible walks, our mask (jitted gate and numpy tables) equals outlines-core's."""
    vocab = len(tokenizer.token_bytes())
    policy = gs.compile_regex(regex, tokenizer)
    gate = gs.structure_gate(vocab, tokenizer.eos_id)
    evaluate = jax.jit(lambda p, s: gate.evaluate(p, s, jnp.zeros((1, vocab))).mask[0])
    advance = jax.jit(gate.advance)
    index = gs._build_index(regex, tokenizer)
    visited = set()
    for _ in range(walks):
        guide = outlines_core.Guide(index)
        state = gate.init(policy, 1)
        for _ in range(steps):
            theirs = np.zeros(vocab, bool)
            theirs[guide.get_tokens()] = True
            ours = np.asarray(evaluate(policy, state))
            s = int(state.state[0])
            visited.add(s)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"state {s}")
            np.testing.assert_array_equal(_np_mask(policy, s, vocab), theirs)
            t = _pick_by_next_state(policy, s, tokenizer.eos_id, rng)
            if t == tokenizer.eos_id:
                assert guide.is_finished() and bool(policy.accepting[s])
                break
            guide.advance(t, return_tokens=False)
            state = advance(policy, state, jnp.asarray([t], jnp.int32), jnp.ones((1,), bool))
            assert int(state.state[0]) == _np_next(policy, s, t)
    return visited


def test_masks_match_outlines_core_on_the_toy_vocabulary():
    rng = np.random.default_rng(0)
    schema = {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "array", "items": {"enum": ["é", 1, None]}}},
        "required": ["b"],
    }
    visited = _cross_check(gs.json_schema_regex(schema), TOY, rng, walks=20, steps=40)
    assert len(visited) > 10


# --------------------------------------------------------------------------------------------------------------
# Property tests: random schemas / regexes, uniform walks through the gate.

_LITERALS = ["a", "é", 'q"', "b\\c", "", "yes", 0, -3, 12, 2.5, -0.5, True, False, None]
_NAMES = ["a", "b", "id", "x_y", "é"]


def _scalar_schema():
    return st.one_of(
        st.sampled_from([{"type": t} for t in ("string", "integer", "number", "boolean", "null")]),
        st.just({"type": ["string", "null"]}),
        st.lists(st.sampled_from(_LITERALS), min_size=1, max_size=3, unique_by=json.dumps).map(lambda v: {"enum": v}),
        st.sampled_from(_LITERALS).map(lambda v: {"const": v}),
    )


@st.composite
def _object_schema(draw, children):
    names = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3, unique=True))
    props = {n: draw(children) for n in names}
    required = [n for n in names if draw(st.booleans())]
    out = {"type": "object", "properties": props, "required": required}
    if draw(st.booleans()):
        out["additionalProperties"] = False
    return out


_SCHEMAS = st.recursive(
    _scalar_schema(),
    # objects twice: they are the common case, and the one with the most regex structure
    lambda children: st.one_of(
        _object_schema(children), children.map(lambda s: {"type": "array", "items": s}), _object_schema(children)
    ),
    max_leaves=5,
)


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True)


def _valid(value, schema) -> bool:
    """A validator for the supported subset."""
    if "const" in schema:
        return _canon(value) == _canon(schema["const"])
    if "enum" in schema:
        return _canon(value) in {_canon(e) for e in schema["enum"]}
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    for t in types:
        if t == "object" and isinstance(value, dict):
            props = schema.get("properties", {})
            if set(value) <= set(props) and set(schema.get("required", ())) <= set(value):
                if all(_valid(v, props[k]) for k, v in value.items()):
                    return True
        elif t == "array" and isinstance(value, list):
            if all(_valid(v, schema["items"]) for v in value):
                return True
        elif t not in ("object", "array") and gs._is_type(value, t):
            return True
    return False


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), keys
    return dict(pairs)


_PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_PROPERTY
@given(schema=_SCHEMAS, seed=st.integers(0, 2**32 - 1))
def test_random_walks_satisfy_random_schemas(schema, seed):
    policy = gs.compile_json_schema(schema, TOY)
    texts = _walk(policy, TOY, np.random.default_rng(seed))
    for raw in texts:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        assert _valid(value, schema), (raw, schema)


_ATOMS = ["a", "b", "0", "1", " ", "[ab]", "[0-9]", "[a-c]", "true", r"\{", r"\.", "é", '"', r"\\"]


def _regexes():
    def compound(children):
        return st.one_of(
            st.tuples(children, children).map(lambda p: p[0] + p[1]),
            st.tuples(children, children).map(lambda p: f"({p[0]}|{p[1]})"),
            st.tuples(children, st.sampled_from(["*", "+", "?", "{1,3}", "{2}"])).map(lambda p: f"({p[0]}){p[1]}"),
        )

    return st.recursive(st.sampled_from(_ATOMS), compound, max_leaves=6)


@_PROPERTY
@given(regex=_regexes(), seed=st.integers(0, 2**32 - 1))
def test_random_walks_fully_match_random_regexes(regex, seed):
    policy = gs.compile_regex(regex, TOY)
    for raw in _walk(policy, TOY, np.random.default_rng(seed), rows=8, max_steps=60):
        assert re.fullmatch(regex, raw.decode("utf-8")), (regex, raw)


# --------------------------------------------------------------------------------------------------------------
# Schema validation.


@pytest.mark.parametrize(
    "schema, where",
    [
        ({"type": "object", "properties": {"age": {"type": "integr"}}}, "$.properties.age.type: unknown type 'integr'"),
        ({"type": "string", "minLength": 1}, "$.minLength: unsupported keyword"),
        ({"type": "array"}, "$.items: missing"),
        ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}, "$.required[0]:"),
        ({"type": "object", "additionalProperties": True}, "$.additionalProperties: only false"),
        ({"enum": []}, "$.enum: must be a non-empty list"),
        ({"type": "string", "enum": ["a", 1]}, "$.enum[1]: 1 is not of type 'string'"),
        (
            {"type": "object", "properties": {"a b": {"type": "array", "items": {"type": "nope"}}}},
            '$.properties["a b"].items.type: unknown type',
        ),
        ({"type": ["string", "object"]}, "$.type[1]: type lists may only hold"),
        ({"type": "object", "properties": {'q"': {"type": "null"}}}, '$.properties["q\\""]: property names'),
        ({"type": "string", "properties": {}}, "$.properties: keyword needs type 'object'"),
        ({"description": "anything"}, "$: needs 'type', 'enum' or 'const'"),
        ({"const": float("nan")}, "$.const: nan is not a JSON number"),
        ({"type": "array", "items": {"anyOf": []}}, "$.items.anyOf: unsupported keyword"),
        ("object", "$: a schema must be an object"),
    ],
)
def test_malformed_schemas_name_the_path(schema, where):
    with pytest.raises(gs.StructureError) as e:
        gs.compile_json_schema(schema, TOY)
    assert str(e.value).startswith(where), str(e.value)


def test_bad_regexes_raise():
    with pytest.raises(gs.StructureError):
        gs.compile_regex("a(", TOY)
    with pytest.raises(gs.StructureError, match="incompatible"):
        gs.compile_regex("Z", TOY)  # no token spells it


# --------------------------------------------------------------------------------------------------------------
# The real SmolLM2 tokenizer (compiled once for the module).

SCHEMA = gs.BENCH_SCHEMA


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from models.gguf import read_gguf_metadata
    from models.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(read_gguf_metadata(smollm2_gguf))


@pytest.fixture(scope="module")
def compiled(tokenizer):
    return gs.compile_json_schema(SCHEMA, tokenizer, rule=5)


@functools.cache
def _real_fns(vocab, eos):
    gate = gs.structure_gate(vocab, eos)
    evaluate = jax.jit(lambda p, s: gate.evaluate(p, s, jnp.zeros((s.state.shape[0], vocab))))
    return gate, evaluate, jax.jit(gate.advance)


def test_real_tokenizer_initial_mask(tokenizer, compiled):
    gate, evaluate, _ = _real_fns(tokenizer.vocab_size, tokenizer.eos_id)
    mask = np.asarray(evaluate(compiled, gate.init(compiled, 1)).mask[0])
    pieces = tokenizer.token_bytes()
    allowed = {pieces[i] for i in np.flatnonzero(mask)}
    assert {b"{", b'{"'} <= allowed
    assert b"a" not in allowed and b" " not in allowed
    assert all(p.startswith(b"{") for p in allowed)
    assert not mask[list(tokenizer.special_ids)].any()


def test_real_tokenizer_feeds_the_example_to_an_accepting_state(tokenizer, compiled):
    gate, evaluate, advance = _real_fns(tokenizer.vocab_size, tokenizer.eos_id)
    ids = tokenizer.encode('{"name": "Ada", "age": 36, "tags": ["x"]}')
    state = gate.init(compiled, 1)
    for t in ids:
        d = evaluate(compiled, state)
        assert bool(d.mask[0, t]) and not bool(d.mask[0, tokenizer.eos_id])
        assert int(d.verdict[0]) == Verdict.ADMIT
        assert gs.length_stop_report(compiled, state).startswith("unfinished structure")
        state = advance(compiled, state, jnp.asarray([t], jnp.int32), jnp.ones((1,), bool))
    d = evaluate(compiled, state)
    assert bool(compiled.accepting[int(state.state[0])])
    assert np.flatnonzero(d.mask[0]).tolist() == [tokenizer.eos_id]
    assert gs.length_stop_report(compiled, state) is None
    # a wrong token kills the row: the next decision refuses, naming the rule
    state = advance(compiled, state, jnp.asarray([ids[0]], jnp.int32), jnp.ones((1,), bool))
    d = evaluate(compiled, state)
    assert bool(d.stop[0]) and int(d.verdict[0]) == Verdict.REFUSE and int(d.rule[0]) == 5


def test_real_tokenizer_masks_match_outlines_core(tokenizer):
    visited = _cross_check(gs.json_schema_regex(SCHEMA), tokenizer, np.random.default_rng(1), walks=3, steps=25)
    assert len(visited) > 5


def test_real_tokenizer_malformed_schema(tokenizer):
    bad = {**SCHEMA, "properties": {**SCHEMA["properties"], "age": {"type": "integr"}}}
    with pytest.raises(gs.StructureError, match=r"^\$\.properties\.age\.type: unknown type 'integr'"):
        gs.compile_json_schema(bad, tokenizer)


def test_vocabulary_is_cached(tokenizer):
    assert gs._vocabulary(tokenizer) is gs._vocabulary(tokenizer)
