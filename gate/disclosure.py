"""Disclosure control: a protected span is never repeated verbatim (under the phrase normalization) to a principal
without the clearance for its label, in this turn or any later turn of the session.

Spans come from the context: a document or tool result carries a classification label (`classification:` in
the policy); its protected spans are the ones the caller marks, or by default its figures (`gate.grounding
.NUMBER`). They are kept in the session state with their labels, so they stay protected after the document has
left the prompt. A span is *active* for a row when its label protects (`substitute` or `refuse`) and the row's
principal lacks the clearance.

Matching reads the output exactly as the phrase gate does (`gate.normalize`, each token's normalized characters
from `gate.phrases._token_classes`), but the set of spans differs per row and changes per session, so instead of
the phrase gate's shared Aho–Corasick tables the per-row state carries a bit-parallel Shift-And matcher over the
row's spans: one uint32 word per span, bit j = "the output ends with the first j + 1 normalized characters of
the span", updated per character c as match = ((match << 1) | 1) & mask[c], all spans at once; span i is complete
when bit len_i - 1 is set. mask[c] comes from a per-row table: a direct 128-entry table for ASCII characters and a
short list for the others. A span is matched on its first 32 normalized characters (`MAX_SPAN_CHARS`; stricter
for longer spans). The cost per token is a few [B, N] word operations per character, for as many characters as
the batch's longest token has, and there is no per-turn compilation.

Like the phrase gate's substitute and refuse rules, the gate does not mask: `check` walks the sampled token and,
if it would complete an active span, emits the first token of the label's message instead (the whole token is
replaced); the rest of the message is forced token by token, and a `refuse` label ends the turn after its
message. No rule fires while a message is being emitted. What was emitted before the completing token stays:
with `match_chars: N` a label protects a span by its first N normalized characters, which fires earlier (and
leaks less of a long span), at the cost of also firing on other text with that prefix. With grounding on, the
host also leaves an uncleared principal's protected figures out of its evidence, so the figure cannot even be
started (see `gate.session`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

from gate.core import NO_RULE, NO_TOKEN, Action, Checked, Decision, Gate, Outcome, Verdict, keep_rows
from gate.grounding import NUMBER
from gate.normalize import Normalization
from gate.phrases import _token_classes

__all__ = [
    "CompiledDisclosure",
    "DisclosureState",
    "begin_turn",
    "compile_disclosure",
    "default_spans",
    "disclosure_gate",
    "leaked",
]


class _CodePoints:
    """A stand-in for the phrase compiler's class map: every normalized character is its own code point."""

    @staticmethod
    def get(ch: str, default=None) -> int:
        del default
        return ord(ch)


def _bucket(n: int, least: int) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


MIN_SPAN_CHARS = 4  # shorter normalized spans would fire on ordinary words ("Q3" -> "3" -> "e" with lookalikes)
MAX_SPAN_CHARS = 32  # one uint32 word per span: longer spans are matched on their first 32 characters
MIN_FIGURE_DIGITS = 4


def default_spans(text: str) -> list[str]:
    """The protected spans of a labeled text when the caller marks none: its figures of at least
    MIN_FIGURE_DIGITS digits ("4,250,000", "2023"), as written."""
    figures = (m.group(0) for m in NUMBER.finditer(text))
    return list(dict.fromkeys(f for f in figures if sum(c.isdigit() for c in f) >= MIN_FIGURE_DIGITS))


def leaked(text: str, spans: Sequence[str], normalization: Normalization) -> list[str]:
    """Reference check (no automaton): the spans whose normalized text occurs in the normalized `text`."""
    norm = normalization.normalize(text)
    return [s for s in spans if (k := normalization.normalize(s)) and k in norm]


@struct.dataclass
class CompiledDisclosure:
    """The disclosure gate's policy (NL labels, V tokens).

    Attributes:
      tok_chars: Int[V, T] each token's normalized characters as code points, padded with -1.
      tok_len: Int[V] how many of them.
      label_rule: Int[NL] the global rule id of each label (NO_RULE for labels that protect nothing).
      label_action: Int[NL] Action.SUBSTITUTE or Action.REFUSE (Action.SUPPRESS for labels that protect nothing).
      messages: Int[NL, M] the label's message tokens, padded with -1; message_len: Int[NL].
    """

    tok_chars: Int[Array, "V T"]
    tok_len: Int[Array, " V"]
    label_rule: Int[Array, " NL"]
    label_action: Int[Array, " NL"]
    messages: Int[Array, "NL M"]
    message_len: Int[Array, " NL"]


@struct.dataclass
class DisclosureState:
    """Per-row disclosure state (leading axis B): the session's protected spans as a Shift-And matcher.

    Attributes:
      ascii_mask: UInt32[B, 128, N] bit j of [c, i]: span i has the ASCII character c at position j.
      other_chars: Int[B, K] the spans' other characters (code points, -1 pads); other_mask: UInt32[B, K, N].
      last: UInt32[B, N] the bit of each span's last character; 0 for an empty slot or a span not protected from
        this row's principal.
      span_label: Int[B, N] each span's label index.
      match: UInt32[B, N] the Shift-And state (see the module docstring).
      msg_label: Int[B] the label whose message is being emitted, -1 when none; msg_pos: Int[B] its next token.
    """

    ascii_mask: UInt32[Array, "B 128 N"]
    other_chars: Int[Array, "B K"]
    other_mask: UInt32[Array, "B K N"]
    last: UInt32[Array, "B N"]
    span_label: Int[Array, "B N"]
    match: UInt32[Array, "B N"]
    msg_label: Int[Array, " B"]
    msg_pos: Int[Array, " B"]


def compile_disclosure(policy, tokenizer, *, vocab_size: int | None = None, label_rules: Sequence[int],
                       normalization: Normalization | None = None) -> CompiledDisclosure:
    """Compiles the policy's labels and the vocabulary's normalized characters (host side)."""
    norm = policy.normalization if normalization is None else normalization
    tb = tokenizer.token_bytes()
    V = len(tb) if vocab_size is None else int(vocab_size)
    seqs = _token_classes(tb, frozenset(getattr(tokenizer, "special_ids", ())), norm, _CodePoints())
    seqs += [()] * (V - len(seqs))
    tok_chars = np.full((V, _bucket(max(map(len, seqs), default=1), 4)), -1, np.int32)
    tok_len = np.zeros(V, np.int32)
    for t, seq in enumerate(seqs):
        tok_chars[t, : len(seq)] = seq
        tok_len[t] = len(seq)
    NL = _bucket(len(policy.labels), 1)
    msgs = []
    action = np.full(NL, int(Action.SUPPRESS), np.int32)
    rule = np.full(NL, NO_RULE, np.int32)
    for i, lb in enumerate(policy.labels):
        if lb.action == "none":
            msgs.append([])
            continue
        action[i] = int(Action.SUBSTITUTE if lb.action == "substitute" else Action.REFUSE)
        rule[i] = label_rules[i]
        msgs.append(tokenizer.encode(policy.messages[lb.message], parse_special=False))
    messages = np.full((NL, _bucket(max(map(len, msgs), default=1), 8)), -1, np.int32)
    message_len = np.zeros(NL, np.int32)
    for i, m in enumerate(msgs):
        messages[i, : len(m)] = m
        message_len[i] = len(m)
    return CompiledDisclosure(tok_chars=jnp.asarray(tok_chars), tok_len=jnp.asarray(tok_len),
                              label_rule=jnp.asarray(rule), label_action=jnp.asarray(action),
                              messages=jnp.asarray(messages), message_len=jnp.asarray(message_len))


def _walk(policy: CompiledDisclosure, state: DisclosureState, token: Int[Array, " B"]):
    """Feeds each row's token; returns the new match state and the first protected span completed (-1 none).

    Every character's position masks are gathered at once; the Shift-And recurrence over the columns is then
    elementwise, so XLA fuses it into a few kernels (a loop over the columns costs kernel launches per column)."""
    t = jnp.clip(token, 0, policy.tok_chars.shape[0] - 1)
    chars, n = policy.tok_chars[t], policy.tok_len[t]  # [B, T], [B]
    B, N = state.match.shape
    K = state.other_chars.shape[1]
    rows = jnp.arange(B)[:, None]
    direct = state.ascii_mask[rows, jnp.clip(chars, 0, 127)]  # [B, T, N]
    # a character >= 128 is at most one of the row's other characters (begin_turn lists each once)
    k = jnp.max(jnp.where(state.other_chars[:, None, :] == chars[..., None], jnp.arange(K), -1), axis=-1)  # [B, T]
    other = jnp.where((k >= 0)[..., None], state.other_mask[rows, jnp.maximum(k, 0)], np.uint32(0))  # [B, T, N]
    positions = jnp.where(((chars >= 0) & (chars < 128))[..., None], direct, other)
    match, hit = state.match, jnp.zeros((B, N), bool)
    for j in range(chars.shape[1]):
        valid = (j < n)[:, None]
        match = jnp.where(valid, ((match << 1) | np.uint32(1)) & positions[:, j], match)
        hit = hit | (valid & ((match & state.last) != 0))
    first = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1)
    return match, first


def _fired(policy, state, token):
    match, first = _walk(policy, state, token)
    label = jnp.take_along_axis(state.span_label, jnp.maximum(first, 0)[:, None], axis=1)[:, 0]
    # no rule fires while a message is being emitted
    return match, jnp.where((first >= 0) & (state.msg_label < 0), label, -1)


def _init(policy: CompiledDisclosure, batch: int) -> DisclosureState:
    del policy
    return begin_turn([[]] * batch, Normalization())


def _evaluate(policy: CompiledDisclosure, state: DisclosureState, logits: Float[Array, "B V"]) -> Decision:
    B = state.msg_label.shape[0]
    in_msg = state.msg_label >= 0
    lb = jnp.maximum(state.msg_label, 0)
    pos = jnp.minimum(state.msg_pos, policy.messages.shape[1] - 1)
    refuse = in_msg & (policy.label_action[lb] == Action.REFUSE)
    return Decision(
        mask=jnp.ones(logits.shape, bool),
        verdict=jnp.where(refuse, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(in_msg, policy.label_rule[lb], NO_RULE),
        confidence=jnp.ones((B,), jnp.float32),
        forced=jnp.where(in_msg, policy.messages[lb, pos], NO_TOKEN),
        stop=jnp.zeros((B,), bool),
    )


def _check(policy: CompiledDisclosure, state: DisclosureState, token: Int[Array, " B"]) -> Outcome:
    match, fired = _fired(policy, state, token)
    in_msg = state.msg_label >= 0
    lb = jnp.where(in_msg, state.msg_label, jnp.maximum(fired, 0))
    pos = jnp.where(in_msg, state.msg_pos, 0)
    acts = in_msg | (fired >= 0)
    refuse = acts & (policy.label_action[lb] == Action.REFUSE)
    out = jnp.where(fired >= 0, policy.messages[lb, 0], token)
    mine = out == policy.messages[lb, jnp.minimum(pos, policy.messages.shape[1] - 1)]
    return Outcome(
        token=out,
        verdict=jnp.where(refuse, Verdict.REFUSE, Verdict.ADMIT).astype(jnp.int32),
        rule=jnp.where(acts, policy.label_rule[lb], NO_RULE),
        stop=refuse & mine & (pos + 1 >= policy.message_len[lb]),
        seen=Checked(token=token, found=(match, fired)),  # advance reuses the walk
    )


def _advance(policy: CompiledDisclosure, state: DisclosureState, token: Int[Array, " B"], emitted: Bool[Array, " B"],
             seen: Int[Array, " B"] | Checked | None = None) -> DisclosureState:
    # The matcher reads what was emitted (a message included); whether a message starts depends on what check saw.
    # The walk over that is check's (its Checked record), or walked here when given a token; the emitted token is
    # walked again only when a later gate rewrote it.
    if isinstance(seen, Checked):
        seen, (match, fired) = seen.token, seen.found
    else:
        seen = token if seen is None else seen
        match, fired = _fired(policy, state, seen)
    match = lax.cond(jnp.any(seen != token), lambda: _fired(policy, state, token)[0], lambda: match)
    in_msg = state.msg_label >= 0
    lb = jnp.where(in_msg, state.msg_label, fired)
    pos = jnp.where(in_msg, state.msg_pos, 0)
    # the message moves on only when its token was emitted (another gate's forced token may have won the step)
    pos = pos + (token == policy.messages[jnp.maximum(lb, 0), jnp.minimum(pos, policy.messages.shape[1] - 1)])
    going = (lb >= 0) & (pos < policy.message_len[jnp.maximum(lb, 0)])
    new = state.replace(match=match, msg_label=jnp.where(going, lb, -1), msg_pos=jnp.where(going, pos, 0))
    return keep_rows(emitted, new, state)


@functools.cache
def disclosure_gate(vocab_size: int) -> Gate:
    """The disclosure gate (cached per vocabulary). Policy: `CompiledDisclosure`; state: `DisclosureState`, whose
    spans `begin_turn` sets per row from the session's protected set."""
    del vocab_size  # the gate never masks
    return Gate(init=_init, evaluate=_evaluate, check=_check, advance=_advance)


def begin_turn(spans: Sequence[Sequence[tuple[int, str, bool]]], normalization: Normalization, *,
               min_spans: int = 8, min_other: int = 8, match_chars: Sequence[int] | None = None) -> DisclosureState:
    """The state at the start of a turn: row i protects spans[i] = [(label index, text, protected), ...].

    Each text is normalized and cut to the label's `match_chars` (when given per label) and to MAX_SPAN_CHARS;
    spans empty after normalization are dropped. Shapes are powers of two >= (min_spans, min_other), so turns
    share a compiled loop.
    """
    rows = []
    for row in spans:
        out = []
        for label, text, active in row:
            key = normalization.normalize(text)
            cut = match_chars[label] if match_chars is not None else 0
            key = (key[:cut] if cut else key)[:MAX_SPAN_CHARS]
            if key:
                out.append((label, key, active))
        rows.append(out)
    B = len(rows)
    N = _bucket(max([len(r) for r in rows] + [1]), min_spans)
    others = [sorted({c for _, k, _ in r for c in k if ord(c) >= 128}) for r in rows]
    K = _bucket(max([len(o) for o in others] + [1]), min_other)
    ascii_mask = np.zeros((B, 128, N), np.uint32)
    other_chars = np.full((B, K), -1, np.int32)
    other_mask = np.zeros((B, K, N), np.uint32)
    last = np.zeros((B, N), np.uint32)
    label = np.zeros((B, N), np.int32)
    for b, (r, oth) in enumerate(zip(rows, others, strict=True)):
        index = {c: k for k, c in enumerate(oth)}
        other_chars[b, : len(oth)] = [ord(c) for c in oth]
        for i, (lb, key, act) in enumerate(r):
            for j, ch in enumerate(key):
                if ord(ch) < 128:
                    ascii_mask[b, ord(ch), i] |= np.uint32(1 << j)
                else:
                    other_mask[b, index[ch], i] |= np.uint32(1 << j)
            label[b, i] = lb
            last[b, i] = np.uint32(1 << (len(key) - 1)) if act else 0
    return DisclosureState(ascii_mask=jnp.asarray(ascii_mask), other_chars=jnp.asarray(other_chars),
                           other_mask=jnp.asarray(other_mask), last=jnp.asarray(last), span_label=jnp.asarray(label),
                           match=jnp.zeros((B, N), jnp.uint32), msg_label=jnp.full((B,), -1, jnp.int32),
                           msg_pos=jnp.zeros((B,), jnp.int32))
