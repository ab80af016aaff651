"""A Llama-family decoder as pure functions over a params pytree (layout in `models/params.py`).

RMSNorm, rotary position embeddings (HF rotate-half convention, base `cfg.rope_theta`), grouped-query
attention over an explicit KV cache, SwiGLU MLP, tied or untied output head. The layers are stacked and
iterated with `lax.scan`, so compile time does not grow with depth.

One entry point serves prefill, decode and speculative verification: `forward` appends T tokens per row at
positions `cache.lengths[b] .. cache.lengths[b] + T - 1`, attends causally over the row's cache, and returns
the final hidden states. Rows may be ragged: tokens past a row's true length are written but later
overwritten, and `lengths` advances by `n_new` (default T) so they are never read.

Shape letters: B batch, T new tokens, S cache length, L layers, D model width, N query heads, K kv heads,
G = N // K queries per kv head, H head width, F MLP width, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from aqjax.cache import KVCache
from models.config import LlamaConfig
from models.params import Params, per_layer


def rms_norm(x: Float[Array, "... D"], w: Float[Array, "D"], eps: float) -> Float[Array, "... D"]:
    # Normalize in float32 whatever the storage dtype, as the reference implementations do.
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions: Int[Array, "B T"], head_dim: int, theta: float):
    """cos/sin tables [B, T, H/2] for the given absolute positions."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T ... H"], cos, sin) -> Float[Array, "B T ... H"]:
    # Rotate-half: dimension i pairs with i + H/2 within each head.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    extra = (None,) * (x.ndim - 3)
    c, s = cos[(slice(None), slice(None)) + extra], sin[(slice(None), slice(None)) + extra]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def _attention(q, k_cache, v_cache, bias, *, cfg: LlamaConfig):
    """Causal GQA attention of T queries per row over the row's cache (already holding the new keys).

    Args:
      q: Float[B, T, K, G, H] queries grouped by their kv head.
      k_cache: Float[B, K, H, S] this layer's keys; v_cache: Float[B, K, S, H] its values.
      bias: Float[B, 1, T*G, S] 0 where a query may attend, -1e30 elsewhere (later and stale positions).

    Returns:
      Float[B, T, K, G, H].
    """
    B, T, K, G, H = q.shape
    qg = _grouped_queries(q)  # the batched dims (B, K) lead in q and in the cache: XLA's dots read the cache as is
    scores = jnp.einsum("BKQH,BKHS->BKQS", qg, k_cache, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_cache, preferred_element_type=jnp.float32)
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).astype(q.dtype)


def _online_softmax(carry, s, vb, mask, *, maybe_blind: bool = True):
    """One block of an online-softmax attention: scores s [B, K, Q, S'] where `mask`, values vb [B, K, S', H].
    carry = (running max, running sum, running output). `maybe_blind`: a query may have seen nothing yet (its
    running max still -1e30), so masked scores must be zeroed explicitly rather than by exp underflow."""
    m, l, acc = carry
    s = jnp.where(mask, s, -1e30)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if maybe_blind:
        p = jnp.where(mask, p, 0.0)
    corr = jnp.exp(m - m_new)
    l = l * corr + jnp.sum(p, axis=-1)
    acc = acc * corr[..., None] + jnp.einsum("BKQS,BKSH->BKQH", p.astype(vb.dtype), vb,
                                             preferred_element_type=jnp.float32)
    return m_new, l, acc


def _walk_cache(qg, k_all, v_all, idx, n_blocks, block: int, visible, *, maybe_blind: bool):
    """The online softmax of queries qg [B, K, Q, H] over the layer's cache, `block` positions at a time for
    `n_blocks` blocks, where `visible(kpos)` (kpos: the block's absolute positions). The last block may pass the
    cache's end: it is read from S - block on, and the positions an earlier block covered are masked out."""
    B, K, Q, H = qg.shape
    S = k_all.shape[-1]

    def body(j, carry):
        first = j * block
        begin = jnp.minimum(first, S - block)
        kb = lax.dynamic_slice(k_all, (idx, 0, 0, 0, begin), (1, B, K, H, block))[0]
        vb = lax.dynamic_slice(v_all, (idx, 0, 0, begin, 0), (1, B, K, block, H))[0]
        s = jnp.einsum("BKQH,BKHS->BKQS", qg, kb, preferred_element_type=jnp.float32)
        kpos = begin + jnp.arange(block)
        return _online_softmax(carry, s, vb, visible(kpos) & (kpos >= first), maybe_blind=maybe_blind)

    init = (jnp.full((B, K, Q), -1e30, jnp.float32), jnp.zeros((B, K, Q), jnp.float32),
            jnp.zeros((B, K, Q, H), jnp.float32))
    return lax.fori_loop(0, n_blocks, body, init)


def _grouped_queries(q):
    # [B, T, K, G, H] -> [B, K, T*G, H], scaled: the batched dims (B, K) lead, as in the cache
    B, T, K, G, H = q.shape
    return (q * (1.0 / jnp.sqrt(jnp.float32(H))).astype(q.dtype)).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)


def _attention_blocked(q, k_all, v_all, idx, q_pos, *, cfg: LlamaConfig, block: int):
    """Decode-time attention that reads only the cache blocks some query can see (bounded by row length).

    Walks the layer's cache in blocks of `block` positions up to the batch's furthest query position, with
    an online softmax, so the work and memory traffic follow the rows' lengths, not the cache's capacity.

    Args:
      q: Float[B, T, K, G, H]; k_all: Float[L, B, K, H, S]; v_all: Float[L, B, K, S, H]; idx: the layer.
      q_pos: Int[B, T] absolute positions of the queries.
    """
    B, T, K, G, H = q.shape
    qp = jnp.repeat(q_pos, G, axis=1)[:, None, :, None]  # [B, 1, Q, 1], query order (t, g)
    n_blocks = (jnp.max(q_pos) + block) // block
    # every query sees position 0 in the first block
    _, l, acc = _walk_cache(_grouped_queries(q), k_all, v_all, idx, n_blocks, block, lambda kpos: kpos <= qp,
                            maybe_blind=False)
    out = acc / l[..., None]
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).astype(q.dtype)


def _attention_cached_and_new(q, k_all, v_all, idx, start, k_new, v_new, *, block: int):
    """Attention of T new queries per row over the row's cached positions (< start) and the new tokens' own keys
    (causal among them), without writing the cache: the cache is only read (see `forward(write_cache=False)`).

    Args:
      q: Float[B, T, K, G, H]; k_all: Float[L, B, K, H, S]; v_all: Float[L, B, K, S, H]; idx: the layer.
      start: Int[B] cached positions per row; k_new, v_new: Float[B, K, T, H] the new tokens' keys and values.
      block: cache positions per loop iteration (S: the whole cache in one).
    """
    B, T, K, G, H = q.shape
    qg = _grouped_queries(q)
    st = start[:, None, None, None]  # [B, 1, 1, 1]
    # a row with nothing cached sees nothing in any block
    carry = _walk_cache(qg, k_all, v_all, idx, (jnp.max(start) + block - 1) // block, block, lambda kpos: kpos < st,
                        maybe_blind=True)
    s = jnp.einsum("BKQH,BKTH->BKQT", qg, k_new.astype(qg.dtype), preferred_element_type=jnp.float32)
    q_t = jnp.repeat(jnp.arange(T), G)  # query order (t, g)
    _, l, acc = _online_softmax(carry, s, v_new, jnp.arange(T)[None, :] <= q_t[:, None])
    out = acc / l[..., None]
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).astype(q.dtype)


def attention_block(S: int) -> int | None:
    """The block the decode-time attention walks a cache of capacity S in: 128 positions (S // 2 for a smaller
    cache; None below 32: attend densely). Each block is one iteration of a loop with a fixed cost: at 650 cached
    positions, the 64-position blocks used before made attention 30% of a batch-1 decode step of the default
    model on a 2-core CPU; 128 took 13% off the step, 256 and 512 measured the same as 128."""
    return 128 if S >= 256 else (S // 2 if S >= 32 else None)


def _attention_bias(positions: Int[Array, "B T"], G: int, S: int) -> Float[Array, "B 1 Q S"]:
    # A query sees every cached position up to its own. Built once per forward, shared by all layers.
    qp = jnp.repeat(positions, G, axis=1)  # [B, T*G], query order (t, g)
    visible = jnp.arange(S)[None, None, :] <= qp[:, :, None]
    return jnp.where(visible, 0.0, -1e30).astype(jnp.float32)[:, None]


def forward(
    params: Params,
    tokens: Int[Array, "B T"],
    cache: KVCache,
    *,
    cfg: LlamaConfig,
    n_new: Int[Array, "B"] | None = None,
    return_layers: bool = False,
    write_cache: bool = True,
):
    """Runs the decoder over T new tokens per row and appends their keys/values to the cache.

    Args:
      params: packed params (`models.params.pack_params`).
      tokens: Int[B, T] new token ids, left-aligned; row b's first token goes to position cache.lengths[b].
      cache: the KV cache; the caller guarantees lengths + T <= cache.max_len. Its buffers may hold more rows
        than `tokens` (lengths has B entries): the forward then reads and writes only their first B rows, in
        place, so a caller can run a prefix of a larger batch without copying that prefix's cache out and back.
      cfg: static model config.
      n_new: Int[B] how many of the T tokens are real per row (default T); lengths advance by it.
      return_layers: also return every layer's output, Float[L, B, T, D] (tests only).
      write_cache: False: only read the cache, and return the new keys and values instead (`write_kv` appends
        them). A forward inside a `lax.switch` (speculative verification picks its width by one) then takes the
        loop-carried cache as a read-only operand: written inside a branch, XLA:CPU copied the whole cache.

    Returns:
      (hidden, cache): final-normed hidden states Float[B, T, D] and the updated cache; with `write_cache` False,
      (hidden, (k_new, v_new)) with k_new, v_new Float[L, B, K, T, H].
    """
    B, T = tokens.shape
    G = cfg.q_per_kv
    dtype = params["embed"].dtype
    start = cache.lengths
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    S = cache.max_len
    # Few queries (decode, speculative verification): read only the blocks the rows reach. Many (prefill):
    # one pass over the whole cache, whose capacity then is close to the prompt length anyway.
    block = attention_block(S)
    blocked = T * G <= 32 and block is not None
    bias = None if blocked else _attention_bias(positions, G, S)
    # Scatter indices into a layer's cache slice, for new entries laid out [B, K, T, H].
    b_idx = jnp.arange(B)[:, None, None]
    k_idx = jnp.arange(cfg.n_kv_heads)[None, :, None]
    s_idx = positions[:, None, :]

    x = params["embed"][tokens].astype(dtype)

    def layer(carry, inputs):
        x, k_all, v_all = carry
        lp, idx = inputs
        h = rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        qkv = jnp.einsum("BTD,DKQH->BTKQH", h, lp["wqkv"])
        q = apply_rope(qkv[..., :G, :], cos, sin)
        k = apply_rope(qkv[..., G, :], cos, sin)
        v = qkv[..., G + 1, :]
        if not write_cache:
            k_new = k.transpose(0, 2, 1, 3).astype(k_all.dtype)
            v_new = v.transpose(0, 2, 1, 3).astype(v_all.dtype)
            attn = _attention_cached_and_new(q, k_all, v_all, idx, start, k_new, v_new, block=block or S)
            return (mlp(x, attn, lp), k_all, v_all), (k_new, v_new)
        # Write the new entries into this layer's slice of the loop-carried buffers (in place).
        # (the slice between the advanced indices puts H last in the updated block: [B, K, T, H])
        k_all = k_all.at[idx, b_idx, k_idx, :, s_idx].set(k.transpose(0, 2, 1, 3).astype(k_all.dtype), mode="drop")
        v_all = v_all.at[idx, b_idx, k_idx, s_idx].set(v.transpose(0, 2, 1, 3).astype(v_all.dtype), mode="drop")
        if blocked:
            attn = _attention_blocked(q, k_all, v_all, idx, positions, cfg=cfg, block=block)
        else:
            attn = _attention(q, k_all[idx, :B], v_all[idx, :B], bias, cfg=cfg)
        x = mlp(x, attn, lp)
        return (x, k_all, v_all), (x if return_layers else None)

    def mlp(x, attn, lp):
        # As one [B, T, K*G*H] @ [K*G*H, D] product: written as an einsum over (K, G, H), XLA:CPU transposed the
        # weight (a copy of wo in every layer at every step, a third of a batch-1 decode step) instead of the
        # attention output.
        x = x + jnp.dot(attn.reshape(B, T, -1), lp["wo"].reshape(-1, lp["wo"].shape[-1]))
        h = rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
        gate_up = jnp.einsum("BTD,DCF->BTCF", h, lp["w_gate_up"])
        return x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], lp["w_down"])

    if per_layer(params):
        # Unrolled over per-layer weights (`unstack_layers`): every dot reads its weight buffer as it is. A scan
        # slices each layer's weights out of the stacked arrays, which XLA:CPU does with a copy per weight per
        # step (GPUs fuse that slice into the GEMM).
        carry, outs = (x, cache.k, cache.v), []
        for i, lp in enumerate(params["layers"]):
            carry, out = layer(carry, (lp, i))
            outs.append(out)
        (x, k_all, v_all), layers = carry, (jnp.stack(outs) if return_layers and write_cache else None)
    else:
        layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        (x, k_all, v_all), layers = lax.scan(layer, (x, cache.k, cache.v), (params["layers"], layer_ids))
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if not write_cache:
        new_k, new_v = (jnp.stack([o[i] for o in outs]) for i in (0, 1)) if per_layer(params) else layers
        return x, (new_k, new_v)
    n = jnp.full((B,), T, jnp.int32) if n_new is None else n_new.astype(jnp.int32)
    new_cache = KVCache(k=k_all, v=v_all, lengths=start + n)
    if return_layers:
        return x, new_cache, layers
    return x, new_cache


def write_kv(cache: KVCache, new_k, new_v, n_new: Int[Array, " B"]) -> KVCache:
    """Appends what `forward(write_cache=False)` returned (Float[L, B, K, T, H] each) at every row's length, in
    place; lengths advance by `n_new` (entries past it are written but stale, as in `forward`)."""
    L, B, K, T, H = new_k.shape
    pos = cache.lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    l_idx = jnp.arange(L)[:, None, None, None]
    b_idx = jnp.arange(B)[None, :, None, None]
    k_idx = jnp.arange(K)[None, None, :, None]
    s_idx = pos[None, :, None, :]
    # both index sets broadcast to [L, B, K, T], H last: the updates' layout
    k = cache.k.at[l_idx, b_idx, k_idx, :, s_idx].set(new_k.astype(cache.k.dtype), mode="drop")
    v = cache.v.at[l_idx, b_idx, k_idx, s_idx].set(new_v.astype(cache.v.dtype), mode="drop")
    return KVCache(k=k, v=v, lengths=cache.lengths + n_new.astype(jnp.int32))


def logits_from_hidden(params: Params, h: Float[Array, "... D"], *, cfg: LlamaConfig) -> Float[Array, "... V"]:
    """The output head: float32 logits from final hidden states."""
    if "head_t" in params:  # the tied head as [D, V] (`models.params.compute_params`, CPU layout)
        return jnp.dot(h, params["head_t"], preferred_element_type=jnp.float32)
    if cfg.tie_embeddings:
        return jnp.einsum("...D,VD->...V", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", h, params["lm_head"], preferred_element_type=jnp.float32)


def forward_full(params: Params, tokens: Int[Array, "B T"], *, cfg: LlamaConfig) -> Float[Array, "B T V"]:
    """Teacher-forced logits for a whole sequence with a fresh cache (reference path for tests)."""
    B, T = tokens.shape
    cache = KVCache.init(cfg, B, T, params["embed"].dtype)
    h, _ = forward(params, tokens, cache, cfg=cfg)
    return logits_from_hidden(params, h, cfg=cfg)


def forward_hidden_states(params: Params, tokens: Int[Array, "B T"], *, cfg: LlamaConfig):
    """Embedding output and every layer's output, Float[L + 1, B, T, D], for layer-by-layer parity tests.

    The last entry is the last layer's output before the final norm.
    """
    B, T = tokens.shape
    cache = KVCache.init(cfg, B, T, params["embed"].dtype)
    _, _, layers = forward(params, tokens, cache, cfg=cfg, return_layers=True)
    return jnp.concatenate([params["embed"][tokens][None], layers], axis=0)
