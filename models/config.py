"""Frozen, hashable model configuration for Llama-family decoders.

A `LlamaConfig` is passed as a static argument to jitted functions, so it must be hashable and immutable.
It is built from GGUF metadata (`from_gguf_metadata`) or from an HF `config.json` (`from_hf_config`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class ConfigError(ValueError):
    """A model configuration is missing a field or holds an impossible value."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder.

    Attributes:
      vocab_size: V, rows of the embedding table.
      d_model: D, width of the residual stream.
      n_layers: L, number of decoder blocks.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads (N % K == 0; K == N is MHA, K == 1 is MQA).
      head_dim: H, width of one head.
      d_ff: F, hidden width of the SwiGLU MLP.
      rope_theta: RoPE frequency base.
      norm_eps: RMSNorm epsilon.
      max_seq_len: the context length the model was trained for.
      tie_embeddings: the output head reuses the embedding table.
      bos_id / eos_id / pad_id: special token ids (-1 when absent).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    bos_id: int = -1
    eos_id: int = -1
    pad_id: int = -1
    name: str = "llama"

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"LlamaConfig.{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ConfigError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if not self.norm_eps > 0:
            raise ConfigError(f"LlamaConfig.norm_eps must be positive, got {self.norm_eps!r}")

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "config") -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown LlamaConfig fields {unknown}")
        try:
            return cls(**dict(d))
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, where: str = "GGUF") -> "LlamaConfig":
        """Builds a config from GGUF key/value metadata (already decoded to Python values)."""
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{where}: general.architecture is {arch!r}; only 'llama' is supported")

        def need(key):
            if key not in meta:
                raise ConfigError(f"{where}: metadata key {key!r} is missing")
            return meta[key]

        d_model = int(need("llama.embedding_length"))
        n_heads = int(need("llama.attention.head_count"))
        if n_heads <= 0:
            raise ConfigError(f"{where}: llama.attention.head_count must be positive, got {n_heads}")
        n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
        head_dim = int(meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", d_model // n_heads)))
        vocab = meta.get("llama.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{where}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens)
        return cls(
            vocab_size=int(vocab),
            d_model=d_model,
            n_layers=int(need("llama.block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            d_ff=int(need("llama.feed_forward_length")),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            max_seq_len=int(meta.get("llama.context_length", 2048)),
            tie_embeddings=bool(meta.get("_aqjax.tie_embeddings", True)),
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", -1)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", -1)),
            pad_id=int(meta.get("tokenizer.ggml.padding_token_id", -1)),
            name=str(meta.get("general.name", "llama")),
        )

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | str | os.PathLike, *, where: str | None = None) -> "LlamaConfig":
        """Builds a config from an HF `config.json` (a path or the parsed dict)."""
        if not isinstance(cfg, Mapping):
            where = where or str(cfg)
            try:
                with open(cfg) as f:
                    cfg = json.load(f)
            except FileNotFoundError:
                raise ConfigError(f"{where}: file not found") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
        where = where or "config.json"
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ConfigError(f"{where}: model_type {model_type!r} is not a Llama-family model")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in cfg:
                raise ConfigError(f"{where}: key {key!r} is missing")
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{where}: rope_scaling {scaling!r} is not supported")
        n_heads = int(cfg["num_attention_heads"])
        if n_heads <= 0:
            raise ConfigError(f"{where}: num_attention_heads must be positive, got {n_heads}")

        def _id(v):
            if isinstance(v, list):
                v = v[0] if v else None
            return -1 if v is None else int(v)

        return cls(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads),
            d_ff=int(cfg["intermediate_size"]),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=_id(cfg.get("bos_token_id")),
            eos_id=_id(cfg.get("eos_token_id")),
            pad_id=_id(cfg.get("pad_token_id")),
            name=str(cfg.get("_name_or_path", "llama")) or "llama",
        )


def tiny_config(**overrides) -> LlamaConfig:
    """A tiny random-init config for fast tests (GQA, 2 layers, vocab 256)."""
    base = dict(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=512, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0,
        name="tiny",
    )
    base.update(overrides)
    return LlamaConfig(**base)


# SmolLM2-135M-Instruct, as read from its GGUF; handy for jax.eval_shape checks without the file.
SMOLLM2_135M = LlamaConfig(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536,
    rope_theta=100000.0, norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2,
    name="SmolLM2-135M-Instruct",
)
