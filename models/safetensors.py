"""Loads HF Llama checkpoints (config.json + safetensors, single file or sharded) into the aqjax params layout.

The safetensors container is parsed here (an 8-byte header length, a JSON header, raw little-endian data) because
the `safetensors` package's numpy backend cannot return bfloat16, the usual dtype of real checkpoints; we map
BF16 to `ml_dtypes.bfloat16` and memory-map the data.
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import re
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ConfigError, LlamaConfig
from models.errors import ModelFileError
from models.params import Params, check_params, param_shapes

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header

# Tensors HF checkpoints may carry that the model does not use.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# params key (under "layers") -> HF name suffix in "model.layers.N.<suffix>.weight".
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "wq": "self_attn.q_proj",
    "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj",
    "wo": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj",
    "w_up": "mlp.up_proj",
    "w_down": "mlp.down_proj",
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Memory-maps one .safetensors file as {name: read-only numpy array} (float dtypes only).

    Raises:
      ModelFileError: the file is missing, truncated, has a corrupt header, or holds a non-float tensor.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ModelFileError(path, f"file is {size} bytes, too short to be a safetensors file")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except OSError as e:
        raise ModelFileError(path, f"cannot read file: {e.strerror or e}") from None
    (n,) = struct.unpack_from("<Q", buf, 0)
    if n > _MAX_HEADER or 8 + n > size:
        raise ModelFileError(path, f"corrupt or truncated: header claims {n} bytes but the file has {size}")
    try:
        header = json.loads(buf[8 : 8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(path, f"corrupt safetensors header: {e}") from None
    data_start = 8 + n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"corrupt header entry for tensor {name!r}: {spec!r}") from None
        if dtype_name not in _DTYPES:
            raise ModelFileError(path, f"tensor {name!r} has dtype {dtype_name}; expected one of {list(_DTYPES)}")
        dt = _DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize or begin < 0:
            raise ModelFileError(path, f"tensor {name!r}: offsets {begin}..{end} do not fit shape {shape} {dtype_name}")
        if data_start + end > size:
            raise ModelFileError(
                path, f"file is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}"
            )
        out[name] = np.frombuffer(buf, dt, count, data_start + begin).reshape(shape)
    return out


def _tensor_files(d: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> file holding it, from the shard index if there is one."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: d / fname for name, fname in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(index, f"not a valid safetensors index ({e!r})") from None
    single = d / "model.safetensors"
    files = [single] if single.is_file() else sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelFileError(d, "no model.safetensors, model.safetensors.index.json or *.safetensors files")
    return {f"\0{f.name}": f for f in files}  # placeholder names: every file is read in full below


def _read_all(d: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, pathlib.Path]]:
    """All tensors in the checkpoint dir and the file each came from."""
    wanted = _tensor_files(d)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, pathlib.Path] = {}
    for file in sorted(set(wanted.values())):
        for name, arr in read_safetensors(file).items():
            if name in tensors:
                raise ModelFileError(file, f"tensor {name!r} is also in {origin[name].name}")
            tensors[name], origin[name] = arr, file
    for name, file in wanted.items():
        if not name.startswith("\0") and origin.get(name) != file:
            raise ModelFileError(file, f"the shard index says tensor {name!r} is here, but it is not")
    return tensors, origin


def _plan(cfg: LlamaConfig) -> list[tuple[str, tuple, tuple[int, ...], bool]]:
    """(HF name, params path, torch shape, transpose?) for every tensor the model needs."""
    D, N, K, H, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    # torch Linear weights are [out, in]; we store x @ W, so they are transposed (and split into heads, which
    # for Q/K keeps HF's rotate-half order: head n owns output rows n*H .. n*H + H - 1).
    layer = {
        "attn_norm": ((D,), False),
        "wq": ((N * H, D), True),
        "wk": ((K * H, D), True),
        "wv": ((K * H, D), True),
        "wo": ((D, N * H), True),
        "mlp_norm": ((D,), False),
        "w_gate": ((F, D), True),
        "w_up": ((F, D), True),
        "w_down": ((D, F), True),
    }
    plan = [
        ("model.embed_tokens.weight", ("embed",), (V, D), False),
        ("model.norm.weight", ("final_norm",), (D,), False),
    ]
    if not cfg.tie_embeddings:
        plan.append(("lm_head.weight", ("lm_head",), (V, D), True))
    for i in range(cfg.n_layers):
        for key, suffix in _LAYER_NAMES.items():
            plan.append((f"model.layers.{i}.{suffix}.weight", ("layers", key, i)) + layer[key])
    return plan


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
    """Loads an HF Llama checkpoint directory as (config, params) with params in `dtype` (jax arrays).

    Args:
      path: a directory with config.json and model.safetensors, or shards with model.safetensors.index.json.
      dtype: floating dtype of the returned params.

    Raises:
      ModelFileError: missing/unreadable files, missing or unexpected tensors, or a tensor of the wrong shape.
    """
    d = pathlib.Path(path)
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype must be a floating type, got {dt}")
    if not d.is_dir():
        raise ModelFileError(d, "not a directory" if d.exists() else "directory not found")
    try:
        cfg = LlamaConfig.from_hf_config(d / "config.json")
    except ConfigError as e:
        raise ModelFileError(d / "config.json", str(e).removeprefix(f"{d / 'config.json'}: ")) from None
    tensors, origin = _read_all(d)
    # Checked before building the per-layer plan, which an absurd layer count would make enormous.
    layers = {int(m[1]) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if len(layers) != cfg.n_layers or max(layers, default=-1) != cfg.n_layers - 1:  # i.e. layers == {0..L-1}
        raise ModelFileError(
            d,
            f"config.json says num_hidden_layers={cfg.n_layers} but the checkpoint has tensors for "
            f"{len(layers)} layers (numbered {min(layers, default=None)}..{max(layers, default=None)})",
        )

    plan = _plan(cfg)
    expected = {name for name, *_ in plan}
    missing = sorted(expected - set(tensors))
    if missing:
        raise ModelFileError(d, f"missing tensors {missing[:8]} ({len(missing)} in all)")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()  # some tied checkpoints also save the head
    extra = sorted(n for n in set(tensors) - expected - ignorable if not _IGNORED.fullmatch(n))
    if extra:
        raise ModelFileError(d, f"unexpected tensors {extra[:8]} ({len(extra)} in all)")

    leaves: Any = jax.tree.map(
        lambda s: np.empty(s, np.float32), param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)
    )
    for name, where, shape, transpose in plan:
        src = tensors[name]
        if src.shape != shape:
            raise ModelFileError(origin[name], f"tensor {name!r} has shape {src.shape}, expected {shape}")
        dest = leaves
        for k in where:
            dest = dest[k]
        if transpose:
            src = src.T
        np.copyto(dest.reshape(src.shape), src)  # dest is a contiguous slice of its leaf, so this reshape is a view
    del tensors  # drop the views so the memory maps can close
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dt), leaves)
    check_params(params, cfg, where=str(d))
    return cfg, params
