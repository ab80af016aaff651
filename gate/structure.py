"""The structure gate: the output must match a regular expression or a JSON schema.

On the host, outlines-core turns the regex (or the regex of a JSON schema) and our tokenizer's vocabulary
into a token-level automaton. `CompiledStructure` stores that automaton as arrays the jitted step can index:
one packed bitmask of admissible tokens per state (so a mask costs one row gather and an unpack, never a
[S, V] table), and the transitions in CSR form sorted by token, searched by a fixed-length binary search.
Shapes are padded to power-of-two buckets, so schemas of similar size share one compiled decode loop.

EOS is admissible only in accepting states, where it leaves the state unchanged. A state with no admissible
token (the vocabulary cannot complete the structure, or a token from outside the gate broke it) stops the
row with verdict REFUSE. The last row of `allowed` is always a padding row: it is that dead state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from gate.core import NO_RULE, NO_TOKEN, Decision, Gate, Outcome, Verdict, keep_rows, pack_bits, unpack_bits

__all__ = [
    "CompiledStructure",
    "StructureError",
    "StructureState",
    "bench",
    "compile_json_schema",
    "compile_regex",
    "json_schema_regex",
    "length_stop_report",
    "structure_gate",
]

# At most one optional space between JSON tokens: models write `{"a": 1}`, and a looser pattern multiplies
# the automaton's states.
WHITESPACE = r"[ ]?"

# Smallest buckets, so that tiny grammars do not each get their own shapes.
_MIN_STATES = 8
_MIN_EDGES = 8


class StructureError(ValueError):
    """A regex or JSON schema the structure gate cannot compile (the message names the JSON path)."""


@struct.dataclass
class CompiledStructure:
    """A token-level automaton as arrays (the structure gate's policy).

    Attributes:
      allowed: UInt32[S, W] admissible tokens per state, bit j of word w = token 32 * w + j (W = ceil(V / 32)).
        The EOS bit is set only in accepting states; padding rows (the last is the dead state) are all zero.
      offsets: Int[S + 1] the transitions of state s are entries offsets[s] .. offsets[s + 1] - 1.
      tokens: Int[E] transition tokens, sorted within each state (padding: int32 max).
      next_state: Int[E] target state of each transition.
      accepting: Bool[S] states where the output may end.
      initial: Int[] the start state.
      rule: Int[] the global rule id the policy compiler gave this structure (reported on REFUSE).
    """

    allowed: UInt32[Array, "S W"]
    offsets: Int[Array, " S1"]
    tokens: Int[Array, " E"]
    next_state: Int[Array, " E"]
    accepting: Bool[Array, " S"]
    initial: Int[Array, ""]
    rule: Int[Array, ""]

    @property
    def dead(self) -> int:
        """The dead state: the last (always padding) row."""
        return self.allowed.shape[0] - 1

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))

    def with_rule(self, rule: int) -> CompiledStructure:
        return self.replace(rule=jnp.asarray(rule, jnp.int32))


@struct.dataclass
class StructureState:
    """Per-row automaton state.

    Attributes:
      state: Int[B] current automaton state.
      failed: Bool[B] the row emitted a token the automaton has no transition for (it is now dead).
    """

    state: Int[Array, " B"]
    failed: Bool[Array, " B"]


# --------------------------------------------------------------------------------------------------------------
# The jitted side.


def _search(policy: CompiledStructure, state: Int[Array, " B"], token: Int[Array, " B"]):
    """Transition lookup: (next state, found) by lower-bound binary search in the state's CSR slice."""
    E = policy.tokens.shape[0]
    start, end = policy.offsets[state], policy.offsets[state + 1]
    # Each step at least halves the candidate range; slices are shorter than E (E is padded past the real edge
    # count), so ceil(log2(E)) steps empty any of them.
    n_steps = max(1, (E - 1).bit_length())

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) // 2
        right = (lo < hi) & (policy.tokens[jnp.minimum(mid, E - 1)] < token)
        return jnp.where(right, mid + 1, lo), jnp.where((lo < hi) & ~right, mid, hi)

    lo, _ = lax.fori_loop(0, n_steps, body, (start, end), unroll=False)
    at = jnp.minimum(lo, E - 1)
    found = (lo < end) & (policy.tokens[at] == token)
    return policy.next_state[at], found


@functools.cache
def structure_gate(vocab_size: int, eos_id: int) -> Gate:
    """The structure gate for a vocabulary (cached: the same arguments give the identical Gate).

    Args:
      vocab_size: V, the number of token ids (masks wider than V, e.g. a padded lm head, are padded False).
      eos_id: the end-of-sequence id, admissible only in accepting states.

    Returns:
      a `Gate` whose policy is a `CompiledStructure` and whose state is a `StructureState`.
    """

    def init(policy: CompiledStructure, batch: int) -> StructureState:
        return StructureState(state=jnp.full((batch,), policy.initial, jnp.int32), failed=jnp.zeros((batch,), bool))

    def evaluate(policy: CompiledStructure, state: StructureState, logits: Float[Array, "B V"]) -> Decision:
        words = policy.allowed[state.state]
        mask = unpack_bits(words, vocab_size)
        n = logits.shape[-1]
        if n < vocab_size:
            raise ValueError(f"logits have {n} entries, fewer than the gate's vocabulary ({vocab_size})")
        if n > vocab_size:
            mask = jnp.pad(mask, ((0, 0), (0, n - vocab_size)))
        empty = ~jnp.any(words != 0, axis=-1)
        B = state.state.shape[0]
        return Decision(
            mask=mask,
            verdict=jnp.where(empty, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
            rule=jnp.where(empty, policy.rule, NO_RULE).astype(jnp.int32),
            confidence=jnp.ones((B,), jnp.float32),
            forced=jnp.full((B,), NO_TOKEN, jnp.int32),
            stop=empty,
        )

    def check(policy: CompiledStructure, state: StructureState, token: Int[Array, " B"]) -> Outcome:
        # The mask already admits only tokens with a transition (or EOS where the output may end).
        del policy, state
        return Outcome.unchanged(token)

    def advance(
        policy: CompiledStructure, state: StructureState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
        seen: Int[Array, " B"] | None = None,
    ) -> StructureState:
        del seen  # this gate never rewrites tokens
        nxt, found = _search(policy, state.state, token)
        # EOS has no transition: in an accepting state it ends the output where it is.
        stay = (token == eos_id) & policy.accepting[state.state]
        ok = found | stay
        new = StructureState(
            state=jnp.where(found, nxt, jnp.where(stay, state.state, policy.dead)).astype(jnp.int32),
            failed=state.failed | ~ok,
        )
        return keep_rows(emitted, new, state)

    return Gate(init, evaluate, check, advance)


# --------------------------------------------------------------------------------------------------------------
# Host side: vocabulary, automaton, tables.


def _vocab_key(tokenizer) -> str:
    tb = tokenizer.token_bytes()
    specials = sorted(getattr(tokenizer, "special_ids", ()))
    h = hashlib.sha256()
    h.update(np.asarray([len(b) for b in tb], np.int64).tobytes())
    h.update(b"".join(tb))
    h.update(np.asarray([tokenizer.eos_id, *specials], np.int64).tobytes())
    return h.hexdigest()


_VOCABULARIES: dict[str, Any] = {}


def _vocabulary(tokenizer):
    """outlines-core's Vocabulary of our tokenizer, cached by a hash of its token bytes (building it costs)."""
    import outlines_core

    key, eos = _vocab_key(tokenizer), int(tokenizer.eos_id)
    vocab = _VOCABULARIES.get(key)
    if vocab is None:
        # Control tokens (chat markers and the like) never occur inside a structure; EOS is added by
        # outlines-core itself, in accepting states.
        skip = set(getattr(tokenizer, "special_ids", ())) | {eos}
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokenizer.token_bytes()):
            if b and i not in skip:
                by_bytes.setdefault(b, []).append(i)
        vocab = outlines_core.Vocabulary(eos, by_bytes)
        if len(_VOCABULARIES) >= 8:
            _VOCABULARIES.pop(next(iter(_VOCABULARIES)))
        _VOCABULARIES[key] = vocab
    return vocab


def _build_index(regex: str, tokenizer):
    """outlines-core's token-level Index of `regex` over the tokenizer's vocabulary."""
    import outlines_core

    try:
        return outlines_core.Index(regex, _vocabulary(tokenizer))
    except ValueError as e:
        raise StructureError(f"cannot build the automaton: {e}") from None


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def _tables(index, vocab_size: int, eos_id: int, rule: int = 0) -> CompiledStructure:
    """Turns an outlines-core Index into padded arrays (states renumbered 0..S_real-1)."""
    transitions = index.get_transitions()
    initial, finals = index.get_initial_state(), index.get_final_states()
    ids = {initial, *finals, *transitions}
    for edges in transitions.values():
        ids.update(edges.values())
    ids = np.array(sorted(ids), np.int64)
    n_real = len(ids)

    src = np.concatenate([np.full(len(d), s, np.int64) for s, d in transitions.items()] or [np.zeros(0, np.int64)])
    tok = np.concatenate([np.fromiter(d.keys(), np.int64, len(d)) for d in transitions.values()] or [src])
    dst = np.concatenate([np.fromiter(d.values(), np.int64, len(d)) for d in transitions.values()] or [src])
    keep = tok != eos_id  # EOS is handled by `accepting`, not by a transition
    src, tok, dst = np.searchsorted(ids, src[keep]), tok[keep], np.searchsorted(ids, dst[keep])
    order = np.lexsort((tok, src))
    src, tok, dst = src[order], tok[order], dst[order]
    if len(tok) and (tok.min() < 0 or tok.max() >= vocab_size):
        raise StructureError(f"the automaton uses token ids outside the vocabulary (size {vocab_size})")

    S = _bucket(n_real + 1, _MIN_STATES)  # + 1: the last row stays empty, as the dead state
    E = _bucket(len(tok) + 1, _MIN_EDGES)  # + 1: keeps every state's slice shorter than E (see _search)
    accepting = np.zeros(S, bool)
    accepting[np.searchsorted(ids, np.fromiter(finals, np.int64, len(finals)))] = True

    mask = np.zeros((n_real, vocab_size), bool)
    mask[src, tok] = True
    mask[accepting[:n_real], eos_id] = True
    allowed = np.zeros((S, -(-vocab_size // 32)), np.uint32)
    allowed[:n_real] = pack_bits(mask)

    offsets = np.full(S + 1, len(tok), np.int64)
    offsets[: n_real + 1] = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n_real))])
    tokens = np.full(E, np.iinfo(np.int32).max, np.int64)
    tokens[: len(tok)] = tok
    next_state = np.full(E, S - 1, np.int64)
    next_state[: len(dst)] = dst
    return CompiledStructure(
        allowed=jnp.asarray(allowed),
        offsets=jnp.asarray(offsets.astype(np.int32)),
        tokens=jnp.asarray(tokens.astype(np.int32)),
        next_state=jnp.asarray(next_state.astype(np.int32)),
        accepting=jnp.asarray(accepting),
        initial=jnp.asarray(np.searchsorted(ids, initial), jnp.int32),
        rule=jnp.asarray(rule, jnp.int32),
    )


def compile_regex(regex: str, tokenizer, *, rule: int = 0) -> CompiledStructure:
    """Compiles a regex (matched in full, over the UTF-8 bytes of the output) for a tokenizer.

    Args:
      regex: the pattern (Rust `regex` syntax: no look-around, no back-references).
      tokenizer: anything with `token_bytes()`, `eos_id` and optionally `special_ids` (never admissible).
      rule: the global rule id reported when the structure cannot be completed.

    Raises:
      StructureError: the pattern is invalid or the vocabulary cannot spell it.
    """
    if not isinstance(regex, str):
        raise StructureError(f"regex must be a str, got {type(regex).__name__}")
    index = _build_index(regex, tokenizer)
    return _tables(index, len(tokenizer.token_bytes()), int(tokenizer.eos_id), rule)


def compile_json_schema(schema: dict, tokenizer, *, rule: int = 0) -> CompiledStructure:
    """Compiles a JSON schema (a subset of OpenAI's response_format) for a tokenizer.

    Supported: type (object, array, string, integer, number, boolean, null, or a list of the scalar ones),
    properties, required, additionalProperties (false or absent; absent is read as false), items, enum, const,
    and the annotations title, description, default, examples, $comment, $schema, $id. As outlines-core builds
    it, properties come in the order the schema lists them, and at most one space separates JSON tokens.

    Raises:
      StructureError: an unsupported or malformed keyword, naming its JSON path (e.g. `$.properties.age.type`).
    """
    return compile_regex(json_schema_regex(schema), tokenizer, rule=rule)


def length_stop_report(compiled: CompiledStructure, state: StructureState, row: int = 0) -> str | None:
    """What to tell the caller about a row that stopped by length: None when its output is a complete structure.

    Args:
      compiled: the policy the row decoded under.
      state: the gate's state at the end of the turn (batched, or a single row with scalar leaves).
      row: which row of a batched state.
    """
    s = np.asarray(state.state)
    failed = np.asarray(state.failed)
    s, failed = (s, failed) if s.ndim == 0 else (s[row], failed[row])
    if bool(failed):
        return "broken structure: a token outside the structure was emitted"
    if not bool(np.asarray(compiled.accepting)[int(s)]):
        return "unfinished structure: the output stopped by length before the structure was complete"
    return None


# --------------------------------------------------------------------------------------------------------------
# JSON schema subset.

_SCALARS = ("string", "integer", "number", "boolean", "null")
_TYPES = (*_SCALARS, "object", "array")
_ANNOTATIONS = {"title", "description", "default", "examples", "$comment"}
_ROOT_ONLY = {"$schema", "$id"}
_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties", "items"}
_OBJECT_KEYWORDS = {"properties", "required", "additionalProperties"}
_BAD_NAME = re.compile(r'["\\\x00-\x1f\x7f-\x9f]')
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def _is_type(value: Any, name: str) -> bool:
    return {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
    }[name](value)


def _check_literal(value: Any, path: str) -> None:
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StructureError(f"{path}: {value!r} is not a JSON number")
        return
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_literal(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise StructureError(f"{path}: object keys must be strings, got {k!r}")
            _check_literal(v, _key_path(path, k))
        return
    raise StructureError(f"{path}: {type(value).__name__} is not a JSON value")


def _normalize(node: Any, path: str) -> dict:
    """Checks one schema node against the subset and returns it with only the keywords outlines-core needs."""
    if not isinstance(node, dict):
        raise StructureError(f"{path}: a schema must be an object, got {type(node).__name__}")
    allowed = _KEYWORDS | _ANNOTATIONS | (_ROOT_ONLY if path == "$" else set())
    for key in node:
        if key not in allowed:
            raise StructureError(f"{_key_path(path, str(key))}: unsupported keyword {key!r}")

    types = node.get("type")
    if "type" in node:
        names = types if isinstance(types, list) else [types]
        if isinstance(types, list) and (not types or len(set(map(str, types))) != len(types)):
            raise StructureError(f"{path}.type: a type list must be non-empty and without repeats")
        for i, name in enumerate(names):
            where = f"{path}.type[{i}]" if isinstance(types, list) else f"{path}.type"
            if not isinstance(name, str) or name not in _TYPES:
                raise StructureError(f"{where}: unknown type {name!r}")
            if isinstance(types, list) and name not in _SCALARS:
                raise StructureError(f"{where}: type lists may only hold {', '.join(_SCALARS)}")
        types = names
    for key in node:
        if key in _OBJECT_KEYWORDS and types != ["object"]:
            raise StructureError(f"{path}.{key}: keyword needs type 'object'")
        if key == "items" and types != ["array"]:
            raise StructureError(f"{path}.items: keyword needs type 'array'")

    if "enum" in node or "const" in node:
        if "enum" in node and "const" in node:
            raise StructureError(f"{path}: give either 'enum' or 'const', not both")
        if "const" in node:
            values, where = [node["const"]], [f"{path}.const"]
        else:
            values = node["enum"]
            if not isinstance(values, list) or not values:
                raise StructureError(f"{path}.enum: must be a non-empty list")
            where = [f"{path}.enum[{i}]" for i in range(len(values))]
        for v, w in zip(values, where, strict=True):
            _check_literal(v, w)
            if types is not None and not any(_is_type(v, t) for t in types):
                raise StructureError(f"{w}: {json.dumps(v)} is not of type {' or '.join(map(repr, types))}")
        return {"const": values[0]} if "const" in node else {"enum": list(values)}

    if types is None:
        raise StructureError(f"{path}: needs 'type', 'enum' or 'const'")
    if types == ["object"]:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise StructureError(f"{path}.properties: must be an object")
        out_props = {}
        for name, sub in props.items():
            # outlines-core writes property names into the regex without JSON escaping.
            if _BAD_NAME.search(name):
                raise StructureError(
                    f"{_key_path(path + '.properties', name)}: property names with quotes, backslashes or "
                    "control characters are not supported"
                )
            out_props[name] = _normalize(sub, _key_path(f"{path}.properties", name))
        required = node.get("required", [])
        if not isinstance(required, list):
            raise StructureError(f"{path}.required: must be a list of property names")
        for i, name in enumerate(required):
            if not isinstance(name, str) or name not in props:
                raise StructureError(f"{path}.required[{i}]: {name!r} is not a property")
        if len(set(required)) != len(required):
            raise StructureError(f"{path}.required: lists a property twice")
        if node.get("additionalProperties", False) is not False:
            raise StructureError(f"{path}.additionalProperties: only false is supported")
        return {"type": "object", "properties": out_props, "required": list(required), "additionalProperties": False}
    if types == ["array"]:
        if "items" not in node:
            raise StructureError(f"{path}.items: missing (arrays need an item schema)")
        return {"type": "array", "items": _normalize(node["items"], f"{path}.items")}
    return {"type": types[0] if len(types) == 1 else types}


def json_schema_regex(schema: dict) -> str:
    """The regex of a JSON schema from the supported subset (see `compile_json_schema`).

    Raises:
      StructureError: an unsupported or malformed keyword, naming its JSON path.
    """
    from outlines_core.json_schema import build_regex_from_schema

    clean = _normalize(schema, "$")
    try:
        return build_regex_from_schema(json.dumps(clean), whitespace_pattern=WHITESPACE)
    except ValueError as e:
        raise StructureError(f"$: outlines-core rejected the schema: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# Benchmark.

BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
# The text peers were fed in /work/shared/peers/grammar_bench.py (it also satisfies BENCH_SCHEMA).
BENCH_TEXT = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"]}'


def _times_us(fn, reps: int) -> np.ndarray:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times) * 1e6


def _median_us(fn, reps: int) -> float:
    return float(np.median(_times_us(fn, reps)))


def _best_us(fn, reps: int) -> float:
    return float(np.min(_times_us(fn, reps)))


def bench(tokenizer, *, schema: dict = BENCH_SCHEMA, text: str = BENCH_TEXT, call_passes: int = 20) -> dict:
    """Compile time, table sizes and per-token cost of the gate for `schema`, fed the tokens of `text` then EOS.

    Per-token cost is evaluate (the [1, V] mask) + advance at batch 1, (a) as one jitted call per token
    (includes dispatch) and (b) inside one compiled `lax.scan` over the fed tokens (the cost in the decode
    loop); (b) is also given for advance alone. Compile times and (a) are medians (of `call_passes` passes
    for (a)), (b) the best of 9 runs of 50 passes. Each fed token is checked to be admissible, and the final
    state to be accepting.
    """
    regex = json_schema_regex(schema)
    V, eos = len(tokenizer.token_bytes()), int(tokenizer.eos_id)
    _VOCABULARIES.pop(_vocab_key(tokenizer), None)
    t0 = time.perf_counter()
    _vocabulary(tokenizer)
    vocab_ms = (time.perf_counter() - t0) * 1e3
    compile_ms = _median_us(lambda: compile_regex(regex, tokenizer), 5) / 1e3
    index_ms = _median_us(lambda: _build_index(regex, tokenizer), 5) / 1e3
    policy = compile_regex(regex, tokenizer)
    index = _build_index(regex, tokenizer)
    n_states = len({index.get_initial_state(), *index.get_transitions()})
    n_edges = int(np.asarray(policy.offsets)[-1])

    gate = structure_gate(V, eos)
    ids = jnp.asarray([*tokenizer.encode(text), eos], jnp.int32)
    fed = [jnp.asarray([t], jnp.int32) for t in np.asarray(ids)]  # on device already, as in the loop
    logits = jnp.zeros((1, V), jnp.float32)
    yes = jnp.ones((1,), bool)

    @jax.jit
    def step(policy, state, token):
        d = gate.evaluate(policy, state, logits)
        ok = d.mask[0, token[0]]
        return gate.advance(policy, state, token, yes), ok, jnp.sum(d.mask)

    state0 = gate.init(policy, 1)

    def one_pass():
        s, oks = state0, []
        for t in fed:
            s, ok, _ = step(policy, s, t)
            oks.append(ok)
        jax.block_until_ready(s)
        return s, oks

    s, oks = one_pass()
    assert all(bool(o) for o in oks), "a fed token was not admissible"
    assert bool(np.asarray(policy.accepting)[int(s.state[0])]), "the fed text did not end in an accepting state"
    per_call_us = _median_us(one_pass, call_passes) / len(ids)

    def scan_us(body, n_passes: int = 50) -> float:
        """Microseconds per fed token of `body(state, token) -> (state, int32)` inside one compiled scan."""

        @jax.jit
        def passes(policy):
            def one(i, acc):
                # Starting from a state that depends on the carry keeps XLA from hoisting the pass out of the loop.
                start = state0.replace(state=state0.state + (acc < 0))
                s, out = lax.scan(lambda s, t: body(policy, s, t), start, ids)
                return acc + jnp.sum(out) + s.state[0]

            return lax.fori_loop(0, n_passes, one, jnp.zeros((), jnp.int32))

        jax.block_until_ready(passes(policy))
        # Best of several: a shared machine adds noise, never speed.
        return _best_us(lambda: jax.block_until_ready(passes(policy)), 9) / (n_passes * len(ids))

    def advance_only(p, s, t):
        return gate.advance(p, s, t[None], yes), t

    def evaluate_advance(p, s, t):
        # sum(mask) forces the whole [1, V] mask to be built (XOR-ing it into a carried buffer costs the same).
        d = gate.evaluate(p, s, logits)
        return gate.advance(p, s, t[None], yes), jnp.sum(d.mask, dtype=jnp.int32) + d.mask[0, t]

    scan_advance = scan_us(advance_only)
    scan_both = scan_us(evaluate_advance)

    return {
        "vocab": V,
        "tokens_fed": len(ids),
        "states": n_states,
        "edges": n_edges,
        "shape_S_W_E": (policy.allowed.shape[0], policy.allowed.shape[1], policy.tokens.shape[0]),
        "bytes_allowed": int(policy.allowed.nbytes),
        "bytes_csr": int(policy.offsets.nbytes + policy.tokens.nbytes + policy.next_state.nbytes),
        "bytes_total": policy.nbytes,
        "vocabulary_build_ms": vocab_ms,
        "outlines_index_ms": index_ms,
        "compile_ms": compile_ms,
        "per_token_us_jitted_call": per_call_us,
        "per_token_us_in_scan": scan_both,
        "per_token_us_in_scan_advance_only": scan_advance,
    }
