"""Grounding of figures: every number the model writes must occur in the turn's evidence.

A *number* is what `NUMBER` matches: a run of ASCII digits in which a single '.' or ',' between two digits
continues it ("4,250,000", "3.14"). Its key drops the commas and keeps the dots ("4250000", "3.14"), so a
figure may be copied with or without thousands separators. Per request, the host builds a digit trie over the
keys of every number in the evidence (documents, tool results and the user's own message; `build_trie`: a
regex pass and a dict walk, about a millisecond for a 2,000-token document) and puts it in the row's state.

In the loop the gate reads the output one character class at a time (digit, '.', ',', other) with the state
(trie node, or outside a number; a pending separator), exactly like `NUMBER`:

* a digit moves down the trie (from the root when a number starts; through the '.' edge when a '.' is
  pending); a digit with no edge is inadmissible;
* a number ends at a character that is neither a digit nor a single separator followed by a digit; it may end
  only at a node that closes an evidence number (`terminal`).

The mask is exact per token: tokens with digits (few in most vocabularies; SmolLM2 has only the ten single
digits) are walked through the trie every step; a token without digits only matters when a number would end
inside it, which depends on its first two character classes alone (`kills`, `lone_sep`). Special tokens (EOS,
chat markers) end the text, so they too may only follow a complete number. So the model can copy a figure
from its sources but cannot invent one, and it cannot stop in the middle of one.

Limitations: "1,2" reads as the number 12 (write "1, 2"); non-ASCII digits are not digits; digits inside words
("H2O", "COVID19") are numbers too; tokens forced by another gate bypass the mask (the state then resumes
outside a number).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from aqjax import ops
from gate.core import NO_RULE, NO_TOKEN, Decision, Gate, Outcome, Verdict, keep_rows

__all__ = [
    "NUMBER",
    "CompiledGrounding",
    "GroundingState",
    "begin_turn",
    "build_trie",
    "compile_grounding",
    "grounding_gate",
    "number_keys",
    "ungrounded",
]

NUMBER = re.compile(r"[0-9]+(?:[.,][0-9]+)*")
DOT, COMMA, OTHER = 10, 11, 12  # character classes besides the digits 0-9; -1 pads
_EDGES = 11  # trie edges: the ten digits and '.'
_NONE = -1


def number_keys(text: str) -> list[str]:
    """The keys of the numbers in `text` (commas dropped, dots kept), in order."""
    return [m.group(0).replace(",", "") for m in NUMBER.finditer(text)]


def ungrounded(text: str, evidence: Iterable[str], free_below: int = 0) -> list[str]:
    """Reference check (no automaton): the numbers of `text` whose key occurs in no evidence text."""
    keys = {k for e in evidence for k in number_keys(e)} | {str(i) for i in range(free_below)}
    return [k for k in number_keys(text) if k not in keys]


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def build_trie(texts: Iterable[str], *, free_below: int = 0, min_nodes: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The digit trie of every number in `texts` (plus the integers below `free_below`).

    Returns:
      (children Int[N, 11] (-1 = no edge; edge 10 is '.'), terminal Bool[N]); node 0 is the root, N a power of
      two >= min_nodes.
    """
    keys = {k for t in texts for k in number_keys(t)} | {str(i) for i in range(free_below)}
    children: list[list[int]] = [[_NONE] * _EDGES]
    terminal = [False]
    for key in sorted(keys):
        node = 0
        for ch in key:
            e = DOT if ch == "." else ord(ch) - 48
            nxt = children[node][e]
            if nxt < 0:
                nxt = len(children)
                children[node][e] = nxt
                children.append([_NONE] * _EDGES)
                terminal.append(False)
            node = nxt
        terminal[node] = True
    N = _bucket(len(children), min_nodes)
    out_c = np.full((N, _EDGES), _NONE, np.int32)
    out_c[: len(children)] = children
    out_t = np.zeros(N, bool)
    out_t[: len(terminal)] = terminal
    return out_c, out_t


@struct.dataclass
class CompiledGrounding:
    """The grounding gate's policy: how each token reads as character classes (V tokens, D with digits).

    Attributes:
      digit_tokens: Int[D] the tokens that hold a digit.
      digit_chars: Int[D, L] their character classes (0-9, DOT, COMMA, OTHER; -1 pads).
      digit_index: Int[V] row of `digit_chars` for a token, -1 for tokens without digits.
      head: Int[V, 2] the first two character classes of each token (-1 pads); special tokens read OTHER.
      kills: Bool[V] a token without digits that ends a number begun before it.
      lone_sep: Bool[V] the token is a single '.' or ',' (it ends a number only after another separator).
      rule: Int[] the global rule id reported when the gate blocks a figure.
    """

    digit_tokens: Int[Array, " D"]
    digit_chars: Int[Array, "D L"]
    digit_index: Int[Array, " V"]
    head: Int[Array, "V 2"]
    kills: Bool[Array, " V"]
    lone_sep: Bool[Array, " V"]
    rule: Int[Array, ""]


@struct.dataclass
class GroundingState:
    """Per-row grounding state (leading axis B); the trie is per request.

    Attributes:
      children: Int[B, N, 11] the row's evidence trie (see `build_trie`); terminal: Bool[B, N].
      node: Int[B] the trie node of the number being written, -1 outside a number.
      sep: Int[B] a pending separator (DOT or COMMA) right after a digit, 0 when none.
      enabled: Bool[B] the gate applies to the row.
    """

    children: Int[Array, "B N E"]
    terminal: Bool[Array, "B N"]
    node: Int[Array, " B"]
    sep: Int[Array, " B"]
    enabled: Bool[Array, " B"]


def _classes(b: bytes) -> list[int]:
    out = []
    for ch in b.decode("utf-8", "surrogateescape"):
        out.append(ord(ch) - 48 if "0" <= ch <= "9" else DOT if ch == "." else COMMA if ch == "," else OTHER)
    return out


def compile_grounding(tokenizer, *, vocab_size: int | None = None, rule: int = 0) -> CompiledGrounding:
    """Reads every token of the vocabulary as character classes (host side, once per tokenizer)."""
    tb = list(tokenizer.token_bytes())
    V = len(tb) if vocab_size is None else int(vocab_size)
    special = set(getattr(tokenizer, "special_ids", ())) | {int(tokenizer.eos_id)}
    head = np.full((V, 2), -1, np.int32)
    digits: list[tuple[int, list[int]]] = []
    for t in range(V):
        cls = [OTHER] if t in special or t >= len(tb) else _classes(tb[t])
        if any(c <= 9 for c in cls):
            digits.append((t, cls))
        head[t, : min(2, len(cls))] = cls[:2]
    L = _bucket(max([len(c) for _, c in digits], default=1), 2)
    D = _bucket(len(digits), 16)
    digit_tokens = np.zeros(D, np.int32)
    digit_chars = np.full((D, L), -1, np.int32)
    digit_index = np.full(V, -1, np.int32)
    for i, (t, cls) in enumerate(digits):
        digit_tokens[i] = t
        digit_chars[i, : len(cls)] = cls
        digit_index[t] = i
    # padding rows repeat token digits[0] (harmless: the mask for it is set twice to the same value)
    digit_tokens[len(digits):] = digit_tokens[0] if digits else 0
    digit_chars[len(digits):] = digit_chars[0]
    first, second = head[:, 0], head[:, 1]
    is_sep = (first == DOT) | (first == COMMA)
    lone_sep = is_sep & (second < 0) & (digit_index < 0)
    kills = (digit_index < 0) & ((first == OTHER) | (is_sep & (second >= 0)))
    return CompiledGrounding(
        digit_tokens=jnp.asarray(digit_tokens), digit_chars=jnp.asarray(digit_chars),
        digit_index=jnp.asarray(digit_index), head=jnp.asarray(head), kills=jnp.asarray(kills),
        lone_sep=jnp.asarray(lone_sep), rule=jnp.asarray(rule, jnp.int32))


def _walk(state: GroundingState, node, sep, chars):
    """Feeds class columns `chars` [..., L] (rows broadcast against node / sep [B, ...]); returns (node, sep, ok)."""
    B, N, E = state.children.shape
    children, terminal = state.children.reshape(-1), state.terminal.reshape(-1)
    shape = jnp.broadcast_shapes(node.shape, chars.shape[:-1])
    row = jnp.arange(B).reshape((B,) + (1,) * (len(shape) - 1))
    node, sep = jnp.broadcast_to(node, shape), jnp.broadcast_to(sep, shape)

    def child(n, e):  # flat gathers: row b's node n, edge e
        got = children[(row * N + jnp.clip(n, 0, N - 1)) * E + jnp.clip(e, 0, E - 1)]
        return jnp.where(n >= 0, got, _NONE)

    def step(carry, c):
        node, sep, ok = carry
        dig = (c >= 0) & (c <= 9)
        is_sep = (c == DOT) | (c == COMMA)
        innum = node >= 0
        ending = innum & ((c == OTHER) | (is_sep & (sep != 0)))
        ok = ok & (~ending | terminal[row * N + jnp.clip(node, 0, N - 1)])
        base = jnp.where(innum, jnp.where(sep == DOT, child(node, DOT), node), 0)
        nxt = child(base, c)
        ok = ok & (~dig | (nxt >= 0))
        node = jnp.where(dig, nxt, jnp.where(ending, _NONE, node))
        sep = jnp.where(dig | ending, 0, jnp.where(is_sep & innum, c, sep))
        return (node, sep, ok), None

    cols = jnp.moveaxis(jnp.broadcast_to(chars, shape + chars.shape[-1:]), -1, 0)
    (node, sep, ok), _ = lax.scan(step, (node, sep, jnp.ones(shape, bool)), cols, unroll=True)
    # A token may not leave a separator pending where the number can neither go on nor end.
    pending = (node >= 0) & (sep != 0)
    return node, sep, ok & (~pending | _viable(state, node, sep, row))


def _viable(state: GroundingState, node, sep, row=None):
    """Whether a number at `node` with separator `sep` pending can still be completed or ended."""
    B, N, E = state.children.shape
    if row is None:
        row = jnp.arange(B).reshape((B,) + (1,) * (node.ndim - 1))
    base = (row * N + jnp.clip(node, 0, N - 1)) * E
    kids = state.children.reshape(-1)[base[..., None] + jnp.arange(E)] >= 0  # [..., E]
    term = state.terminal.reshape(-1)[row * N + jnp.clip(node, 0, N - 1)]
    return term | jnp.where(sep == DOT, kids[..., DOT], jnp.any(kids[..., :DOT], axis=-1))


def _init(policy: CompiledGrounding, batch: int) -> GroundingState:
    children, terminal = build_trie(())
    return GroundingState(
        children=jnp.broadcast_to(jnp.asarray(children), (batch,) + children.shape),
        terminal=jnp.broadcast_to(jnp.asarray(terminal), (batch,) + terminal.shape),
        node=jnp.full((batch,), _NONE, jnp.int32), sep=jnp.zeros((batch,), jnp.int32),
        enabled=jnp.zeros((batch,), bool))


def _evaluate(policy: CompiledGrounding, state: GroundingState, logits: Float[Array, "B V"], *, vocab: int) -> Decision:
    B, n = logits.shape
    innum = state.node >= 0
    N = state.terminal.shape[1]
    closed = jnp.take_along_axis(state.terminal, jnp.clip(state.node, 0, N - 1)[:, None], axis=1)[:, 0] & innum
    open_ = innum & ~closed  # a number is being written and may not end yet

    def inside(_):
        ends = policy.kills[None, :] | ((state.sep != 0)[:, None] & policy.lone_sep[None, :])
        mask = ~(open_[:, None] & ends)
        # a lone separator opens a pending one: only where the number can go on after it (or end before it)
        fresh = innum & (state.sep == 0)
        via_dot = _viable(state, state.node, jnp.full((B,), DOT))
        via_comma = _viable(state, state.node, jnp.full((B,), COMMA))
        lone_ok = jnp.where(policy.head[None, :, 0] == DOT, via_dot[:, None], via_comma[:, None])
        return mask & (~(fresh[:, None] & policy.lone_sep[None, :]) | lone_ok)

    # outside a number only tokens with digits can be inadmissible: the [B, V] part is needed only inside one
    mask = lax.cond(jnp.any(innum & state.enabled), inside, lambda _: jnp.ones((B, vocab), bool), None)
    # tokens with digits: walk each through the row's trie
    _, _, ok = _walk(state, state.node[:, None], state.sep[:, None], policy.digit_chars[None])
    mask = mask.at[:, policy.digit_tokens].set(ok)
    mask = mask | ~state.enabled[:, None]
    if n > vocab:
        mask = jnp.pad(mask, ((0, 0), (0, n - vocab)), constant_values=True)
    # for the audit: the rule blocked the model's own top token (ops.argmax, as the loop's: XLA computes it once)
    top = ops.argmax(logits)
    blocked = ~mask[jnp.arange(B), top]
    return Decision(
        mask=mask, verdict=jnp.full((B,), Verdict.ADMIT, jnp.int32), rule=jnp.full((B,), NO_RULE, jnp.int32),
        confidence=jnp.ones((B,), jnp.float32), forced=jnp.full((B,), NO_TOKEN, jnp.int32),
        stop=jnp.zeros((B,), bool), block_rule=jnp.where(blocked, policy.rule, NO_RULE))


def _token_chars(policy: CompiledGrounding, token: Int[Array, " B"]) -> Int[Array, "B L"]:
    V = policy.digit_index.shape[0]
    t = jnp.clip(token, 0, V - 1)
    di = policy.digit_index[t]
    L = policy.digit_chars.shape[1]
    head = jnp.pad(policy.head[t], ((0, 0), (0, L - 2)), constant_values=-1)
    return jnp.where((di >= 0)[:, None], policy.digit_chars[jnp.maximum(di, 0)], head)


def _check(policy: CompiledGrounding, state: GroundingState, token: Int[Array, " B"]) -> Outcome:
    del policy, state
    return Outcome.unchanged(token)


def _advance(policy: CompiledGrounding, state: GroundingState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
             seen: Int[Array, " B"] | None = None) -> GroundingState:
    del seen
    node, sep, ok = _walk(state, state.node, state.sep, _token_chars(policy, token))
    # a token forced past the mask (another gate's message) that breaks a figure: resume outside a number
    node = jnp.where(ok, node, _NONE)
    sep = jnp.where(ok, sep, 0)
    new = state.replace(node=node.astype(jnp.int32), sep=sep.astype(jnp.int32))
    return keep_rows(emitted, new, state)


@functools.cache
def grounding_gate(vocab_size: int) -> Gate:
    """The grounding gate (cached per vocabulary). Policy: `CompiledGrounding`; state: `GroundingState`, whose
    trie `begin_turn` sets per row from that request's evidence."""
    return Gate(init=_init, evaluate=functools.partial(_evaluate, vocab=vocab_size), check=_check,
                advance=_advance)


def begin_turn(state: GroundingState, tries: list[tuple[np.ndarray, np.ndarray] | None]) -> GroundingState:
    """The state at the start of a turn: row i gets trie `tries[i]` (None: the gate is off for the row).

    The tries are padded to one node count (a power of two), so the batch has one shape.
    """
    B = len(tries)
    N = max([c.shape[0] for c, _ in (t for t in tries if t is not None)] + [state.terminal.shape[1]])
    children = np.full((B, N, _EDGES), _NONE, np.int32)
    terminal = np.zeros((B, N), bool)
    for i, t in enumerate(tries):
        if t is not None:
            children[i, : t[0].shape[0]] = t[0]
            terminal[i, : t[1].shape[0]] = t[1]
    return GroundingState(children=jnp.asarray(children), terminal=jnp.asarray(terminal),
                          node=jnp.full((B,), _NONE, jnp.int32), sep=jnp.zeros((B,), jnp.int32),
                          enabled=jnp.asarray([t is not None for t in tries]))


def bench_build(text: str, reps: int = 20) -> float:
    """Milliseconds to build the trie of `text` (best of `reps`)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        build_trie([text])
        best = min(best, time.perf_counter() - t0)
    return best * 1e3
