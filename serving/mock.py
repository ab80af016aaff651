"""A mock model whose outputs can be worked out by hand, for tests and demos (`--model mock`).

It is a real Llama-family model (so the server runs the same compiled code as for a real one) with chosen
weights: one layer whose attention and MLP write nothing to the residual stream, one-hot embeddings, and an
output head that maps the last token to its successor. The tokenizer is character-level (every printable
ASCII character and newline is one token) with ChatML markers.

Greedy continuation, token by token (`successor`):

    "\\n" -> "a", "a" -> "b", ..., "y" -> "z", "z" -> <|im_end|> (a stop token)
    " " -> "w"
    a digit d -> d + 1 (mod 10), so digits never stop
    anything else -> " "

The successor gets logit 10 and the space logit 5, everything else 0, so when a gate masks the successor
the space is the next choice. A chat answer (the prompt ends with "<|im_start|>assistant\\n") is therefore
"abcdefghijklmnopqrstuvwxyz" followed by the stop token; a completion of "hello" is "pqrstuvwxyz".
"""

from __future__ import annotations

import string

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers

from models.config import LlamaConfig
from models.loader import LoadedModel
from models.tokenizer import Tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIALS", "load_mock", "mock_reply", "successor"]

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_END = "<|im_end|>"


def successor(c: str) -> str:
    """The mock model's greedy next token after the character (or special token) `c`."""
    if c == "\n":
        return "a"
    if c == "z":
        return _END
    if c in string.ascii_lowercase:
        return chr(ord(c) + 1)
    if c == " ":
        return "w"
    if c in string.digits:
        return str((int(c) + 1) % 10)
    return " "


def mock_reply(last: str, max_tokens: int) -> str:
    """The greedy, ungated output after a prompt ending in `last`, up to `max_tokens` tokens (stop excluded)."""
    out, c = [], last
    for _ in range(max_tokens):
        c = successor(c)
        if c == _END:
            break
        out.append(c)
    return "".join(out)


def _tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(CHARS)})
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, bos_id=1, eos_id=0, pad_id=0, stop_ids=[vocab[_END]], chat_template=CHAT_TEMPLATE,
                     byte_scheme="raw")


def load_mock(max_seq_len: int = 4096) -> LoadedModel:
    """The mock model and its tokenizer (see the module docstring)."""
    tok = _tokenizer()
    V = tok.vocab_size
    cfg = LlamaConfig(vocab_size=V, d_model=V, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=8,
                      rope_theta=10000.0, norm_eps=1e-6, max_seq_len=max_seq_len, tie_embeddings=False,
                      bos_id=1, eos_id=0, pad_id=0, name="aqjax-mock")
    rng = np.random.default_rng(0)
    L, D, N, K, H, F = 1, V, 2, 1, 8, 8
    ids = {tok.id_to_token(i): i for i in range(V)}
    head = np.zeros((D, V), np.float32)
    for c in CHARS + "".join(()):
        head[ids[c], ids[successor(c)]] += 10.0
        head[ids[c], ids[" "]] += 5.0
    for t in SPECIALS:  # after a marker, start a fresh alphabet
        head[ids[t], ids["a"]] += 10.0
    params = {
        "embed": np.eye(V, D, dtype=np.float32),
        "layers": {
            "attn_norm": np.ones((L, D), np.float32),
            "wq": rng.normal(size=(L, D, N, H)).astype(np.float32),
            "wk": rng.normal(size=(L, D, K, H)).astype(np.float32),
            "wv": rng.normal(size=(L, D, K, H)).astype(np.float32),
            "wo": np.zeros((L, N, H, D), np.float32),  # attention writes nothing
            "mlp_norm": np.ones((L, D), np.float32),
            "w_gate": rng.normal(size=(L, D, F)).astype(np.float32),
            "w_up": rng.normal(size=(L, D, F)).astype(np.float32),
            "w_down": np.zeros((L, F, D), np.float32),  # neither does the MLP
        },
        # rms(one-hot) = sqrt(1 / D): scale back to a unit vector, so logits are exactly the head's entries
        "final_norm": np.full((D,), np.sqrt(1.0 / D), np.float32),
        "lm_head": head,
    }
    return LoadedModel(cfg=cfg, params=params, tokenizer=tok, source="mock")
