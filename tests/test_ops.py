"""aqjax.ops: fast replacements agree exactly with the jnp originals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aqjax import ops


@pytest.mark.parametrize("V", [7, 512, 49152, 50000])
def test_argmax_matches_jnp_including_ties_and_masks(V):
    rng = np.random.default_rng(V)
    x = rng.normal(size=(6, V)).astype(np.float32)
    x[1, [3, V - 1]] = 100.0  # tie: the first index wins
    x[2, : V // 2] = -np.inf  # masked half
    x[3, :] = -np.inf
    x[3, V - 1] = 0.0  # only the last token admissible
    x[4, :] = 1.0  # all equal
    got = np.asarray(jax.jit(ops.argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_categorical_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1, 0.0])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    keys = jax.random.split(jax.random.key(0), 6000)
    draws = np.asarray(jax.jit(jax.vmap(ops.categorical, in_axes=(0, None)))(keys, logits))
    freq = np.bincount(draws, minlength=4) / len(draws)
    se = np.sqrt(probs * (1 - probs) / len(draws)) + 1e-9
    assert freq[3] == 0 and np.all(np.abs(freq - probs) < 5 * se), freq
