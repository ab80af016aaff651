"""Drafters for speculative decoding: pure functions over a carried per-row state, usable inside jit.

A `Drafter` is a NamedTuple of three functions (optax-shaped, like a `gate.core.Gate`) over the drafter's own
parameters `dparams` (a pytree passed into the compiled loop as an argument, () when there are none) and its
per-row state (a pytree with leading axis B):

  init(dparams, prompt[B, T], lengths[B], last[B], target_cache, last_h[B, D] | None) -> state
      after the target's prefill: the rows' prompts (right-padded), their lengths, the first sampled token
      (`last`, not yet in any cache), the target's prefilled cache and, for a drafter with `needs_hidden`, the
      target's final hidden state at the last prompt position (the one that produced `last`).
  propose(dparams, state, last[B], choose, carry, n_draft[B], *, k) -> (Proposal, carry, state)
      k draft tokens per row that continue the sequence after `last`. Model drafters draw each token through
      `choose(carry, j, logits[B, Vq], ids) -> (carry, token[B], col[B], q_logp[B, Vq], ok[B])`, supplied by
      the speculative loop: it applies the gate's mask at draft position j and the row's sampling
      filters, so the draft distribution q' is gated like the target's. Positions j >= n_draft[b] are not needed
      (a drafter may skip the work when no row needs them).
  commit(dparams, state, tokens[B, k + 1], n[B], hidden[B, k + 1, D]) -> state
      the first n[b] of `tokens` followed the old `last` into the output (the last of them is the new `last`);
      everything else the drafter assumed is rolled back. `hidden` are the target's final hidden states at the
      k + 1 verified positions (hidden[b, j] produced tokens[b, j]).

Five drafters:
  * `lookup_drafter`: prompt-lookup decoding. The state is the row's token history (prompt + output) in a
    buffer; the proposal is the continuation of the most recent earlier occurrence of the longest suffix
    n-gram (min_ngram <= n <= max_ngram). Deterministic: q is one-hot, no model runs. min_ngram defaults to 2:
    a single-token match is a poor guess (measured on the default model: 8% of its drafts accepted in open
    chat), and a step without a draft costs a plain step (`aqjax.speculative.verify_widths`), one with a draft
    a verification (1.39 plain steps for 4 drafts on a 2-core CPU).
  * `self_drafter`: early exit. The target's first n layers, its final norm and its output head, restricted
    to the first `head_vocab` token ids (BPE ids are roughly ordered by frequency, so the restricted head
    covers most text while costing a fraction of the full head's memory traffic: the full SmolLM2 head alone
    is a fifth of a decode step's bytes). No trained weights; its own KV cache of n layers starts as a copy
    of the target's prefilled one.
  * `model_drafter`: a small separate Llama (`DraftModel`, e.g. from `scripts/train_draft.py`) sharing the
    tokenizer and the target's embedding table, with its own vocabulary-subset head and KV cache.
  * `feature_drafter`: a draft head on the target's own features (after EAGLE, Li et al. 2024): from the
    target's final hidden state f at the position that produced `last` and the embedding of `last`, a small
    residual MLP predicts the next position's hidden state; the target's (vocabulary-subset) head turns it into
    draft logits; the prediction and the drafted token feed the next draft position. Its only state is f, which
    every verification replaces with the target's true hidden state, so nothing needs rolling back and it has no
    KV cache. Trained by `scripts/train_feature_drafter.py` on the target's own text.
  * `hybrid_drafter`: per row and step, prompt lookup where the row's suffix matches earlier text (its
    continuation, drafted deterministically), the feature head where nothing matches (a lookup step then pays
    for no draft forward).

Why a KV cache for the model drafters rather than recomputing a window: on CPU a draft step at batch 1 is
bound by reading its weights; a cached step reads them once for one token, whereas recomputing a window of W
tokens per draft token multiplies the attention and MLP work by W with no gain in quality. The cache costs
one rollback rule (`commit`) and one extra input token after a fully accepted window (the last draft token
was never fed to the drafter; it is fed as a second token on the next step's first forward).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from aqjax.cache import KVCache
from models.config import LlamaConfig
from models.llama import forward
from models.params import Params, per_layer


@struct.dataclass
class Proposal:
    """k draft tokens per row with their (gated, filtered) draft distributions.

    Attributes:
      tokens: Int[B, k] draft tokens.
      valid: Bool[B, k] positions actually proposed (a position after an invalid one is never accepted).
      q_logp: Float[B, k, Vq] log q' over the drafter's support, or None for a deterministic drafter (q one-hot).
      q_col: Int[B, k] column of each draft token in q_logp (None when q_logp is None).
      q_ids: Int[Vq] token id of each column of q_logp, or None when the columns are the vocabulary itself.
    """

    tokens: Int[Array, "B K"]
    valid: Bool[Array, "B K"]
    q_logp: Float[Array, "B K Vq"] | None = None
    q_col: Int[Array, "B K"] | None = None
    q_ids: Int[Array, " Vq"] | None = None


Choose = Callable[[Any, int, Float[Array, "B Vq"], Any], tuple]


class Drafter(NamedTuple):
    """A drafter (see the module docstring). Hashable: a static argument of the compiled loop."""

    init: Callable
    propose: Callable
    commit: Callable
    name: str
    deterministic: bool
    needs_hidden: bool = False
    adaptive: bool = False  # adaptive draft length by default (see aqjax.speculative)


# ------------------------------------------------------------------------------------------- prompt lookup


@struct.dataclass
class LookupState:
    """Attributes:
      buf: Int[B, S] the row's tokens so far (prompt, then every emitted token), -1 beyond `length`.
      length: Int[B] tokens in `buf` (the last one is the current `last`).
    """

    buf: Int[Array, "B S"]
    length: Int[Array, " B"]


def _lookup_init(dparams, prompt, lengths, last, target_cache, last_h=None) -> LookupState:
    del dparams, last_h
    history = jnp.pad(prompt, ((0, 0), (0, target_cache.max_len - prompt.shape[1])))
    return lookup_state(history, lengths, last[:, None], jnp.ones_like(lengths))


def _lookup_propose(dparams, state: LookupState, last, choose, carry, n_draft, *, k: int, max_ngram: int,
                    min_ngram: int = 1):
    del dparams, last, choose, n_draft
    buf, length = state.buf, state.length
    B, S = buf.shape
    pos = jnp.arange(S)[None, :]
    # run[b, e]: how many tokens ending at e equal the row's suffix ending at length - 1 (capped at max_ngram).
    run = jnp.zeros((B, S), jnp.int32)
    alive = jnp.ones((B, S), bool)
    for m in range(max_ngram):
        tail = jnp.take_along_axis(buf, jnp.maximum(length - 1 - m, 0)[:, None], axis=1)  # [B, 1]
        shifted = jnp.pad(buf, ((0, 0), (m, 0)), constant_values=-1)[:, :S]  # shifted[e] = buf[e - m]
        alive = alive & (shifted == tail) & (pos - m >= 0) & (length[:, None] - 1 - m >= 0)
        run = run + alive
    # A candidate needs at least one known token after it (e <= length - 2). Prefer the longest match, then the
    # most recent one (recent text predicts the next tokens best).
    cand = (pos <= length[:, None] - 2) & (run >= min_ngram)
    score = jnp.where(cand, run * S + pos, -1)
    best = jnp.max(score, axis=1)
    found = best >= 0
    e = jnp.where(found, best % S, 0)
    idx = e[:, None] + 1 + jnp.arange(k)[None, :]
    tokens = jnp.take_along_axis(buf, jnp.minimum(idx, S - 1), axis=1)
    valid = found[:, None] & (idx <= length[:, None] - 1)
    return Proposal(tokens=jnp.where(valid, tokens, 0), valid=valid), carry, state


def _lookup_commit(dparams, state: LookupState, tokens, n, hidden=None) -> LookupState:
    del dparams
    B, S = state.buf.shape
    K1 = tokens.shape[1]
    col = state.length[:, None] + jnp.arange(K1)[None, :]
    col = jnp.where(jnp.arange(K1)[None, :] < n[:, None], col, S)  # S = out of range: dropped
    buf = state.buf.at[jnp.arange(B)[:, None], col].set(tokens, mode="drop")
    return LookupState(buf=buf, length=jnp.minimum(state.length + n, S))


def lookup_state(history: Int[Array, "B S"], prompt_len: Int[Array, " B"], out: Int[Array, "B M"],
                 n_out: Int[Array, " B"]) -> LookupState:
    """The lookup drafter's state of rows already under way: their prompts (`history[b, :prompt_len[b]]`) followed
    by their outputs so far (`out[b, :n_out[b]]`, the last being the current `last`). What `_lookup_init` and
    every `_lookup_commit` since would have built; lets a loop that decodes without speculation for a while (the
    serving engine, under load) start speculating at any step."""
    B, S = history.shape
    M = out.shape[1]
    cols = jnp.arange(S)[None, :]
    j = cols - prompt_len[:, None]
    from_out = jnp.take_along_axis(out, jnp.clip(j, 0, M - 1), axis=1)
    buf = jnp.where(cols < prompt_len[:, None], history, jnp.where(j < n_out[:, None], from_out, -1))
    return LookupState(buf=buf.astype(jnp.int32), length=jnp.minimum(prompt_len + n_out, S).astype(jnp.int32))


@functools.cache
def lookup_drafter(max_ngram: int = 3, min_ngram: int = 2) -> Drafter:
    """Prompt-lookup drafter matching suffix n-grams of `min_ngram` to `max_ngram` tokens (its dparams are ())."""
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    return Drafter(init=_lookup_init, propose=functools.partial(_lookup_propose, max_ngram=max_ngram,
                                                                 min_ngram=min_ngram),
                   commit=_lookup_commit, name="lookup", deterministic=True)


# ---------------------------------------------------------------------------------------------- model drafters


@struct.dataclass
class ModelDraftState:
    """Attributes:
      cache: the drafter's KV cache (its own layers); lengths = positions valid for the current sequence.
      target_len: Int[B] tokens in the target's cache (the sequence before `last`).
      pending: Int[B] the token at position cache.lengths when the drafter is one token behind the target (after
        a fully accepted window the last draft token was never fed to it), else 0.
      has_pending: Bool[B].
    """

    cache: KVCache
    target_len: Int[Array, " B"]
    pending: Int[Array, " B"]
    has_pending: Bool[Array, " B"]


def _model_init(dparams, prompt, lengths, last, target_cache, last_h=None, *, cfg: LlamaConfig,
                share_prefix: bool):
    del last, last_h
    B = prompt.shape[0]
    if share_prefix:
        # The self drafter's layers are the target's first layers: their prefilled keys/values are identical.
        L = cfg.n_layers
        cache = KVCache(k=target_cache.k[:L], v=target_cache.v[:L], lengths=target_cache.lengths)
    else:
        cache = KVCache.init(cfg, B, target_cache.max_len, dparams["embed"].dtype)
        _, cache = forward(dparams["model"] | {"embed": dparams["embed"]}, prompt, cache, cfg=cfg, n_new=lengths)
    return ModelDraftState(cache=cache, target_len=lengths, pending=jnp.zeros((B,), jnp.int32),
                           has_pending=jnp.zeros((B,), bool))


def _head(dparams, h):
    return jnp.einsum("BD,DV->BV", h, dparams["head"], preferred_element_type=jnp.float32)


def _model_propose(dparams, state: ModelDraftState, last, choose, carry, n_draft, *, k: int, cfg: LlamaConfig):
    model = dparams["model"] | {"embed": dparams["embed"]}
    ids = dparams.get("vocab_ids")
    Vq = dparams["head"].shape[-1]

    def step(j, cache, tok):
        # Every draft forward takes two tokens (one traced forward for all steps): at step 0 the pending token (if
        # any) and `last`, ragged; later the previous draft token (the second slot is not kept).
        first = j == 0
        two = jnp.where(first, jnp.stack([jnp.where(state.has_pending, state.pending, last), last], axis=1),
                        jnp.stack([tok, tok], axis=1))
        n_new = jnp.where(first, 1 + state.has_pending.astype(jnp.int32), 1)
        h, cache = forward(model, two, cache, cfg=cfg, n_new=n_new)
        h = jnp.take_along_axis(h, (n_new - 1)[:, None, None], axis=1)[:, 0]
        return cache, _head(dparams, h)

    proposal, carry, cache = _draw_drafts(step, state.cache, last, choose, carry, n_draft, k=k, ids=ids, Vq=Vq)
    return proposal, carry, state.replace(cache=cache)


def _draw_drafts(step, x, last, choose, carry, n_draft, *, k: int, ids, Vq: int, min_confidence: float = 0.0):
    """The model drafters' draft loop: `step(j, x, token) -> (x, logits[B, Vq])` runs the drafter on the token
    at draft position j (`last` at j = 0, then the previous draft) and `choose` draws the next draft from its
    logits. Positions no row needs (adaptive draft length, token budget) are not run: a while loop up to the
    longest draft any row asked for (not a cond per position: XLA:CPU copies a conditional's operands, a draft
    cache here). Returns (Proposal, carry, x)."""
    B = last.shape[0]

    def run(c):
        j, carry, x, tok, toks, cols, q_logps, oks, conf = c
        x, logits = step(j, x, tok)
        carry, nxt, col, q_logp, ok = choose(carry, j, logits, ids)
        if min_confidence > 0:
            # The draft's own estimate that its whole prefix so far is accepted, the product of its top
            # probabilities: a row's draft ends where it falls below min_confidence, and the loop once no row's
            # goes on (fewer draft forwards, and a narrower verification).
            conf = conf * jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
            ok = ok & (conf >= min_confidence) & (j < n_draft)
            conf = jnp.where(ok, conf, 0.0)
        return (j + 1, carry, x, nxt, toks.at[j].set(nxt), cols.at[j].set(col), q_logps.at[j].set(q_logp),
                oks.at[j].set(ok), conf)

    def more(c):
        # up to the longest draft any row asked for (with a confidence floor: while some row's draft goes on)
        return (c[0] < jnp.max(n_draft)) & jnp.any(c[8] > 0)

    init = (jnp.zeros((), jnp.int32), carry, x, last, jnp.zeros((k, B), jnp.int32), jnp.zeros((k, B), jnp.int32),
            jnp.full((k, B, Vq), -jnp.inf, jnp.float32), jnp.zeros((k, B), bool), jnp.ones((B,), jnp.float32))
    _, carry, x, _, toks, cols, q_logps, oks, _ = jax.lax.while_loop(more, run, init)
    valid = oks.T & (jnp.arange(k)[None, :] < n_draft[:, None])
    proposal = Proposal(tokens=toks.T, valid=valid, q_logp=q_logps.transpose(1, 0, 2), q_col=cols.T, q_ids=ids)
    return proposal, carry, x


def _model_commit(dparams, state: ModelDraftState, tokens, n, hidden=None) -> ModelDraftState:
    del dparams, hidden
    tl = state.target_len
    # propose fed the drafter `last` and then its own drafts (fewer than k when steps were skipped): positions
    # tl .. tl + fed - 1. Those the target kept stay valid; when it kept one more (every fed draft accepted,
    # plus the next token), the drafter is one token behind and feeds that token first next time.
    fed = state.cache.lengths - tl
    before = tl - state.has_pending.astype(jnp.int32)
    lengths = jnp.where(n > 0, tl + jnp.minimum(n, fed), before)
    behind = (n > 0) & (n > fed)
    pending = jnp.take_along_axis(tokens, jnp.clip(fed - 1, 0, tokens.shape[1] - 1)[:, None], axis=1)[:, 0]
    return ModelDraftState(cache=state.cache.replace(lengths=lengths), target_len=tl + n,
                           pending=jnp.where(behind, pending, 0), has_pending=behind)


@functools.cache
def model_drafter(cfg: LlamaConfig, *, share_prefix: bool = False, name: str = "draft") -> Drafter:
    """A drafter running a Llama `cfg` (its layers) with a vocabulary-subset head; dparams from `DraftModel`.

    With `share_prefix` the drafter's layers are the target's first layers and its cache starts as a copy of the
    target's. Cached: the same arguments give the same Drafter (a static argument of the compiled loop).
    """
    return Drafter(
        init=functools.partial(_model_init, cfg=cfg, share_prefix=share_prefix),
        propose=functools.partial(_model_propose, cfg=cfg),
        commit=_model_commit,
        name=name,
        deterministic=False,
        adaptive=True,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class DraftModel:
    """A separate small draft model sharing the target's tokenizer and embedding table.

    Attributes:
      cfg: its config (vocab_size = the target's, d_model = the target's, fewer layers).
      params: {"layers", "final_norm"} in the packed compute layout (`models.params.pack_params`) and
        "head": Float[D, Vq] its output head over the token ids `vocab_ids`.
      vocab_ids: Int[Vq] the token ids the head predicts.
      meta: training record (time, data, acceptance), as saved by scripts/train_draft.py.
    """

    cfg: LlamaConfig
    params: Params
    vocab_ids: Any
    meta: dict = dataclasses.field(default_factory=dict)

    def dparams(self, target_params: Params) -> Params:
        """The drafter's dparams: its own weights plus the target's embedding table (shared, not copied)."""
        return {"model": {"layers": self.params["layers"], "final_norm": self.params["final_norm"]},
                "head": self.params["head"], "vocab_ids": jnp.asarray(self.vocab_ids, jnp.int32),
                "embed": target_params["embed"]}


def self_draft(target_params: Params, cfg: LlamaConfig, n_layers: int, head_vocab: int | None) -> DraftModel:
    """The early-exit drafter's weights: the target's first `n_layers` layers, final norm and (a slice of) head.

    Stacked layer slices are copied once here (slicing the stacked weights inside the compiled step would copy
    them at every draft step); per-layer ones (`models.params.unstack_layers`) are shared. `target_params` are
    in the packed compute layout.
    """
    if not 1 <= n_layers < cfg.n_layers:
        raise ValueError(f"self-speculation needs 1 <= n_layers < {cfg.n_layers}, got {n_layers}")
    V = cfg.vocab_size if head_vocab is None else min(int(head_vocab), cfg.vocab_size)
    ids = np.arange(V, dtype=np.int32)
    if cfg.tie_embeddings:
        head = jnp.asarray(target_params["embed"][:V]).T
    else:
        head = jnp.asarray(target_params["lm_head"][:, :V])
    if per_layer(target_params):  # per-layer buffers (`unstack_layers`): shared
        layers = list(target_params["layers"][:n_layers])
    else:
        layers = jax.tree.map(lambda x: jnp.array(x[:n_layers]), target_params["layers"])
    dcfg = dataclasses.replace(cfg, n_layers=n_layers, name=f"{cfg.name}-first{n_layers}")
    return DraftModel(cfg=dcfg, params={"layers": layers, "final_norm": target_params["final_norm"], "head": head},
                      vocab_ids=ids, meta={"kind": "self", "n_layers": n_layers, "head_vocab": V})


def random_draft(cfg: LlamaConfig, target_params: Params, key: jax.Array, *, n_layers: int = 2,
                 head_vocab: int | None = None) -> DraftModel:
    """An untrained draft model (random layers, head rows from the target's embeddings), for tests."""
    from models.params import init_params, pack_params

    dcfg = dataclasses.replace(cfg, n_layers=n_layers, name=f"{cfg.name}-draft{n_layers}")
    p = pack_params(init_params(dcfg, key), dcfg)
    V = cfg.vocab_size if head_vocab is None else min(int(head_vocab), cfg.vocab_size)
    ids = np.arange(V, dtype=np.int32)
    head = jnp.asarray(target_params["embed"])[ids].T
    return DraftModel(cfg=dcfg, params={"layers": p["layers"], "final_norm": p["final_norm"], "head": head},
                      vocab_ids=ids, meta={"kind": "random"})


# -------------------------------------------------------------------------------------- feature draft head


@struct.dataclass
class FeatureState:
    """Attributes:
      feat: Float[B, D] the target's final hidden state at the position that produced `last`.
    """

    feat: Float[Array, "B D"]


def _rms(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def feature_step(net: Params, feat: Float[Array, "... D"], emb: Float[Array, "... D"]) -> Float[Array, "... D"]:
    """One draft position of the feature drafter: the hidden state f that produced a token and that token's
    embedding -> the predicted hidden state of the token's own position (the one that produces the next token).

    net: {"w_in": [2D, D], "blocks": [{"norm": [D], "w1": [D, H], "w2": [H, D]}, ...], "out_norm": [D]}.
    Both inputs are RMS-normalized (the target's hidden states and embeddings differ in scale); the output is
    RMS-normalized and scaled like the target's final norm, so the target's head reads it as its own.
    """
    x = jnp.concatenate([_rms(feat), _rms(emb)], axis=-1)
    z = feat + jnp.dot(x, net["w_in"], preferred_element_type=jnp.float32)
    for blk in net["blocks"]:
        u = _rms(z) * blk["norm"]
        z = z + jnp.dot(jax.nn.silu(jnp.dot(u, blk["w1"], preferred_element_type=jnp.float32)), blk["w2"],
                        preferred_element_type=jnp.float32)
    return _rms(z) * net["out_norm"]


def _feature_init(dparams, prompt, lengths, last, target_cache, last_h=None) -> FeatureState:
    del dparams, prompt, lengths, last, target_cache
    if last_h is None:
        raise ValueError("the feature drafter needs the target's hidden state: start decoding with keep_hidden=True")
    return FeatureState(feat=last_h.astype(jnp.float32))


def _feature_propose(dparams, state: FeatureState, last, choose, carry, n_draft, *, k: int,
                     min_confidence: float = 0.0):
    net, head, ids, embed = dparams["net"], dparams["head"], dparams["vocab_ids"], dparams["embed"]

    def step(j, f, tok):
        f = feature_step(net, f, embed[tok].astype(jnp.float32))
        return f, jnp.dot(f, head, preferred_element_type=jnp.float32)

    proposal, carry, _ = _draw_drafts(step, state.feat, last, choose, carry, n_draft, k=k, ids=ids, Vq=head.shape[-1],
                                      min_confidence=min_confidence)
    return proposal, carry, state


def _feature_commit(dparams, state: FeatureState, tokens, n, hidden=None) -> FeatureState:
    del dparams, tokens
    # the new `last` was produced at verified position n - 1: the target's own hidden state there
    h = jnp.take_along_axis(hidden, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
    return FeatureState(feat=jnp.where((n > 0)[:, None], h.astype(jnp.float32), state.feat))


# Where a feature-head draft ends: measured at batch 1 on the default model (bench/speculative.py, greedy, k = 4),
# hybrid went from 1.58x / 1.11x plain decoding (grounded / chat) without a floor to 1.70x / 1.19x at 0.2, 1.66x /
# 1.18x at 0.4, 1.66x / 1.16x at 0.6: a draft the head itself doubts costs a wider verification and is rarely kept.
DRAFT_MIN_CONFIDENCE = 0.2


def _check_confidence(c: float) -> None:
    if not 0.0 <= c < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {c!r}")


@functools.cache
def feature_drafter(min_confidence: float = DRAFT_MIN_CONFIDENCE) -> Drafter:
    """The feature drafter (see the module docstring); dparams from `FeatureDraft.dparams`. A row's draft ends
    where the product of the head's top probabilities along it falls below `min_confidence` (0: never)."""
    _check_confidence(min_confidence)
    return Drafter(init=_feature_init, propose=functools.partial(_feature_propose, min_confidence=min_confidence),
                   commit=_feature_commit, name="feature", deterministic=False, needs_hidden=True, adaptive=True)


@struct.dataclass
class HybridState:
    lookup: LookupState
    feature: FeatureState


def _hybrid_init(dparams, prompt, lengths, last, target_cache, last_h=None) -> HybridState:
    return HybridState(lookup=_lookup_init(dparams, prompt, lengths, last, target_cache),
                       feature=_feature_init(dparams, prompt, lengths, last, target_cache, last_h))


def _hybrid_propose(dparams, state: HybridState, last, choose, carry, n_draft, *, k: int, max_ngram: int,
                    min_ngram: int, min_confidence: float = 0.0):
    look, _, _ = _lookup_propose((), state.lookup, last, None, None, n_draft, k=k, max_ngram=max_ngram,
                                 min_ngram=min_ngram)
    found = look.valid[:, 0]
    # rows with a match draft its continuation, the others the feature head (only they run it: a step where every
    # row matches costs no draft forward). q' spans the whole vocabulary: one-hot at a looked-up token (which
    # may lie outside the feature head's columns), the feature head's q' scattered to its token ids.
    prop, carry, feature = _feature_propose(dparams, state.feature, last, choose, carry,
                                            jnp.where(found, 0, n_draft), k=k, min_confidence=min_confidence)
    V = dparams["embed"].shape[0]
    ids = prop.q_ids
    q_feat = jnp.full(prop.q_logp.shape[:2] + (V,), -jnp.inf, jnp.float32).at[..., ids].set(prop.q_logp)
    q_look = jnp.where(jnp.arange(V) == look.tokens[..., None], 0.0, -jnp.inf)
    f = found[:, None]
    prop = Proposal(tokens=jnp.where(f, look.tokens, prop.tokens), valid=jnp.where(f, look.valid, prop.valid),
                    q_logp=jnp.where(f[..., None], q_look, q_feat),
                    q_col=jnp.where(f, look.tokens, ids[prop.q_col]), q_ids=None)
    return prop, carry, state.replace(feature=feature)


def _hybrid_commit(dparams, state: HybridState, tokens, n, hidden=None) -> HybridState:
    return HybridState(lookup=_lookup_commit(dparams, state.lookup, tokens, n),
                       feature=_feature_commit(dparams, state.feature, tokens, n, hidden))


@functools.cache
def hybrid_drafter(max_ngram: int = 3, min_ngram: int = 2, min_confidence: float = DRAFT_MIN_CONFIDENCE) -> Drafter:
    """Lookup where it matches (suffix n-grams of `min_ngram` to `max_ngram` tokens), the feature head elsewhere,
    its drafts ending at `min_confidence` as `feature_drafter`'s (module docstring); dparams from
    `FeatureDraft.dparams`."""
    _check_confidence(min_confidence)
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    return Drafter(init=_hybrid_init, propose=functools.partial(_hybrid_propose, max_ngram=max_ngram,
                                                                min_ngram=min_ngram, min_confidence=min_confidence),
                   commit=_hybrid_commit, name="hybrid", deterministic=False, needs_hidden=True)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureDraft:
    """A trained feature draft head (`scripts/train_feature_drafter.py`).

    Attributes:
      net: the `feature_step` weights.
      vocab_ids: Int[Vq] the token ids it drafts (the target's head restricted to them).
      d_model: the target's width it was trained for.
      meta: training record (data, time, accuracy), as saved by the training script.
    """

    net: Params
    vocab_ids: Any
    d_model: int
    meta: dict = dataclasses.field(default_factory=dict)

    def dparams(self, target_params: Params, cfg: LlamaConfig) -> Params:
        """The drafter's dparams: its weights, the target's head restricted to `vocab_ids` (one [D, Vq] copy)
        and the target's embedding table (shared)."""
        if cfg.d_model != self.d_model:
            raise ValueError(f"feature draft trained for width {self.d_model}, target has {cfg.d_model}")
        ids = jnp.asarray(self.vocab_ids, jnp.int32)
        if cfg.tie_embeddings:
            head = jnp.asarray(target_params["embed"])[ids].T
        else:
            head = jnp.asarray(target_params["lm_head"])[:, ids]
        return {"net": self.net, "head": head.astype(jnp.float32), "vocab_ids": ids, "embed": target_params["embed"]}


def init_feature_net(key: jax.Array, d_model: int, *, blocks: int = 2, hidden: int = 1536,
                     final_norm=None) -> Params:
    """Fresh `feature_step` weights: the residual branches start at zero, so an untrained net returns the
    (renormalized) input feature."""
    keys = jax.random.split(key, 2 * blocks + 1)
    D, H = d_model, hidden
    net = {"w_in": jax.random.normal(keys[0], (2 * D, D), jnp.float32) * (0.02 / np.sqrt(2)),
           "blocks": [{"norm": jnp.ones((D,), jnp.float32),
                       "w1": jax.random.normal(keys[1 + 2 * i], (D, H), jnp.float32) / np.sqrt(D),
                       "w2": jnp.zeros((H, D), jnp.float32)} for i in range(blocks)],
           "out_norm": jnp.ones((D,), jnp.float32) if final_norm is None else jnp.asarray(final_norm, jnp.float32)}
    return net


def random_feature_draft(cfg: LlamaConfig, key: jax.Array, *, blocks: int = 1, hidden: int = 64,
                         head_vocab: int | None = None) -> FeatureDraft:
    """An untrained feature draft (random weights, residual branches not zero), for tests."""
    k1, k2 = jax.random.split(key)
    net = init_feature_net(k1, cfg.d_model, blocks=blocks, hidden=hidden)
    for i, blk in enumerate(net["blocks"]):
        blk["w2"] = jax.random.normal(jax.random.fold_in(k2, i), blk["w2"].shape, jnp.float32) / np.sqrt(hidden)
    V = cfg.vocab_size if head_vocab is None else min(int(head_vocab), cfg.vocab_size)
    return FeatureDraft(net=net, vocab_ids=np.arange(V, dtype=np.int32), d_model=cfg.d_model, meta={"kind": "random"})


# ----------------------------------------------------------------------------------------------- checkpoints

DRAFT_MANIFEST = "aqjax_draft.json"
DRAFT_FORMAT = "aqjax-draft-v1"


def cache_path(target_cfg: LlamaConfig, prefix: str) -> pathlib.Path:
    """`<aqjax cache>/<prefix>-<the target's name, made safe for a file name>`."""
    from models.download import cache_dir

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in target_cfg.name)
    return cache_dir() / f"{prefix}-{safe}"


def default_draft_dir(target_cfg: LlamaConfig) -> pathlib.Path:
    """Where scripts/train_draft.py saves the draft for a target by default: `<aqjax cache>/draft-<name>`."""
    return cache_path(target_cfg, "draft")


def _save_tree(d: pathlib.Path, tree) -> None:
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(d, args=ocp.args.PyTreeSave(jax.tree.map(np.asarray, tree)))


def _restore_tree(d: pathlib.Path):
    """An orbax PyTree checkpoint as numpy arrays (whatever devices it was saved from)."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
        meta = ckptr.metadata(d)
        tree_meta = getattr(meta, "item_metadata", meta)
        tree_meta = getattr(tree_meta, "tree", tree_meta)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta,
                                    is_leaf=lambda x: hasattr(x, "shape"))
        return ckptr.restore(d, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _write_checkpoint(path, tree, manifest_name: str, manifest: dict, *, force: bool = True) -> pathlib.Path:
    """orbax weights under `path/params` and a JSON manifest beside them (a folder replaced when `force`)."""
    import shutil

    d = pathlib.Path(path).absolute()
    if d.exists() and force:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    _save_tree(d / "params", tree)
    (d / manifest_name).write_text(json.dumps(manifest, indent=1))
    return d


def _read_checkpoint(path, manifest_name: str, fmt: str, what: str, script: str,
                     target_cfg: LlamaConfig | None) -> tuple[pathlib.Path, dict, Any]:
    """(folder, manifest, weights) of a checkpoint written by `_write_checkpoint`; a clear error for a missing
    folder, another format, or a target of another vocabulary / width than `target_cfg` (when given)."""
    d = pathlib.Path(path).absolute()
    manifest_file = d / manifest_name
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{d}: no {what} here ({manifest_name} missing); train one with "
                                f"`python scripts/{script} --out {d}`")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != fmt:
        raise ValueError(f"{manifest_file}: format {manifest.get('format')!r}, expected {fmt!r}")
    if target_cfg is not None:
        t = manifest.get("target", {})
        if (t.get("vocab_size"), t.get("d_model")) != (target_cfg.vocab_size, target_cfg.d_model):
            raise ValueError(f"{d}: {what} was trained for a target with vocab {t.get('vocab_size')} and width "
                             f"{t.get('d_model')}, not {target_cfg.vocab_size} / {target_cfg.d_model}")
    return d, manifest, _restore_tree(d / "params")


def save_draft(path, draft: DraftModel, *, target_cfg: LlamaConfig, force: bool = True) -> pathlib.Path:
    """Saves a DraftModel with orbax (weights) and a JSON manifest (config, vocabulary subset, training record)."""
    manifest = {"format": DRAFT_FORMAT, "config": draft.cfg.to_dict(), "target": target_cfg.to_dict(),
                "head_vocab": int(len(draft.vocab_ids)), "meta": draft.meta}
    return _write_checkpoint(path, {"params": draft.params, "vocab_ids": np.asarray(draft.vocab_ids, np.int32)},
                             DRAFT_MANIFEST, manifest, force=force)


def load_draft(path, target_cfg: LlamaConfig | None = None) -> DraftModel:
    """Loads a draft saved by `save_draft`; checks that it was trained for `target_cfg` (when given)."""
    _, manifest, tree = _read_checkpoint(path, DRAFT_MANIFEST, DRAFT_FORMAT, "draft model", "train_draft.py",
                                         target_cfg)
    params = jax.tree.map(jnp.asarray, tree["params"])
    return DraftModel(cfg=LlamaConfig.from_dict(manifest["config"]), params=params,
                      vocab_ids=np.asarray(tree["vocab_ids"], np.int32), meta=manifest.get("meta", {}))


FEATURE_MANIFEST = "aqjax_feature_draft.json"
FEATURE_FORMAT = "aqjax-feature-draft-v1"


def default_feature_dir(target_cfg: LlamaConfig) -> pathlib.Path:
    """Where scripts/train_feature_drafter.py saves by default: `<aqjax cache>/feature-draft-<name>`."""
    return cache_path(target_cfg, "feature-draft")


def save_feature_draft(path, fd: FeatureDraft, *, target_cfg: LlamaConfig) -> pathlib.Path:
    """Saves a FeatureDraft with orbax (weights, vocabulary subset) and a JSON manifest (target, record)."""
    manifest = {"format": FEATURE_FORMAT, "target": target_cfg.to_dict(), "d_model": int(fd.d_model),
                "blocks": len(fd.net["blocks"]), "head_vocab": int(len(fd.vocab_ids)), "meta": fd.meta}
    return _write_checkpoint(path, {"net": fd.net, "vocab_ids": np.asarray(fd.vocab_ids, np.int32)},
                             FEATURE_MANIFEST, manifest)


def load_feature_draft(path, target_cfg: LlamaConfig | None = None) -> FeatureDraft:
    """Loads a FeatureDraft saved by `save_feature_draft`; checks the target it was trained for (when given)."""
    _, manifest, tree = _read_checkpoint(path, FEATURE_MANIFEST, FEATURE_FORMAT, "feature draft",
                                         "train_feature_drafter.py", target_cfg)
    net = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree["net"])
    if isinstance(net["blocks"], dict):  # a list saved by orbax may come back keyed "0", "1", ...
        net["blocks"] = [net["blocks"][key] for key in sorted(net["blocks"], key=int)]
    return FeatureDraft(net=net, vocab_ids=np.asarray(tree["vocab_ids"], np.int32), d_model=int(manifest["d_model"]),
                        meta=manifest.get("meta", {}))
