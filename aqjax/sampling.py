"""Per-row token sampling: greedy, temperature, top-k, top-p and min-p, with reproducible per-row seeds.

Every row of a batch carries its own sampling parameters as arrays, so one compiled step serves requests
with different settings. The filters compose in the usual order: temperature scales the logits, top-k keeps
the k most probable tokens, top-p keeps the smallest prefix of the remaining (renormalized) distribution
whose mass reaches p, and min-p keeps tokens whose probability is at least min_p times the most probable
one's. Ties are broken by token id (lower first), so the kept support has exactly the stated size.

Randomness: row b draws its i-th token with `fold_in(key_b, i)`, where key_b comes from the row's seed. A
row's tokens therefore depend only on its own seed and inputs, never on which other rows share the batch or
when the row joined it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from aqjax import ops

NEG_INF = -jnp.inf


class SamplingError(ValueError):
    """Sampling parameters out of range."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Host-side sampling settings of one request (validated). temperature == 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 100.0):
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise SamplingError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.min_p, (int, float)) and 0.0 <= self.min_p <= 1.0):
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise SamplingError(f"seed must be a non-negative 64-bit integer, got {self.seed!r}")


@struct.dataclass
class SamplingParams:
    """Per-row sampling parameters, as arrays carried into the compiled loop.

    Attributes:
      temperature: Float[B]; 0 selects greedy decoding for the row.
      top_k: Int[B]; 0 disables.
      top_p: Float[B]; 1 disables.
      min_p: Float[B]; 0 disables.
      key: the rows' base PRNG keys, uint32[B, 2] raw key data.
    """

    temperature: Float[Array, "B"]
    top_k: Int[Array, "B"]
    top_p: Float[Array, "B"]
    min_p: Float[Array, "B"]
    key: jax.Array

    @classmethod
    def from_configs(cls, configs: list[SamplingConfig]) -> "SamplingParams":
        # threefry2x32 key data is the seed's two 32-bit halves (what jax.random.PRNGKey(seed) builds).
        keys = np.asarray([[c.seed >> 32, c.seed & 0xFFFFFFFF] for c in configs], np.uint32)
        return cls(
            temperature=jnp.asarray([c.temperature for c in configs], jnp.float32),
            top_k=jnp.asarray([c.top_k for c in configs], jnp.int32),
            top_p=jnp.asarray([c.top_p for c in configs], jnp.float32),
            min_p=jnp.asarray([c.min_p for c in configs], jnp.float32),
            key=jnp.asarray(keys, jnp.uint32),
        )


def _sorted_filter_mask(logits: Float[Array, "B V"], top_k: Int[Array, "B"], top_p: Float[Array, "B"]):
    """Keep-mask for top-k then top-p, computed in sorted order (exact support, ties by token id)."""
    V = logits.shape[-1]
    # A stable descending sort: ties keep ascending token order.
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    in_k = rank < k
    # top-p on the top-k-renormalized distribution: keep a token if the mass strictly before it is < p.
    masked = jnp.where(in_k, sorted_logits, NEG_INF)
    probs = jax.nn.softmax(masked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep_sorted = keep_sorted.at[:, 0].set(True)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def filter_logits(logits: Float[Array, "B V"], params: SamplingParams) -> Float[Array, "B V"]:
    """Temperature-scaled logits with every token outside the top-k / top-p / min-p support set to -inf.

    Rows with temperature 0 are returned unscaled (their sample is the argmax).
    """
    logits = logits.astype(jnp.float32)
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits / temp
    # Sorting the vocabulary is the costly part; skip it when no row asks for top-k or top-p.
    need_sort = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
    keep = lax.cond(
        need_sort,
        lambda x: _sorted_filter_mask(x, params.top_k, params.top_p),
        lambda x: jnp.ones(x.shape, bool),
        scaled,
    )
    # min-p: p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p).
    top = jnp.max(jnp.where(keep, scaled, NEG_INF), axis=-1, keepdims=True)
    keep = keep & (scaled >= top + jnp.log(params.min_p)[:, None])
    return jnp.where(keep, scaled, NEG_INF)


def sample(logits: Float[Array, "B V"], params: SamplingParams, index: Int[Array, "B"]) -> Int[Array, "B"]:
    """Draws one token per row.

    Args:
      logits: Float[B, V] next-token logits; -inf marks tokens that may not be drawn (e.g. a gate's mask).
      params: per-row sampling parameters.
      index: Int[B] the index of the token each row draws (its count of generated tokens), folded into its key.

    Returns:
      Int[B] token ids.
    """
    greedy = ops.argmax(logits)

    def draw(logits):
        filtered = filter_logits(logits, params)
        keys = jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k, impl="threefry2x32"), i))(
            params.key, index)
        drawn = jax.vmap(ops.categorical)(keys, filtered)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # Random bits for B x V Gumbel noise cost more than the argmax: skip them when every row is greedy.
    return lax.cond(jnp.any(params.temperature > 0), draw, lambda _: greedy, logits)


def support(logits: Float[Array, "B V"], params: SamplingParams) -> Bool[Array, "B V"]:
    """The set of tokens each row can draw (for tests and for gates that inspect the sampler)."""
    return jnp.isfinite(filter_logits(logits, params))
