"""The decoder: layer-by-layer parity with HF transformers on tiny random models, and cache invariants."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax.cache import KVCache
from models.config import SMOLLM2_135M, LlamaConfig, tiny_config
from models.llama import forward, forward_full, forward_hidden_states, logits_from_hidden, rms_norm
from models.params import (
    check_params,
    compute_params,
    init_params,
    is_packed,
    pack_params,
    packed_axes,
    param_axes,
    stack_layers,
    unpack_params,
    unstack_layers,
)
from models.safetensors import load_hf_dir

DATA = pathlib.Path(__file__).parent / "data"


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("variant,kv", [("mha", 4), ("gqa", 2), ("mqa", 1)])
def test_layer_by_layer_parity_with_hf(variant, kv, unroll):
    # Reference activations were produced by transformers (tests/data/make_tiny_llama.py).
    cfg, params = load_hf_dir(DATA / f"tiny_llama_{variant}", dtype=jnp.float32)
    assert cfg.n_kv_heads == kv and cfg.n_heads == 4
    ref = np.load(DATA / f"tiny_llama_{variant}" / "reference.npz")
    ids = jnp.asarray(ref["input_ids"])
    packed = compute_params(params, cfg, unroll=unroll)
    assert isinstance(packed["layers"], list) == unroll and is_packed(packed)
    hs = np.asarray(forward_hidden_states(packed, ids, cfg=cfg))
    L = cfg.n_layers
    # HF's last hidden state has the final norm applied; ours is the raw last layer output.
    np.testing.assert_allclose(hs[:L], ref["hidden_states"][:L], atol=2e-4, rtol=2e-4)
    np.testing.assert_allclose(hs[L], ref["last_layer_prenorm"], atol=2e-4, rtol=2e-4)
    final = np.asarray(rms_norm(jnp.asarray(hs[L]), packed["final_norm"], cfg.norm_eps))
    np.testing.assert_allclose(final, ref["hidden_states"][L], atol=2e-4, rtol=2e-4)
    logits = np.asarray(forward_full(packed, ids, cfg=cfg))
    np.testing.assert_allclose(logits, ref["logits"], atol=5e-4, rtol=5e-4)


def test_hf_config_mapping():
    cfg = LlamaConfig.from_hf_config(DATA / "tiny_llama_gqa" / "config.json")
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (4, 2, 16, True)
    assert cfg.rope_theta == 500000.0


def _cached_logits(packed, cfg, tokens, splits):
    """Logits of `tokens` fed through the cache in pieces of the given sizes."""
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1] + 4)
    outs, pos = [], 0
    for n in splits:
        h, cache = forward(packed, tokens[:, pos:pos + n], cache, cfg=cfg)
        outs.append(logits_from_hidden(packed, h, cfg=cfg))
        pos += n
    return jnp.concatenate(outs, axis=1), cache


def test_cached_decoding_equals_teacher_forcing():
    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(1)), cfg)
    tokens = jax.random.randint(jax.random.key(2), (3, 17), 0, cfg.vocab_size)
    full = forward_full(packed, tokens, cfg=cfg)
    # prefill 9, then 1 token at a time, then a 3-token block (the shape speculative verification uses)
    cached, cache = _cached_logits(packed, cfg, tokens, [9, 1, 1, 1, 1, 1, 3])
    chex.assert_trees_all_close(cached, full, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [17, 17, 17])


@pytest.mark.parametrize("S", [40, 300, 512])
def test_blocked_attention_equals_teacher_forcing(S):
    """Decode-time attention walks the cache in blocks (`attention_block`): 20 positions at S = 40; 128 at S = 300,
    where the last block would pass the cache's end and is read from S - 128 on, overlapping the one before; 128
    at S = 512. Cached decoding across block boundaries, one token and a 5-token verification block at a time,
    gives the teacher-forced logits."""
    from models.llama import attention_block

    cfg = tiny_config()
    block = attention_block(S)
    assert block is not None and (S % block != 0) == (S == 300)
    packed = pack_params(init_params(cfg, jax.random.key(5)), cfg)
    n = S - 4
    tokens = jax.random.randint(jax.random.key(6), (2, n), 0, cfg.vocab_size)
    full = forward_full(packed, tokens, cfg=cfg)
    prefill = n - 12
    cache = KVCache.init(cfg, 2, S)
    _, cache = forward(packed, tokens[:, :prefill], cache, cfg=cfg)
    outs, pos = [], prefill
    for step in [1, 5, 1, 5]:
        h, cache = forward(packed, tokens[:, pos:pos + step], cache, cfg=cfg)
        outs.append(logits_from_hidden(packed, h, cfg=cfg))
        pos += step
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full[:, prefill:]),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("S", [24, 300])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("unroll", [False, True])
def test_read_only_forward_then_write_kv_equals_forward(S, T, unroll):
    """`forward(write_cache=False)` reads the cache only (one block at S = 24, blocks of 128 at S = 300) and
    returns the new keys and values; `write_kv` appends them: the hidden states and the cache are `forward`'s,
    for ragged rows (one with nothing cached yet) and a cache with more rows than the batch."""
    from models.llama import write_kv

    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(7)), cfg)
    params = unstack_layers(packed) if unroll else packed
    n = S - 8
    prompt = jax.random.randint(jax.random.key(8), (4, n), 0, cfg.vocab_size)
    cache = KVCache.init(cfg, 4, S)
    _, cache = forward(params, prompt, cache, cfg=cfg, n_new=jnp.array([n, n - 140 if S > 200 else 3, 0, 9]))
    cache = KVCache(k=cache.k, v=cache.v, lengths=cache.lengths[:3])  # rows 0-2 of 4
    new = jax.random.randint(jax.random.key(9), (3, T), 0, cfg.vocab_size)
    n_new = jnp.array([T, 1, T])
    h_want, want = forward(params, new, cache, cfg=cfg, n_new=n_new)
    h_got, (k_new, v_new) = forward(params, new, cache, cfg=cfg, write_cache=False)
    assert k_new.shape == (cfg.n_layers, 3, cfg.n_kv_heads, T, cfg.head_dim)
    got = write_kv(cache, k_new, v_new, n_new)
    np.testing.assert_allclose(np.asarray(h_got), np.asarray(h_want), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.k), np.asarray(want.k), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.v), np.asarray(want.v), atol=1e-6)


def test_unrolled_layers_decode_as_the_scan_does():
    # Per-layer weights (models.params.unstack_layers) run the same layers, so cached decoding matches the scan's.
    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(1)), cfg)
    per_layer = unstack_layers(packed)
    assert isinstance(per_layer["layers"], list) and len(per_layer["layers"]) == cfg.n_layers
    assert is_packed(per_layer) and is_packed(packed)
    tokens = jax.random.randint(jax.random.key(2), (3, 17), 0, cfg.vocab_size)
    want, want_cache = _cached_logits(packed, cfg, tokens, [9, 1, 1, 6])
    got, got_cache = _cached_logits(per_layer, cfg, tokens, [9, 1, 1, 6])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_cache.k), np.asarray(want_cache.k), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(stack_layers(per_layer), packed)  # the round trip is exact
    chex.assert_trees_all_equal(unpack_params(stack_layers(per_layer), cfg), unpack_params(packed, cfg))


def test_longer_suffix_does_not_change_earlier_logits():
    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(3)), cfg)
    tokens = jax.random.randint(jax.random.key(4), (2, 20), 0, cfg.vocab_size)
    short = forward_full(packed, tokens[:, :12], cfg=cfg)
    long = forward_full(packed, tokens, cfg=cfg)
    chex.assert_trees_all_close(short, long[:, :12], atol=1e-5, rtol=1e-5)


def test_ragged_rows_write_only_their_own_positions():
    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(5)), cfg)
    a = jax.random.randint(jax.random.key(6), (1, 10), 0, cfg.vocab_size)
    # row 0: 6 real tokens then padding; row 1: 10 real tokens
    batch = jnp.concatenate([a.at[:, 6:].set(0), a], axis=0)
    cache = KVCache.init(cfg, 2, 16)
    h, cache = forward(packed, batch, cache, cfg=cfg, n_new=jnp.array([6, 10]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 10])
    # decoding one more token for row 0 at position 6 equals the teacher-forced logits of that prefix
    nxt = jnp.array([[7], [8]])
    h2, cache = forward(packed, nxt, cache, cfg=cfg)
    ref0 = forward_full(packed, jnp.concatenate([a[:, :6], nxt[:1]], axis=1), cfg=cfg)[0, -1]
    ref1 = forward_full(packed, jnp.concatenate([a, nxt[1:]], axis=1), cfg=cfg)[0, -1]
    got = logits_from_hidden(packed, h2[:, 0], cfg=cfg)
    chex.assert_trees_all_close(got[0], ref0, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(got[1], ref1, atol=1e-4, rtol=1e-4)


def test_full_size_shapes_and_axes_cost_nothing():
    cfg = SMOLLM2_135M
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    check_params(params, cfg)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert 134_000_000 < n < 135_000_000  # 134.5 M, as the GGUF says
    packed = jax.eval_shape(lambda p: pack_params(p, cfg), params)
    cache = jax.eval_shape(lambda: KVCache.init(cfg, 2, 64))
    out = jax.eval_shape(lambda p, c: forward(p, jnp.zeros((2, 5), jnp.int32), c, cfg=cfg), packed, cache)
    assert out[0].shape == (2, 5, cfg.d_model)
    # every leaf has one logical name per dimension
    for tree, axes in ((params, param_axes(cfg)), (packed, packed_axes(cfg)), (cache, cache.axes())):
        shapes = jax.tree.map(lambda x: x.shape, tree)
        flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
        assert len(flat_axes) == len(flat_shapes)
        for a, s in zip(flat_axes, flat_shapes):
            assert len(a) == len(s), (a, s)


def test_bad_configs_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="n_kv_heads"):
        tiny_config(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        tiny_config(d_model=0)
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_hf_config({"model_type": "llama", "vocab_size": 10})
    params = init_params(tiny_config(), jax.random.key(0))
    params["layers"]["wq"] = params["layers"]["wq"][:, :, :2]
    with pytest.raises(ValueError, match="layers.wq"):
        check_params(params, tiny_config())


def test_layer_layout_default_and_override(monkeypatch):
    from models.params import unroll_by_default

    monkeypatch.setenv("AQJAX_UNROLL_LAYERS", "auto")
    assert unroll_by_default() == (jax.default_backend() == "cpu")
    monkeypatch.setenv("AQJAX_UNROLL_LAYERS", "1")
    assert unroll_by_default() is True
    monkeypatch.setenv("AQJAX_UNROLL_LAYERS", "off")
    assert unroll_by_default() is False
    monkeypatch.setenv("AQJAX_UNROLL_LAYERS", "sometimes")
    with pytest.raises(ValueError, match="AQJAX_UNROLL_LAYERS='sometimes'"):
        unroll_by_default()


def test_self_draft_shares_per_layer_buffers_and_matches_the_stacked_one():
    from aqjax.drafters import self_draft

    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(3)), cfg)
    per_layer = unstack_layers(packed)
    stacked_draft = self_draft(packed, cfg, 1, None)
    shared_draft = self_draft(per_layer, cfg, 1, None)
    assert shared_draft.params["layers"][0]["wqkv"] is per_layer["layers"][0]["wqkv"]  # no copy
    chex.assert_trees_all_equal(stack_layers(shared_draft.params), stacked_draft.params)


@pytest.mark.parametrize("T", [1, 5, 20])  # decode and verification (blocked attention), prefill (dense)
def test_a_prefix_of_a_larger_cache_runs_in_place(T):
    """A forward over the first B rows of a cache with more rows (the serving engine's prefix buckets) equals the
    forward over those rows alone, and leaves the other rows' keys and values untouched."""
    cfg = tiny_config()
    packed = pack_params(init_params(cfg, jax.random.key(11)), cfg)
    prompt = jax.random.randint(jax.random.key(12), (4, 20), 0, cfg.vocab_size)
    full = KVCache.init(cfg, 4, 128)  # S > 64: decode takes the blocked attention path
    _, full = forward(packed, prompt, full, cfg=cfg, n_new=jnp.array([20, 7, 13, 3]))
    new = jax.random.randint(jax.random.key(13), (2, T), 0, cfg.vocab_size)
    alone = KVCache(k=full.k[:, :2], v=full.v[:, :2], lengths=full.lengths[:2])
    h_alone, alone = forward(packed, new, alone, cfg=cfg)
    prefix = KVCache(k=full.k, v=full.v, lengths=full.lengths[:2])
    h_prefix, prefix = forward(packed, new, prefix, cfg=cfg)
    np.testing.assert_allclose(np.asarray(h_prefix), np.asarray(h_alone), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(prefix.lengths), np.asarray(alone.lengths))
    np.testing.assert_allclose(np.asarray(prefix.k[:, :2]), np.asarray(alone.k), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(prefix.k[:, 2:]), np.asarray(full.k[:, 2:]))
    np.testing.assert_array_equal(np.asarray(prefix.v[:, 2:]), np.asarray(full.v[:, 2:]))


def test_cpu_layout_transposed_tied_head_gives_the_same_logits():
    import dataclasses

    cfg = dataclasses.replace(tiny_config(), tie_embeddings=True)
    packed = pack_params(init_params(cfg, jax.random.key(21)), cfg)
    packed.pop("lm_head", None)
    cpu = compute_params(packed, cfg, unroll=True)
    assert "head_t" in cpu and "head_t" not in packed  # the caller's params are left as they were
    assert "head_t" not in compute_params(packed, cfg, unroll=False)
    np.testing.assert_array_equal(np.asarray(cpu["head_t"]), np.asarray(packed["embed"]).T)
    h = jax.random.normal(jax.random.key(22), (3, 5, cfg.d_model))
    np.testing.assert_allclose(np.asarray(logits_from_hidden(cpu, h, cfg=cfg)),
                               np.asarray(logits_from_hidden(packed, h, cfg=cfg)), atol=1e-5, rtol=1e-5)
