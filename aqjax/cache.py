"""The KV cache: an explicit pytree, preallocated per batch row and updated in place.

Keys and values of all layers live in two stacked buffers so that the forward pass can scan over layers and
write each layer's new entries with a scatter into the loop-carried buffer (XLA updates it in place; the
cache is never copied whole per step). `lengths[b]` is the number of valid positions of row b: entries at or
beyond it are stale and never attended to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

from models.config import LlamaConfig

CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "head_dim", "sequence"),
    "v": ("layers", "batch", "kv_heads", "sequence", "head_dim"),
    "lengths": ("batch",),
}


@struct.dataclass
class KVCache:
    """Per-row key/value cache.

    Attributes:
      k: Float[L, B, K, H, S] keys (RoPE already applied), positions last: the score dot q[Q, H] @ k[H, S]
        then reads the buffer as laid out (with positions second-to-last it ran 2-3x slower on CPU).
      v: Float[L, B, K, S, H] values (positions second-to-last, as the output dot p[Q, S] @ v[S, H] wants).
      lengths: Int[B] valid positions per row.
    """

    k: Float[Array, "L B K H S"]
    v: Float[Array, "L B K S H"]
    lengths: Int[Array, "B"]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[4]

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        kshape = (cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, max_len)
        vshape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(k=jnp.zeros(kshape, dtype), v=jnp.zeros(vshape, dtype), lengths=jnp.zeros((batch,), jnp.int32))

    def axes(self) -> dict:
        """Logical axis names of every leaf (same structure as the cache)."""
        return KVCache(**CACHE_AXES)


def reset_rows(cache: KVCache, rows: Int[Array, "B"] | jax.Array) -> KVCache:
    """Marks the rows where `rows` is true as empty (their stale entries are then never read)."""
    return cache.replace(lengths=jnp.where(rows, 0, cache.lengths))
