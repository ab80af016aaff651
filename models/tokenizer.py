"""Text <-> token ids, chat templates and streaming detokenization.

The tokenizer is rebuilt from a GGUF file's own metadata (or read from a Hugging Face ``tokenizer.json``) on top
of the Rust ``tokenizers`` library. It is self-contained once built: ``to_json`` captures everything, so a
checkpoint can carry its tokenizer.
"""

from __future__ import annotations

import codecs
import datetime
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

__all__ = ["StreamDecoder", "Tokenizer", "TokenizerError"]

_JSON_FORMAT = "aqjax-tokenizer"
_JSON_VERSION = 1

# llama.cpp's token types (tokenizer.ggml.token_type).
_TYPE_NORMAL, _TYPE_CONTROL, _TYPE_USER_DEFINED = 1, 3, 4

# Tokens that end a turn in the common chat formats; any present (and marked control, when types are known)
# joins eos in `stop_ids`.
_END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<|return|>",
    "<|call|>",
)

# Split patterns of the pre-tokenizers named by tokenizer.ggml.pre, as llama.cpp defines them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# GPT-2 split alone; GPT-2 split after isolating every digit (SmolLM's tokenizer.json: Digits + ByteLevel);
# one regex fed to a ByteLevel that does no further splitting.
_PRE_GPT2 = ("default", "gpt2", "mpt", "olmo", "jais", "trillion")
_PRE_DIGITS_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_PRE_REGEX = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), _QWEN2_SPLIT),
}


class TokenizerError(ValueError):
    """Tokenizer metadata is missing or malformed, or an input cannot be tokenized or templated."""


@functools.cache
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's reversible byte <-> printable character map, as (byte->char, char->byte)."""
    # Printable Latin-1 bytes stand for themselves; every other byte is shifted to 256+ so that no token
    # contains whitespace or control characters.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    to_char, extra = {}, 0
    for b in range(256):
        if b in keep:
            to_char[b] = chr(b)
        else:
            to_char[b] = chr(256 + extra)
            extra += 1
    return to_char, {c: b for b, c in to_char.items()}


def _byte_level_bytes(token: str) -> bytes:
    # Like the ByteLevel decoder: a token spelled in the byte alphabet maps back to its bytes; anything else
    # (an added token stored as raw text) is its own UTF-8.
    to_byte = _byte_alphabet()[1]
    try:
        return bytes(to_byte[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _spm_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")


def _as_str_list(meta: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> list[str] | None:
    value = meta.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"{where}: metadata key {key!r} is missing")
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TokenizerError(f"{where}: metadata key {key!r} must be a list of strings, got {type(value).__name__}")
    if not all(isinstance(v, str) for v in value):
        bad = next(v for v in value if not isinstance(v, str))
        raise TokenizerError(f"{where}: metadata key {key!r} must hold strings, found {type(bad).__name__}")
    return list(value)


def _as_id(meta: Mapping[str, Any], key: str, where: str, n: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(value)  # numpy integers
        except (TypeError, ValueError):
            raise TokenizerError(f"{where}: metadata key {key!r} must be an integer, got {value!r}") from None
    if not 0 <= value < n:
        raise TokenizerError(f"{where}: metadata key {key!r} = {value} is outside the vocabulary (size {n})")
    return value


def _gguf_pre_tokenizer(pre: str, where: str) -> pre_tokenizers.PreTokenizer:
    if pre in _PRE_GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_GPT2:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in _PRE_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    known = sorted({*_PRE_GPT2, *_PRE_DIGITS_GPT2, *_PRE_REGEX})
    raise TokenizerError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported (known: {', '.join(known)})")


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    # Same environment settings as transformers' apply_chat_template, so templates render identically; the
    # sandbox keeps a template from a downloaded file from reaching Python internals.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}") from e


def _check_messages(messages) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"messages[{i}]['role'] must be a non-empty string, got {role!r}")
        content = m.get("content")
        # An assistant turn that only calls tools may have no text.
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise TokenizerError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")


class Tokenizer:
    """A byte-level (or sentencepiece-style) BPE tokenizer with its special ids and chat template.

    Attributes:
      vocab_size: number of ids (one more than the largest id).
      bos_id: beginning-of-sequence id (eos when the vocabulary has none).
      eos_id: end-of-sequence id.
      pad_id: padding id (eos when the vocabulary has none).
      stop_ids: eos first, then every end-of-turn token of the vocabulary.
      special_ids: ids of special (control) tokens; `decode(..., skip_special=True)` drops them.
      chat_template: jinja2 source, or None.
      add_bos_default: whether the model's files ask for BOS at the start of a prompt.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int,
        stop_ids: Iterable[int] = (),
        chat_template: str | None = None,
        byte_scheme: str = "byte_level",
        add_bos_default: bool = False,
    ):
        if byte_scheme not in ("byte_level", "sentencepiece", "raw"):
            raise TokenizerError(f"unknown byte scheme {byte_scheme!r}")
        self._backend = backend
        self._byte_scheme = byte_scheme
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        for name, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id), *(("stop", s) for s in stop_ids)):
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise TokenizerError(f"{name} id {i!r} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.stop_ids = tuple(dict.fromkeys([eos_id, *stop_ids]))
        self.special_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special and i < self.vocab_size
        )
        self.chat_template = chat_template
        self.add_bos_default = bool(add_bos_default)
        self._plain_backend: tokenizers.Tokenizer | None = None
        self._token_bytes: tuple[bytes, ...] | None = None

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, where: str = "GGUF") -> Tokenizer:
        """Builds the tokenizer a GGUF file describes.

        Args:
          meta: the file's decoded key/value metadata (strings, ints, lists).
          where: names the source in error messages (e.g. the file path).

        Raises:
          TokenizerError: a key is missing or malformed, naming it.
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.model' is missing")
        if kind != "gpt2":
            raise TokenizerError(
                f"{where}: tokenizer.ggml.model = {kind!r} is not supported (only byte-level BPE, 'gpt2')"
            )
        tokens = _as_str_list(meta, "tokenizer.ggml.tokens", where)
        merges = _as_str_list(meta, "tokenizer.ggml.merges", where)
        n = len(tokens)
        if n == 0:
            raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.tokens' is empty")
        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            types = [_TYPE_NORMAL] * n
        else:
            try:
                types = [int(t) for t in types]
            except (TypeError, ValueError):
                raise TokenizerError(
                    f"{where}: metadata key 'tokenizer.ggml.token_type' must be a list of ints"
                ) from None
            if len(types) != n:
                raise TokenizerError(
                    f"{where}: metadata key 'tokenizer.ggml.token_type' has {len(types)} entries for {n} tokens"
                )
        pre = meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str):
            raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.pre' must be a string, got {pre!r}")

        to_char = _byte_alphabet()[0]
        alphabet = set(to_char.values())
        vocab: dict[str, int] = {}
        for i, (tok, ty) in enumerate(zip(tokens, types, strict=True)):
            if ty == _TYPE_NORMAL and not set(tok) <= alphabet:
                # A normal token stored as raw text; respell it in the byte alphabet so BPE can reach it.
                tok = "".join(to_char[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)  # duplicates keep their first id, as llama.cpp's text->id map does
        pairs = []
        for j, m in enumerate(merges):
            parts = m.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.merges'[{j}] = {m!r} is not 'a b'")
            pairs.append((parts[0], parts[1]))
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
        except Exception as e:  # the Rust side reports merges that name unknown tokens
            raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.merges' is inconsistent: {e}") from e
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _gguf_pre_tokenizer(pre, where)
        backend.decoder = decoders.ByteLevel()
        # Control tokens are matched whole in text and are special; user-defined ones are matched whole but
        # are ordinary text when decoding.
        control = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TYPE_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _TYPE_USER_DEFINED
        ]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)
        if backend.get_vocab_size(with_added_tokens=True) > n:
            raise TokenizerError(f"{where}: added tokens do not all map onto 'tokenizer.ggml.tokens'")

        eos = _as_id(meta, "tokenizer.ggml.eos_token_id", where, n)
        if eos is None:
            raise TokenizerError(f"{where}: metadata key 'tokenizer.ggml.eos_token_id' is missing")
        bos = _as_id(meta, "tokenizer.ggml.bos_token_id", where, n)
        pad = _as_id(meta, "tokenizer.ggml.padding_token_id", where, n)
        stops = [
            i
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (i := _as_id(meta, key, where, n)) is not None
        ]
        for name in _END_OF_TURN:
            i = vocab.get(name)
            if i is not None and tokens[i] == name and types[i] == _TYPE_CONTROL:
                stops.append(i)
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{where}: metadata key 'tokenizer.chat_template' must be a string")
        return cls(
            backend,
            bos_id=eos if bos is None else bos,
            eos_id=eos,
            pad_id=eos if pad is None else pad,
            stop_ids=sorted(set(stops)),
            chat_template=template,
            byte_scheme="byte_level",
            add_bos_default=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a Hugging Face tokenizer folder.

        Uses ``tokenizer.json``, plus ``tokenizer_config.json`` (special tokens, chat template),
        ``chat_template.jinja`` and ``generation_config.json`` (extra stop ids) when present.

        Raises:
          TokenizerError: the folder has no usable tokenizer, or no end-of-sequence token can be found.
        """
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(file)
        except Exception as e:
            raise TokenizerError(f"{file}: cannot read a tokenizer: {e}") from e

        def read_json(name: str) -> dict:
            p = os.path.join(path, name)
            if not os.path.exists(p):
                return {}
            try:
                with open(p, encoding="utf-8") as f:
                    out = json.load(f)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{p}: {e}") from e
            if not isinstance(out, dict):
                raise TokenizerError(f"{p}: expected a JSON object")
            return out

        config, generation = read_json("tokenizer_config.json"), read_json("generation_config.json")

        def special(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, Mapping):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        template = config.get("chat_template")
        if isinstance(template, list):  # named templates; the default one is the chat template
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        eos = special("eos_token")
        gen_eos = generation.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if eos is None and gen_eos:
            eos = gen_eos[0]
        if eos is None:
            eos = next((i for t in _END_OF_TURN if (i := backend.token_to_id(t)) is not None), None)
        if eos is None:
            raise TokenizerError(f"{path}: cannot tell the end-of-sequence token (no eos_token)")
        bos, pad = special("bos_token"), special("pad_token")
        added = backend.get_added_tokens_decoder()
        stops = [i for i in gen_eos if isinstance(i, int)]
        stops += [i for i, t in added.items() if t.special and t.content in _END_OF_TURN]
        return cls(
            backend,
            bos_id=eos if bos is None else bos,
            eos_id=eos,
            pad_id=eos if pad is None else pad,
            stop_ids=sorted(set(stops)),
            chat_template=template if isinstance(template, str) else None,
            byte_scheme=_hf_byte_scheme(backend),
            add_bos_default=bool(config.get("add_bos_token", False)),
        )

    def to_parts(self) -> tuple[str, dict]:
        """(the backend's native HF tokenizer.json text, the aqjax settings around it as a small dict)."""
        meta = {
            "format": _JSON_FORMAT,
            "version": _JSON_VERSION,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "stop_ids": list(self.stop_ids),
            "chat_template": self.chat_template,
            "byte_scheme": self._byte_scheme,
            "add_bos_default": self.add_bos_default,
        }
        return self._backend.to_str(), meta

    @classmethod
    def from_parts(cls, backend_json: str, meta: Mapping[str, Any]) -> Tokenizer:
        """Inverse of `to_parts`. The backend text is parsed by the Rust library only (fast for big vocabularies)."""
        if not isinstance(meta, Mapping) or meta.get("format") != _JSON_FORMAT:
            raise TokenizerError("not an aqjax tokenizer JSON (missing 'format')")
        if meta.get("version") != _JSON_VERSION:
            raise TokenizerError(f"tokenizer JSON version {meta.get('version')!r} is not {_JSON_VERSION}")
        try:
            backend = tokenizers.Tokenizer.from_str(backend_json)
            return cls(
                backend,
                bos_id=meta["bos_id"],
                eos_id=meta["eos_id"],
                pad_id=meta["pad_id"],
                stop_ids=meta["stop_ids"],
                chat_template=meta["chat_template"],
                byte_scheme=meta["byte_scheme"],
                add_bos_default=meta["add_bos_default"],
            )
        except KeyError as e:
            raise TokenizerError(f"tokenizer JSON lacks {e}") from e
        except TokenizerError:
            raise
        except Exception as e:
            raise TokenizerError(f"tokenizer JSON is malformed: {e}") from e

    def to_json(self) -> str:
        """Serializes the whole tokenizer (vocabulary, merges, special ids, chat template) as one JSON string."""
        backend, meta = self.to_parts()
        return json.dumps({**meta, "backend": json.loads(backend)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Tokenizer:
        """Inverse of `to_json`."""
        try:
            d = json.loads(s)
        except ValueError as e:
            raise TokenizerError(f"tokenizer JSON does not parse: {e}") from e
        if not isinstance(d, dict) or "backend" not in d:
            raise TokenizerError("not an aqjax tokenizer JSON (missing 'format' or 'backend')")
        return cls.from_parts(json.dumps(d.pop("backend")), d)

    # ------------------------------------------------------------------------------------------------ using

    def encode(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text`.

        Args:
          text: the text.
          add_bos: put `bos_id` first.
          parse_special: match special tokens written in the text (``<|im_start|>`` -> one id). Pass False
            for untrusted text so that it cannot forge control tokens; they are then tokenized as plain text.

        Bytes that have no token in the vocabulary are dropped, as transformers and llama.cpp do (SmolLM2 lacks
        a few control characters and the lead bytes of U+40000..U+BFFFF).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self._pick(parse_special).encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], *, parse_special: bool = True) -> list[list[int]]:
        """`encode` of each text (no BOS), tokenized in parallel."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("encode_batch takes a list of str")
        return [e.ids for e in self._pick(parse_special).encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Text of `ids` (any iterable of ints, numpy/jax arrays included); invalid UTF-8 becomes U+FFFD."""
        return self._backend.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        """The stored spelling of token `i` (byte-level tokens are in GPT-2's byte alphabet, e.g. 'Ġthe')."""
        (i,) = self._check_ids([i])
        tok = self._backend.id_to_token(i)
        if tok is None:
            raise TokenizerError(f"id {i} has no token")
        return tok

    def token_to_id(self, s: str) -> int | None:
        """Id of the token spelled `s`, or None."""
        return self._backend.token_to_id(s)

    def token_bytes(self) -> list[bytes]:
        """The raw bytes each id stands for (index = id); special tokens give their text's UTF-8."""
        if self._token_bytes is None:
            to_bytes = {"byte_level": _byte_level_bytes, "sentencepiece": _spm_bytes}.get(
                self._byte_scheme, lambda t: t.encode("utf-8")
            )
            added = self._backend.get_added_tokens_decoder()
            out = []
            for i in range(self.vocab_size):
                tok = self._backend.id_to_token(i)
                if tok is None:
                    out.append(b"")
                elif i in added and self._byte_scheme != "byte_level":
                    out.append(added[i].content.encode("utf-8"))
                else:
                    out.append(to_bytes(tok))
            self._token_bytes = tuple(out)
        return list(self._token_bytes)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, **extra
    ) -> str:
        """Renders a conversation with the model's chat template (sandboxed jinja2).

        Args:
          messages: dicts with string 'role' and 'content' (more keys are passed to the template).
          add_generation_prompt: end with the header of an assistant turn.
          tools: tool descriptions for templates that support them.
          **extra: more template variables (e.g. ``enable_thinking``).

        Returns:
          The prompt text; encode it with `encode` (special tokens in it become single ids).

        Raises:
          TokenizerError: no template, malformed messages, or the template failed or raised.
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template")
        _check_messages(messages)
        template = _compile_template(self.chat_template)
        variables = dict(extra)
        variables.update(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special_text(self.bos_id),
            eos_token=self._special_text(self.eos_id),
        )
        if tools is not None:
            variables["tools"] = tools
        try:
            return template.render(**variables)
        except TokenizerError:
            raise
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"stop_ids={self.stop_ids}, chat_template={'yes' if self.chat_template else 'no'})"
        )

    # ------------------------------------------------------------------------------------------------ private

    def _special_text(self, i: int) -> str:
        return self._backend.id_to_token(i) or ""

    def _pick(self, parse_special: bool) -> tokenizers.Tokenizer:
        if parse_special:
            return self._backend
        if self._plain_backend is None:
            # A separate copy, so the shared backend's setting never flips under a concurrent caller.
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        return self._plain_backend

    def _check_ids(self, ids) -> list[int]:
        if hasattr(ids, "tolist"):  # numpy / jax arrays
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"token ids must be integers: {e}") from e
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        return out


def _hf_byte_scheme(backend: tokenizers.Tokenizer) -> str:
    """How a tokenizer.json's tokens map to bytes, read off its decoder."""
    spec = json.loads(backend.to_str()).get("decoder") or {}
    kinds = set()

    def walk(d):
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            for d2 in d.get("decoders") or ():
                walk(d2)

    walk(spec)
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace", "Replace"}:
        return "sentencepiece"
    return "raw"


class StreamDecoder:
    """Incremental detokenizer: feed ids as they are generated, get the text that is complete so far.

    Bytes that do not yet form a whole UTF-8 character are held back until a later token completes them, so
    every returned piece is valid text and the pieces concatenate to the full decode. For byte-level
    vocabularies that equals `Tokenizer.decode(all_ids, skip_special=...)`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True):
        self._bytes = tokenizer.token_bytes()
        self._vocab_size = tokenizer.vocab_size
        self._skip = tokenizer.special_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids) -> str:
        """Feeds one id or a sequence of ids; returns the newly completed text (possibly empty)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        chunk = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self._vocab_size})")
            if i not in self._skip:
                chunk += self._bytes[i]
        return self._utf8.decode(bytes(chunk))

    def flush(self) -> str:
        """Ends the stream: returns held-back bytes (as U+FFFD if they never completed) and resets."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
