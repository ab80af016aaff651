"""The parameter pytree of a Llama-family decoder, its logical axis names, and its shape check.

Layout (plain nested dicts of arrays; layers stacked on a leading axis so the forward pass scans them):

    params = {
      "embed":      [V, D]            ("vocab", "embed")
      "layers": {
        "attn_norm": [L, D]           ("layers", "embed")
        "wq":        [L, D, N, H]     ("layers", "embed", "heads", "head_dim")
        "wk":        [L, D, K, H]     ("layers", "embed", "kv_heads", "head_dim")
        "wv":        [L, D, K, H]     ("layers", "embed", "kv_heads", "head_dim")
        "wo":        [L, N, H, D]     ("layers", "heads", "head_dim", "embed")
        "mlp_norm":  [L, D]           ("layers", "embed")
        "w_gate":    [L, D, F]        ("layers", "embed", "mlp")
        "w_up":      [L, D, F]        ("layers", "embed", "mlp")
        "w_down":    [L, F, D]        ("layers", "mlp", "embed")
      },
      "final_norm": [D]               ("embed",)
      "lm_head":    [D, V]            ("embed", "vocab")   -- only when cfg.tie_embeddings is False
    }

Projections are stored as x @ W (input dimension first), i.e. the transpose of torch's `nn.Linear.weight`.
The Q and K projections use the HF (rotate-half) RoPE convention: within each head, the first half of the
head dimension pairs with the second half.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ConfigError, LlamaConfig

Params = dict[str, Any]


def param_shapes(cfg: LlamaConfig) -> Params:
    """The expected shape of every leaf, as a pytree of tuples."""
    L, D, N, K, H, F, V = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                           cfg.vocab_size)
    shapes: Params = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D),
            "wq": (L, D, N, H),
            "wk": (L, D, K, H),
            "wv": (L, D, K, H),
            "wo": (L, N, H, D),
            "mlp_norm": (L, D),
            "w_gate": (L, D, F),
            "w_up": (L, D, F),
            "w_down": (L, F, D),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def param_axes(cfg: LlamaConfig) -> Params:
    """Logical axis names for every parameter leaf (same tree structure as the params)."""
    axes: Params = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "embed"),
            "wq": ("layers", "embed", "heads", "head_dim"),
            "wk": ("layers", "embed", "kv_heads", "head_dim"),
            "wv": ("layers", "embed", "kv_heads", "head_dim"),
            "wo": ("layers", "heads", "head_dim", "embed"),
            "mlp_norm": ("layers", "embed"),
            "w_gate": ("layers", "embed", "mlp"),
            "w_up": ("layers", "embed", "mlp"),
            "w_down": ("layers", "mlp", "embed"),
        },
        "final_norm": ("embed",),
    }
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def check_params(params: Params, cfg: LlamaConfig, *, where: str = "params", packed: bool = False) -> None:
    """Raises ConfigError naming the first leaf whose presence or shape does not match `cfg` (in the compute
    layout when `packed`)."""
    expected = packed_shapes(cfg) if packed else param_shapes(cfg)

    def walk(exp, got, path):
        if isinstance(exp, dict):
            if not isinstance(got, dict):
                raise ConfigError(f"{where}: {path or 'root'} should be a mapping, got {type(got).__name__}")
            missing = sorted(set(exp) - set(got))
            extra = sorted(set(got) - set(exp))
            if missing:
                raise ConfigError(f"{where}: missing tensors {[f'{path}{k}' for k in missing]}")
            if extra:
                raise ConfigError(f"{where}: unexpected tensors {[f'{path}{k}' for k in extra]}")
            for k in exp:
                walk(exp[k], got[k], f"{path}{k}.")
        else:
            shape = tuple(np.shape(got))
            if shape != exp:
                raise ConfigError(f"{where}: tensor {path[:-1]} has shape {shape}, expected {exp}")

    walk(expected, params, "")


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters for tests and draft models: normal weights scaled by 1/sqrt(fan_in), norms near 1."""
    fan_in = {"wq": cfg.d_model, "wk": cfg.d_model, "wv": cfg.d_model, "wo": cfg.n_heads * cfg.head_dim,
              "w_gate": cfg.d_model, "w_up": cfg.d_model, "w_down": cfg.d_ff, "lm_head": cfg.d_model, "embed": 1}
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    out = []
    for k, (path, shape) in zip(keys, flat):
        name = path[-1].key
        noise = jax.random.normal(k, shape, dtype)
        if name.endswith("norm"):
            out.append(1.0 + 0.1 * noise)
        else:
            out.append(noise / np.sqrt(fan_in[name]))
    return jax.tree.unflatten(treedef, out)


def pack_params(params: Params, cfg: LlamaConfig) -> Params:
    """Converts the canonical (checkpoint) layout into the compute layout that `models.llama` runs on.

    Q, K and V are fused into one projection grouped by kv head, and gate/up into one, so each layer makes
    three weight matmuls fewer (larger dots run closer to the memory-bandwidth limit at batch 1), and
    tensor-parallel sharding on `kv_heads` / `mlp` still splits every fused tensor cleanly:

        wqkv:      [L, D, K, G + 2, H]  ("layers", "embed", "kv_heads", "qkv", "head_dim")
                   slots 0..G-1 are the G query heads of kv head k, slot G its key, slot G+1 its value
        wo:        [L, K, G, H, D]      ("layers", "kv_heads", "q_per_kv", "head_dim", "embed")
        w_gate_up: [L, D, 2, F]         ("layers", "embed", "gate_up", "mlp")
    """
    lp = params["layers"]
    L, D, K, G, H = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim
    xp = jnp if isinstance(lp["wq"], jax.Array) else np
    wq = lp["wq"].reshape(L, D, K, G, H)
    wqkv = xp.concatenate([wq, lp["wk"][:, :, :, None, :], lp["wv"][:, :, :, None, :]], axis=3)
    packed = {
        "embed": params["embed"],
        "final_norm": params["final_norm"],
        "layers": {
            "attn_norm": lp["attn_norm"],
            "wqkv": wqkv,
            "wo": lp["wo"].reshape(L, K, G, H, D),
            "mlp_norm": lp["mlp_norm"],
            "w_gate_up": xp.stack([lp["w_gate"], lp["w_up"]], axis=2),
            "w_down": lp["w_down"],
        },
    }
    if "lm_head" in params:
        packed["lm_head"] = params["lm_head"]
    return packed


def packed_shapes(cfg: LlamaConfig) -> Params:
    """The shape of every leaf of the compute layout (`pack_params`), as a pytree of tuples."""
    L, D, K, G, H, F = cfg.n_layers, cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv, cfg.head_dim, cfg.d_ff
    shapes = param_shapes(cfg)
    shapes["layers"] = {
        "attn_norm": (L, D),
        "wqkv": (L, D, K, G + 2, H),
        "wo": (L, K, G, H, D),
        "mlp_norm": (L, D),
        "w_gate_up": (L, D, 2, F),
        "w_down": (L, F, D),
    }
    return shapes


def is_packed(params: Params) -> bool:
    """Whether `params` is in the compute layout (`pack_params`, stacked or `unstack_layers`'d) rather than the
    canonical one."""
    if not isinstance(params, dict):
        return False
    layers = params.get("layers")
    if isinstance(layers, (list, tuple)):
        return bool(layers) and isinstance(layers[0], dict) and "wqkv" in layers[0]
    return isinstance(layers, dict) and "wqkv" in layers


def per_layer(params: Params) -> bool:
    """Whether params hold their layers as a list of per-layer dicts (`unstack_layers`) rather than stacked."""
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params) -> Params:
    """The same params with "layers" as a list of per-layer dicts (each leaf without the leading L axis).

    `models.llama.forward` unrolls its layer loop over such a list, so every matmul reads its own weight buffer;
    iterating stacked weights with a scan slices them, which XLA:CPU does with a copy of every layer's weights at
    every step (+30% time per decode step at batch 1 on the default model). Costs one copy of the weights, once.
    """
    if per_layer(params):
        return params
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return dict(params, layers=[jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)])


def stack_layers(params: Params) -> Params:
    """The inverse of `unstack_layers`: "layers" as one dict of [L, ...] arrays (checkpoints, sharding)."""
    if not per_layer(params):
        return params
    layers = params["layers"]
    xp = jnp if isinstance(jax.tree.leaves(layers)[0], jax.Array) else np
    return dict(params, layers=jax.tree.map(lambda *xs: xp.stack(xs), *layers))


def unroll_by_default() -> bool:
    """Whether the runtime unrolls the layer loop by default: on CPU, where a scan's weight slices are copies.

    On GPUs XLA fuses the slice into the GEMM, and a scan keeps compile time independent of depth. The unrolled
    programs take longer to compile (about 2 s more per program for the default model's 30 layers).
    `AQJAX_UNROLL_LAYERS=1` or `=0` overrides the choice (the test suite, which compiles hundreds of programs
    and checks that both layouts compute the same, runs the scan by default).
    """
    env = os.environ.get("AQJAX_UNROLL_LAYERS", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env not in ("", "auto"):
        raise ValueError(f"AQJAX_UNROLL_LAYERS={env!r}: expected 1, 0 or auto")
    return jax.default_backend() == "cpu"


def compute_params(params: Params, cfg: LlamaConfig, *, packed: bool | None = None,
                   unroll: bool | None = None) -> Params:
    """Params as the compiled programs take them: packed (`pack_params`), and per layer when `unroll` (default
    `unroll_by_default()`: the CPU layout, which also gets a transposed copy of a tied head, "head_t"), stacked
    otherwise."""
    if packed is None:
        packed = is_packed(params)
    if not packed:
        params = jax.tree.map(jnp.asarray, pack_params(params, cfg))
    if unroll is None:
        unroll = unroll_by_default()
    if not unroll:
        return stack_layers(params)
    out = dict(unstack_layers(params))  # a new dict: the caller's params stay as they are
    if cfg.tie_embeddings and "lm_head" not in out and "head_t" not in out:
        # The tied output head as a [D, V] copy of the embedding: XLA:CPU's small-M GEMM against it (speculative
        # verification, 2-9 rows) is 1-1.6 ms faster for the default model than against [V, D] (the same at 1,
        # 32 or 512 rows), for 113 MB more memory. `logits_from_hidden` uses it when present.
        out["head_t"] = jnp.asarray(jnp.asarray(out["embed"]).T)
    return out


def unpack_params(packed: Params, cfg: LlamaConfig) -> Params:
    """The inverse of `pack_params`: the canonical layout (exactly the same values)."""
    lp = packed["layers"]
    L, D, N, G, H = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.q_per_kv, cfg.head_dim
    wqkv = lp["wqkv"]
    params = {
        "embed": packed["embed"],
        "final_norm": packed["final_norm"],
        "layers": {
            "attn_norm": lp["attn_norm"],
            "wq": wqkv[:, :, :, :G, :].reshape(L, D, N, H),
            "wk": wqkv[:, :, :, G, :],
            "wv": wqkv[:, :, :, G + 1, :],
            "wo": lp["wo"].reshape(L, N, H, D),
            "mlp_norm": lp["mlp_norm"],
            "w_gate": lp["w_gate_up"][:, :, 0, :],
            "w_up": lp["w_gate_up"][:, :, 1, :],
            "w_down": lp["w_down"],
        },
    }
    if "lm_head" in packed:
        params["lm_head"] = packed["lm_head"]
    return params


def packed_axes(cfg: LlamaConfig) -> Params:
    """Logical axis names of the compute layout produced by `pack_params`."""
    axes = param_axes(cfg)
    axes["layers"] = {
        "attn_norm": ("layers", "embed"),
        "wqkv": ("layers", "embed", "kv_heads", "qkv", "head_dim"),
        "wo": ("layers", "kv_heads", "q_per_kv", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate_up": ("layers", "embed", "gate_up", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    return axes
