"""The phrase gate: banned phrases never appear in the decoded text, wherever the token boundaries fall.

Phrases are matched on normalized text (`gate.normalize`). The compiler builds an Aho–Corasick automaton over
the normalized characters of the phrases and expresses every vocabulary token as its sequence of character
classes, so the gate's per-row state is one automaton state and its per-step cost does not depend on the
number of phrases:

* SUPPRESS phrases are masked before sampling. Token t is inadmissible in state s iff the text after t contains
  a phrase occurrence that ends inside t. Such an occurrence either lies wholly inside t (then the automaton
  finds it from the root: one static set, row 0 of the table), or starts in the context: its context part is
  a suffix of the context that is a phrase prefix, i.e. a state v on s's failure chain, and the rest
  r = phrase[depth(v):] is a prefix of t's normalized text. With the tokens sorted by normalized text, "t
  starts with r" is a contiguous range, so each state's banned set D(v) is a union of ranges, and
  banned(s) = D(s) | banned(fail(s)). States whose D is empty share their failure state's row, so the
  table holds one packed bitmask per distinct banned set (`mask_row` -> `suppress_bits`), not one per state.
* SUBSTITUTE and REFUSE phrases are not masked: `check` walks the sampled token through the automaton and,
  if such a rule fires inside it, emits the first token of the rule's message instead (the whole token is
  replaced; what was already emitted of the phrase stays). The state then queues the rest of the message
  (`forced_rule`, `forced_pos`); `evaluate` forces it token by token, and `check` of a refusal's last
  message token stops the row (verdict REFUSE). The queue is empty again afterwards, so a carried state
  starts the next turn clean. The automaton reads the message's characters like any text, so it stays
  an exact summary of the output, but no rule fires while a message is being emitted (a marker cannot
  re-trigger the gate). The compiler rejects a message that could complete a suppressed phrase from any
  state, which keeps the guarantee "no suppressed phrase in the output" through substitutions.

Limitations: a token whose bytes are not valid UTF-8 on their own (part of a multi-byte character) reads each
undecodable byte as a character outside every phrase ("other"), so a phrase containing a character the model
spells in byte pieces is not matched across those pieces, and a skipped character so spelled (e.g. an em dash
split in bytes) separates letters instead of vanishing. Special tokens contribute no characters. Tokens forced
by another gate bypass this gate's mask. With `skip_separators` word boundaries vanish: "the rapist" also
matches "therapist".
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import time
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from aqjax import ops
from gate.core import (
    NO_RULE,
    NO_TOKEN,
    Action,
    Checked,
    Decision,
    Gate,
    Outcome,
    Verdict,
    keep_rows,
    pack_bits,
    unpack_bits,
)
from gate.normalize import Normalization

__all__ = [
    "CompiledPhrases",
    "PhraseError",
    "PhraseRule",
    "PhraseState",
    "bench",
    "compile_phrases",
    "contains_banned",
    "phrase_gate",
]

OTHER = 0  # the class of every character that occurs in no phrase
_PAD = -1  # tok_chars / messages padding
_ACTIONS = (Action.REFUSE, Action.SUBSTITUTE, Action.SUPPRESS)  # priority order, highest first


class PhraseError(ValueError):
    """A phrase rule cannot be compiled (empty phrase, missing message, unsupported action, ...)."""


@dataclasses.dataclass(frozen=True)
class PhraseRule:
    """One banned phrase.

    Attributes:
      phrase: the phrase (normalized before matching).
      action: SUPPRESS (mask), SUBSTITUTE (emit `message` instead) or REFUSE (emit `message`, end the turn).
      rule_id: the policy's global rule id, reported when the rule fires.
      message: the substitution marker or refusal text (required for SUBSTITUTE / REFUSE, ignored otherwise).
    """

    phrase: str
    action: Action
    rule_id: int
    message: str | None = None


@struct.dataclass
class CompiledPhrases:
    """The compiled phrase policy (arrays only; shapes are bucketed to powers of two).

    Attributes:
      goto: Int[S, C] automaton transitions (state, character class) -> state; state 0 is the root.
      out_rule: Int[S] local index of the highest-priority SUBSTITUTE / REFUSE rule matched on reaching the
        state (its own phrases and those on its failure chain), -1 when none.
      out_suppress: Int[S] likewise the first SUPPRESS rule matched (names the rule behind a masked token).
      mask_row: Int[S] row of `suppress_bits` holding the state's banned tokens.
      suppress_bits: UInt32[U, W] packed banned-token sets (bit j of word w = token 32 w + j).
      tok_chars: Int[V, L] each token's normalized character classes, padded with -1.
      rule_id: Int[R] global rule id of each local rule (local order = priority order).
      rule_action: Int[R] the rule's Action.
      messages: Int[R, M] the rule's message tokens, padded with -1.
      message_len: Int[R] number of message tokens (0 for SUPPRESS rules).
    """

    goto: Int[Array, "S C"]
    out_rule: Int[Array, " S"]
    out_suppress: Int[Array, " S"]
    mask_row: Int[Array, " S"]
    suppress_bits: UInt32[Array, "U W"]
    tok_chars: Int[Array, "V L"]
    rule_id: Int[Array, " R"]
    rule_action: Int[Array, " R"]
    messages: Int[Array, "R M"]
    message_len: Int[Array, " R"]

    @property
    def nbytes(self) -> int:
        """Total size of the tables in bytes."""
        return sum(int(x.nbytes) for x in jax.tree.leaves(self))


@struct.dataclass
class PhraseState:
    """Per-row phrase-gate state (leading axis B); it survives chunk boundaries and turns.

    Attributes:
      ac: Int[B] automaton state after the text emitted so far.
      forced_rule: Int[B] local rule whose message is being emitted, -1 when none.
      forced_pos: Int[B] index of the next message token to emit.
    """

    ac: Int[Array, " B"]
    forced_rule: Int[Array, " B"]
    forced_pos: Int[Array, " B"]


# --------------------------------------------------------------------------------------------- host compiler


def contains_banned(text: str, phrases: Sequence[str], normalization: Normalization) -> bool:
    """Reference check (no automaton): does the normalized text contain any normalized phrase?"""
    norm = normalization.normalize(text)
    return any((p := normalization.normalize(q)) and p in norm for q in phrases)


def _bucket(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class _Host:
    """Host-side compile products (numpy), plus what tests and error messages need."""

    tables: dict
    alphabet: str  # class k (k >= 1) is alphabet[k - 1]
    state_text: list[str]  # normalized text of each trie state
    rules: list[PhraseRule]  # in local (priority) order


def _token_classes(token_bytes, special_ids, norm, cls_of) -> list[tuple[int, ...]]:
    per_char: dict[str, tuple[int, ...]] = {}
    out = []
    for i, b in enumerate(token_bytes):
        if i in special_ids:
            out.append(())
            continue
        seq: list[int] = []
        # Undecodable bytes become lone surrogates, read as one "other" character each.
        for ch in b.decode("utf-8", "surrogateescape"):
            c = per_char.get(ch)
            if c is None:
                if "\udc80" <= ch <= "\udcff":
                    c = (OTHER,)
                else:
                    c = tuple(cls_of.get(x, OTHER) for x in norm.char_class(ch))
                per_char[ch] = c
            # Runs of "other" are kept (they could be merged): the table width then depends only on the
            # vocabulary and the normalization, not on the phrases, so policies share a shape bucket.
            seq.extend(c)
        out.append(tuple(seq))
    return out


def _key(seq) -> bytes:
    # Big-endian 16-bit classes: byte order = lexicographic order of the class sequences.
    return np.asarray(seq, ">u2").tobytes()


def _walk_np(goto, start, chars):
    """Feeds class rows [N, L] from states [N]; returns the states after each step, [L, N]."""
    s = start.copy()
    trail = []
    for j in range(chars.shape[1]):
        c = chars[:, j]
        s = np.where(c >= 0, goto[s, np.maximum(c, 0)], s)
        trail.append(s)
    return np.stack(trail) if trail else np.zeros((0, len(s)), np.int32)


def _validate(rules, normalization) -> tuple[list[PhraseRule], list[str]]:
    """Checks the rules; returns them in local (priority) order with their normalized phrases."""
    for r in rules:
        if not isinstance(r, PhraseRule):
            raise PhraseError(f"expected PhraseRule, got {type(r).__name__}")
        if r.action not in _ACTIONS:
            name = Action(r.action).name if r.action in Action._value2member_map_ else repr(r.action)
            raise PhraseError(f"phrase {r.phrase!r}: action {name} is not supported by the phrase gate "
                              "(SUPPRESS, SUBSTITUTE or REFUSE)")
        if r.action != Action.SUPPRESS and not r.message:
            raise PhraseError(f"phrase {r.phrase!r}: {Action(r.action).name} needs a message")
    # Local order = priority order, so the best rule matched anywhere is the smallest local index.
    rules = sorted(rules, key=lambda r: _ACTIONS.index(r.action))
    phrases = [normalization.normalize(r.phrase) for r in rules]
    for r, p in zip(rules, phrases, strict=True):
        if not p:
            raise PhraseError(f"phrase {r.phrase!r} is empty after normalization")
    return rules, phrases


@dataclasses.dataclass
class _Trie:
    """The Aho–Corasick automaton on the host. Node 0 is the root; `order` is breadth-first."""

    goto: np.ndarray  # [S, C] dense transitions (padded states stay at the root)
    fail: np.ndarray  # [n] failure links
    order: list[int]
    best: np.ndarray  # [n] best (smallest local index) rule over the node's failure chain; R = none
    sup: np.ndarray  # [n] a suppress rule over the failure chain; -1 = none
    paths: list[list[int]]  # per phrase, the nodes of its prefixes (depth 0..len)
    text: list[str]  # per node, its normalized text


def _automaton(pcls: list[tuple[int, ...]], rules: list[PhraseRule], alphabet: str) -> _Trie:
    R = len(rules)
    children: list[dict[int, int]] = [{}]
    text, best, sup, paths = [""], [R], [-1], []
    for i, pc in enumerate(pcls):
        node, path = 0, [0]
        for c in pc:
            if c not in children[node]:
                children[node][c] = len(children)
                children.append({})
                text.append(text[node] + alphabet[c - 1])
                best.append(R)
                sup.append(-1)
            node = children[node][c]
            path.append(node)
        best[node] = min(best[node], i)
        if rules[i].action == Action.SUPPRESS and sup[node] < 0:
            sup[node] = i
        paths.append(path)
    n = len(children)
    goto = np.zeros((_bucket(n, 16), _bucket(len(alphabet) + 1, 8)), np.int32)
    fail = np.zeros(n, np.int64)
    best, sup = np.array(best, np.int64), np.array(sup, np.int64)
    order = [0]
    for c, child in children[0].items():
        goto[0, c] = child
    # Breadth-first, so a node's failure state (shallower) is complete before the node inherits from it.
    queue = deque(children[0].values())
    while queue:
        s = queue.popleft()
        order.append(s)
        f = fail[s]
        best[s] = min(best[s], best[f])
        if sup[s] < 0:
            sup[s] = sup[f]
        goto[s] = goto[f]
        for c, child in children[s].items():
            goto[s, c] = child
            fail[child] = goto[f, c] if s else 0
            queue.append(child)
    return _Trie(goto=goto, fail=fail, order=order, best=best, sup=sup, paths=paths, text=text)


def _suppress_rows(trie: _Trie, pcls, rules, tcls, tok_chars) -> tuple[np.ndarray, np.ndarray]:
    """Per-state banned tokens as (mask_row [S], suppress_bits [U, W]); see the module docstring."""
    V = tok_chars.shape[0]
    W = -(-V // 32)
    S = trie.goto.shape[0]
    n = len(trie.text)
    # (a) tokens that hold a suppressed phrase on their own: walk every token from the root.
    has_sup = np.zeros(S, bool)
    has_sup[:n] = trie.sup >= 0
    trail = _walk_np(trie.goto, np.zeros(V, np.int32), tok_chars)
    alone = (has_sup[trail] & (tok_chars.T >= 0)).any(0)

    # (b) per node v: tokens starting with the rest r = phrase[depth(v):] of a suppressed phrase through v,
    # a range in the tokens sorted by class sequence.
    keys = [_key(seq) for seq in tcls]
    sorted_ids = np.array(sorted(range(V), key=keys.__getitem__), np.int64)
    sorted_keys = [keys[t] for t in sorted_ids]
    rank = np.empty(V, np.int64)
    rank[sorted_ids] = np.arange(V)
    spans: dict[int, list[tuple[int, int]]] = {}
    for i, pc in enumerate(pcls):
        if rules[i].action != Action.SUPPRESS:
            continue
        for d in range(1, len(pc)):
            rest = pc[d:]
            lo = bisect.bisect_left(sorted_keys, _key(rest))
            hi = bisect.bisect_left(sorted_keys, _key(rest[:-1] + (rest[-1] + 1,)), lo)
            if lo < hi:
                spans.setdefault(trie.paths[i][d], []).append((lo, hi))
    d_nodes = sorted(spans)
    d_bits = np.zeros((len(d_nodes), W), np.uint32)
    chunk = 128  # bounds the [chunk, V] difference arrays
    for k0 in range(0, len(d_nodes), chunk):
        nodes = d_nodes[k0 : k0 + chunk]
        rows = np.array([k for k, v in enumerate(nodes) for _ in spans[v]], np.int64)
        lo = np.array([a for v in nodes for a, _ in spans[v]], np.int64)
        hi = np.array([b for v in nodes for _, b in spans[v]], np.int64)
        diff = np.zeros((len(nodes), V + 1), np.int32)
        np.add.at(diff, (rows, lo), 1)
        np.add.at(diff, (rows, hi), -1)
        in_sorted = np.cumsum(diff[:, :V], axis=1) > 0
        d_bits[k0 : k0 + len(nodes)] = pack_bits(in_sorted[:, rank])

    # banned(s) = D(s) | banned(fail(s)), banned(root) = (a): most states have an empty D and share their
    # failure state's row; identical sets share one row too.
    d_index = {v: k for k, v in enumerate(d_nodes)}
    rows_list = [pack_bits(alone)]
    row_of = {rows_list[0].tobytes(): 0}
    mask_row = np.zeros(S, np.int32)
    for s in trie.order[1:]:
        parent = mask_row[trie.fail[s]]
        k = d_index.get(s)
        if k is None:
            mask_row[s] = parent
            continue
        row = rows_list[parent] | d_bits[k]
        mask_row[s] = row_of.setdefault(row.tobytes(), len(rows_list))
        if mask_row[s] == len(rows_list):
            rows_list.append(row)
    suppress_bits = np.zeros((_bucket(len(rows_list)), W), np.uint32)
    suppress_bits[: len(rows_list)] = np.stack(rows_list)
    return mask_row, suppress_bits


def _message_tables(trie: _Trie, rules, encode, tok_chars) -> tuple[np.ndarray, np.ndarray]:
    """Tokenized messages [R, M] and lengths [R]; rejects a message that could complete a suppressed phrase."""
    V = tok_chars.shape[0]
    msgs = [encode(r.message) if r.action != Action.SUPPRESS else [] for r in rules]
    R, M = _bucket(len(rules)), _bucket(max(map(len, msgs), default=1))
    messages = np.full((R, M), _PAD, np.int32)
    message_len = np.zeros(R, np.int32)
    live = np.flatnonzero(trie.sup < 0)  # states on a suppressed phrase are never reached
    has_sup = trie.sup >= 0
    for i, (r, m) in enumerate(zip(rules, msgs, strict=True)):
        if r.action == Action.SUPPRESS:
            continue
        if not m:
            raise PhraseError(f"phrase {r.phrase!r}: message {r.message!r} encodes to no tokens")
        if any(not 0 <= t < V for t in m):
            raise PhraseError(f"phrase {r.phrase!r}: message token outside the vocabulary (size {V})")
        messages[i, : len(m)] = m
        message_len[i] = len(m)
        # Forced tokens bypass the mask, so the message must be safe after any text the gate lets through.
        chars = np.concatenate([tok_chars[t][tok_chars[t] >= 0] for t in m])
        trail = _walk_np(trie.goto, live.astype(np.int32), np.broadcast_to(chars, (len(live), len(chars))))
        hit = has_sup[trail] if len(trail) else np.zeros((0, len(live)), bool)
        if hit.any():
            step, j = np.argwhere(hit)[0]
            bad = rules[trie.sup[trail[step, j]]].phrase
            raise PhraseError(f"phrase {r.phrase!r}: message {r.message!r} can complete the suppressed phrase "
                              f"{bad!r} (after the text {trie.text[live[j]]!r})")
    return messages, message_len


def _compile_host(rules, token_bytes, special_ids, normalization, vocab_size, encode) -> _Host:
    rules, phrases = _validate(rules, normalization)
    alphabet = "".join(sorted(set("".join(phrases))))
    if len(alphabet) + 1 >= 0xFFFF:
        raise PhraseError(f"the phrases use {len(alphabet)} distinct characters (at most 65534)")
    cls_of = {ch: k + 1 for k, ch in enumerate(alphabet)}
    pcls = [tuple(cls_of[ch] for ch in p) for p in phrases]
    trie = _automaton(pcls, rules, alphabet)
    S, n, R = trie.goto.shape[0], len(trie.text), len(rules)

    actions = np.array([int(r.action) for r in rules] + [int(Action.SUPPRESS)], np.int64)
    out_rule = np.full(S, -1, np.int32)
    out_rule[:n] = np.where(actions[trie.best] != Action.SUPPRESS, trie.best, -1)
    out_suppress = np.full(S, -1, np.int32)
    out_suppress[:n] = trie.sup

    tcls = _token_classes(token_bytes, special_ids, normalization, cls_of)
    tcls += [()] * (vocab_size - len(tcls))
    tok_chars = np.full((vocab_size, _bucket(max(map(len, tcls), default=1), 4)), _PAD, np.int32)
    for t, seq in enumerate(tcls):
        tok_chars[t, : len(seq)] = seq

    mask_row, suppress_bits = _suppress_rows(trie, pcls, rules, tcls, tok_chars)
    messages, message_len = _message_tables(trie, rules, encode, tok_chars)
    rule_id = np.full(_bucket(R), NO_RULE, np.int32)
    rule_id[:R] = [r.rule_id for r in rules]
    rule_action = np.full(_bucket(R), int(Action.SUPPRESS), np.int32)
    rule_action[:R] = [int(r.action) for r in rules]
    tables = dict(goto=trie.goto, out_rule=out_rule, out_suppress=out_suppress, mask_row=mask_row,
                  suppress_bits=suppress_bits, tok_chars=tok_chars, rule_id=rule_id, rule_action=rule_action,
                  messages=messages, message_len=message_len)
    return _Host(tables=tables, alphabet=alphabet, state_text=trie.text, rules=rules)


def compile_phrases(
    rules: Sequence[PhraseRule], tokenizer, normalization: Normalization | None = None, *,
    vocab_size: int | None = None,
) -> CompiledPhrases:
    """Compiles phrase rules against a tokenizer's vocabulary (host side, numpy).

    Args:
      rules: the phrase rules (at least one).
      tokenizer: provides `token_bytes()`, `special_ids`, `vocab_size` and `encode(text, parse_special=...)`.
      normalization: how phrases and text are normalized (default: every normalization on).
      vocab_size: the logits width, when larger than the tokenizer's vocabulary (extra ids have no text).

    Returns:
      The policy arrays for `phrase_gate`.

    Raises:
      PhraseError: a rule is malformed; the message names the phrase.
    """
    rules = list(rules)
    normalization = Normalization() if normalization is None else normalization
    if not rules:
        raise PhraseError("no phrase rules")
    V = tokenizer.vocab_size if vocab_size is None else vocab_size
    if V < tokenizer.vocab_size:
        raise PhraseError(f"vocab_size {V} is smaller than the tokenizer's ({tokenizer.vocab_size})")
    host = _compile_host(rules, tokenizer.token_bytes(), frozenset(tokenizer.special_ids), normalization, V,
                         lambda text: tokenizer.encode(text, parse_special=False))
    return CompiledPhrases(**{k: jnp.asarray(v) for k, v in host.tables.items()})


# ------------------------------------------------------------------------------------------------- the gate

_NONE = jnp.iinfo(jnp.int32).max

# Character columns a walk always takes as plain (unrolled) steps, which XLA fuses into a few kernels; the columns
# past them are walked in a loop (a few kernel launches per column) that runs only as far as the batch's longest
# token. Most tokens have at most this many normalized characters.
_UNROLL = 4


def _feed_chars(step, carry, chars: Int[Array, "B L"], unroll: int = _UNROLL):
    """Feeds the character columns chars[:, j] to `step(carry, column) -> carry` in order.

    `step` must leave a row unchanged where its column is padding (< 0); columns from the batch's longest token on
    are then skipped: the first `unroll` as plain steps, the rest by a loop to that length (no iteration when no
    token of the batch is longer).
    """
    L = chars.shape[1]
    for j in range(min(unroll, L)):
        carry = step(carry, chars[:, j])
    if L > unroll:
        n = jnp.max(jnp.where(chars >= 0, jnp.arange(1, L + 1), 0))  # past the batch's last real character
        carry = lax.fori_loop(unroll, n, lambda j, c: step(c, lax.dynamic_index_in_dim(chars, j, 1, False)), carry)
    return carry


def _walk(policy: CompiledPhrases, ac: Int[Array, " B"], token: Int[Array, " B"], out: Int[Array, " S"]):
    """Feeds each row's token from state `ac`; returns the new state and the best rule of `out` met (-1 none)."""
    chars = policy.tok_chars[jnp.clip(token, 0, policy.tok_chars.shape[0] - 1)]
    C = policy.goto.shape[1]
    flat = policy.goto.reshape(-1)

    def step(carry, c):
        s, best = carry
        valid = c >= 0
        s = jnp.where(valid, flat[s * C + jnp.maximum(c, 0)], s)
        r = out[s]
        best = jnp.minimum(best, jnp.where(valid & (r >= 0), r, _NONE))
        return s, best

    s, best = _feed_chars(step, (ac, jnp.full_like(ac, _NONE)), chars)
    return s, jnp.where(best == _NONE, -1, best)


def _init(policy: CompiledPhrases, batch: int) -> PhraseState:
    return PhraseState(ac=jnp.zeros((batch,), jnp.int32), forced_rule=jnp.full((batch,), -1, jnp.int32),
                       forced_pos=jnp.zeros((batch,), jnp.int32))


def _evaluate(policy: CompiledPhrases, state: PhraseState, logits: Float[Array, "B V"], *, vocab: int) -> Decision:
    B = state.ac.shape[0]
    banned = unpack_bits(policy.suppress_bits[policy.mask_row[state.ac]], vocab)
    r = jnp.maximum(state.forced_rule, 0)
    in_msg = state.forced_rule >= 0
    pos = jnp.minimum(state.forced_pos, policy.messages.shape[1] - 1)
    refuse = in_msg & (policy.rule_action[r] == Action.REFUSE)
    # For the audit: the suppress rule the model's own top token would complete (the walk finds it exactly). The walk
    # meets a suppress rule exactly when the token is banned, so it is taken only when some row's top token is.
    top = ops.argmax(logits)
    top_banned = jnp.take_along_axis(banned, jnp.minimum(top, vocab - 1)[:, None], axis=1)[:, 0]
    hit = lax.cond(jnp.any(top_banned & ~in_msg), lambda: _walk(policy, state.ac, top, policy.out_suppress)[1],
                   lambda: jnp.full((B,), -1, jnp.int32))
    return Decision(
        mask=~banned,
        verdict=jnp.where(refuse, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(in_msg, policy.rule_id[r], NO_RULE),
        confidence=jnp.ones((B,), jnp.float32),
        forced=jnp.where(in_msg, policy.messages[r, pos], NO_TOKEN),
        stop=jnp.zeros((B,), bool),
        block_rule=jnp.where((hit >= 0) & ~in_msg, policy.rule_id[jnp.maximum(hit, 0)], NO_RULE),
    )


def _fired(policy: CompiledPhrases, state: PhraseState, token: Int[Array, " B"]):
    ac, fired = _walk(policy, state.ac, token, policy.out_rule)
    # No rule fires while a message is being emitted: the marker must not re-trigger the gate.
    return ac, jnp.where(state.forced_rule >= 0, -1, fired)


def _check(policy: CompiledPhrases, state: PhraseState, token: Int[Array, " B"]) -> Outcome:
    ac, fired = _fired(policy, state, token)
    in_msg = state.forced_rule >= 0
    r = jnp.where(in_msg, state.forced_rule, jnp.maximum(fired, 0))
    pos = jnp.where(in_msg, state.forced_pos, 0)  # index of the message token emitted now
    acts = in_msg | (fired >= 0)
    refuse = acts & (policy.rule_action[r] == Action.REFUSE)
    return Outcome(
        token=jnp.where(fired >= 0, policy.messages[r, 0], token),
        verdict=jnp.where(refuse, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(acts, policy.rule_id[r], NO_RULE),
        # A refusal ends the row right after its message's last token.
        stop=refuse & (pos + 1 >= policy.message_len[r]),
        seen=Checked(token=token, found=(ac, fired)),  # advance reuses the walk
    )


def _advance(
    policy: CompiledPhrases, state: PhraseState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
    seen: Int[Array, " B"] | Checked | None = None,
) -> PhraseState:
    # The automaton follows the emitted text (message tokens included); whether a message starts depends on
    # the token check saw. The walk over it is check's (its Checked record), or walked here when given a token;
    # the emitted token is walked again only when a later gate rewrote it.
    if isinstance(seen, Checked):
        seen, (ac, fired) = seen.token, seen.found
    else:
        seen = token if seen is None else seen
        ac, fired = _fired(policy, state, seen)
    ac = lax.cond(jnp.any(seen != token), lambda: _fired(policy, state, token)[0], lambda: ac)
    in_msg = state.forced_rule >= 0
    rule = jnp.where(in_msg, state.forced_rule, fired)
    pos = jnp.where(in_msg, state.forced_pos, 0) + 1  # message tokens emitted so far
    going = (rule >= 0) & (pos < policy.message_len[jnp.maximum(rule, 0)])
    new = PhraseState(ac=ac, forced_rule=jnp.where(going, rule, -1), forced_pos=jnp.where(going, pos, 0))
    return keep_rows(emitted, new, state)


@functools.cache
def phrase_gate(vocab_size: int) -> Gate:
    """The phrase gate for logits of width `vocab_size` (cached: the same object for the same size).

    Its policy is a `CompiledPhrases` (from `compile_phrases`) and its state a `PhraseState`. `advance` learns
    from `seen` (the token its `check` was given, or check's `Checked` record of it) whether a substitution or
    refusal started; `seen` defaults to the emitted token.
    """
    return Gate(
        init=_init,
        evaluate=functools.partial(_evaluate, vocab=vocab_size),
        check=_check,
        advance=_advance,
    )


# ------------------------------------------------------------------------------------------------ benchmark


def _demo_phrases(n: int, seed: int = 0) -> list[str]:
    """Deterministic pronounceable two-word phrases (plus a few real ones), for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    cons, vow = list("bcdfghjkmnprstvwz"), list("aeiou")

    def word():
        return "".join(rng.choice(cons) + rng.choice(vow) for _ in range(int(rng.integers(2, 4))))

    real = ["secret password", "credit card number", "social security number", "kill switch"]
    out, seen = list(real[:n]), set(real)
    while len(out) < n:
        p = f"{word()} {word()}"
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def bench(tokenizer, n_phrases: int = 1000, *, steps: int = 256, batches: Sequence[int] = (1, 32)) -> dict:
    """Measures compile time, table size and the per-step cost of evaluate + check + advance.

    The cost is measured inside one jitted `lax.scan` over `steps` fed tokens (what the decode loop pays),
    after a warm-up call, for each batch size; the mask is consumed so that XLA cannot drop it.

    Returns:
      {"n_phrases", "compile_s", "table_bytes", "shapes", "us_per_step": {B: µs}, "us_per_token": {B: µs}}.
    """
    rules = [PhraseRule(p, Action.SUPPRESS, i) for i, p in enumerate(_demo_phrases(n_phrases))]
    t0 = time.perf_counter()
    policy = compile_phrases(rules, tokenizer)
    compile_s = time.perf_counter() - t0
    V = tokenizer.vocab_size
    gate = phrase_gate(V)

    @jax.jit
    def run(policy, tokens):
        B = tokens.shape[1]
        logits = jnp.zeros((B, V), jnp.float32)

        def body(carry, tok):
            state, acc = carry
            d = gate.evaluate(policy, state, logits)
            o = gate.check(policy, state, tok)
            state = gate.advance(policy, state, o.token, jnp.ones((B,), bool), tok)
            # Consume the whole mask so that XLA cannot skip computing it.
            return (state, acc + d.mask.sum(-1)), None

        (state, acc), _ = lax.scan(body, (gate.init(policy, B), jnp.zeros((B,), jnp.int32)), tokens)
        return state.ac, acc

    rng = np.random.default_rng(0)
    us_step, us_token = {}, {}
    for B in batches:
        tokens = jnp.asarray(rng.integers(0, V, (steps, B)), jnp.int32)
        jax.block_until_ready(run(policy, tokens))
        times = []
        for _ in range(5):  # the best of five: the least disturbed by other work on the machine
            t0 = time.perf_counter()
            jax.block_until_ready(run(policy, tokens))
            times.append(time.perf_counter() - t0)
        us_step[B] = min(times) / steps * 1e6
        us_token[B] = us_step[B] / B
    return {
        "n_phrases": n_phrases,
        "compile_s": compile_s,
        "table_bytes": policy.nbytes,
        "shapes": {k: tuple(getattr(policy, k).shape) for k in CompiledPhrases.__dataclass_fields__},
        "us_per_step": us_step,
        "us_per_token": us_token,
    }
