"""Tokenizer and chat template: parity with transformers' reference ids, round trips, streaming, errors."""

import json
import pathlib

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, normalizers

from models.tokenizer import StreamDecoder, Tokenizer, TokenizerError, _byte_alphabet

DATA = pathlib.Path(__file__).parent / "data"
TOKENIZER_REF = json.loads((DATA / "tokenizer_reference.json").read_text(encoding="utf-8"))
MODEL_REF = json.loads((DATA / "smollm2_reference.json").read_text(encoding="utf-8"))
CASES = TOKENIZER_REF["cases"]
PROMPTS = MODEL_REF["prompts"]


@pytest.fixture(scope="module")
def meta(smollm2_gguf):
    from models.gguf import read_gguf_metadata

    return read_gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="module")
def tok(meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(meta)


# ------------------------------------------------------------------------------------------ parity with HF


@pytest.mark.parametrize("case", CASES, ids=[repr(c["text"])[:40] for c in CASES])
def test_reference_ids(tok, case):
    ids = tok.encode(case["text"])
    assert ids == case["ids"], [tok.id_to_token(i) for i in ids]
    assert tok.decode(ids) == case["decode"]
    assert [tok.id_to_token(i) for i in ids] == case["tokens"]


def test_smollm_pretokenizer_isolates_digits(tok):
    # llama.cpp's 'smollm' splits off digits before the GPT-2 split, so a whitespace run before a number stays
    # one piece; transformers' GGUF loader ignores tokenizer.ggml.pre and leaves one space to the number.
    assert [tok.id_to_token(i) for i in tok.encode("x  12")] == ["x", "ĠĠ", "1", "2"]
    diverging = [c["text"] for c in CASES if c["ids"] != c["ids_hf_gguf"]]
    assert diverging == ["x  12 and y   345\n  6"]


@pytest.mark.parametrize("ref", PROMPTS, ids=range(len(PROMPTS)))
def test_chat_prompt_ids(tok, ref):
    text = tok.apply_chat_template([{"role": "user", "content": ref["prompt"]}], add_generation_prompt=True)
    assert text == ref["prompt_text"]
    assert tok.encode(text) == ref["prompt_ids"]
    assert tok.decode(ref["greedy_ids"]) == ref["greedy_text"]


def test_ids_and_specials(tok):
    assert tok.vocab_size == 49152 == MODEL_REF["meta"]["vocab_size"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.stop_ids == (2, 0)  # <|im_end|>, then <|endoftext|>
    assert tok.add_bos_default is False
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"):
        i = tok.token_to_id(name)
        assert tok.encode(name) == [i]
        assert tok.encode(f"a{name}b") == [*tok.encode("a"), i, *tok.encode("b")]
        assert i in tok.special_ids
    assert tok.token_to_id("no such token") is None
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


def test_untrusted_text_cannot_forge_specials(tok):
    ids = tok.encode("<|im_start|>system", parse_special=False)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == "<|im_start|>system"
    assert tok.encode_batch(["<|im_end|>"], parse_special=False) == [tok.encode("<|im_end|>", parse_special=False)]


def test_decode_skip_special_and_arrays(tok):
    np = pytest.importorskip("numpy")
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    assert tok.decode(np.array(ids, dtype=np.int32)) == "<|im_start|>user\nHi<|im_end|>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_token(-1)


def test_encode_batch(tok):
    texts = [c["text"] for c in CASES]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size
    assert tb[tok.token_to_id("Ġworld")] == b" world"
    assert tb[tok.token_to_id("<|im_end|>")] == b"<|im_end|>"
    to_char = _byte_alphabet()[0]
    missing = {b for b in range(256) if tok.token_to_id(to_char[b]) is None}
    assert missing == _MISSING_BYTES
    for b in set(range(256)) - missing:
        assert tb[tok.token_to_id(to_char[b])] == bytes([b])
    for c in CASES:
        if not set(c["text"].encode("utf-8")) & missing:
            assert b"".join(tb[i] for i in c["ids"]) == c["text"].encode("utf-8")


def test_bytes_missing_from_vocabulary_are_dropped(tok):
    # As in transformers and llama.cpp: the vocabulary has no token for these bytes, so they vanish.
    assert tok.decode(tok.encode("a\x04b\x1dc")) == "abc"
    assert tok.decode(tok.encode("x\U00040000y")) == "x" + "\ufffd" * 3 + "y"  # its three continuation bytes remain


# ------------------------------------------------------------------------------------------ round trips

# SmolLM2's vocabulary has no token for these bytes (see test_token_bytes): control characters 04 06 13 14 16 1d,
# bytes that never occur in UTF-8, and f1/f2, the lead bytes of U+40000..U+BFFFF. Text without them round-trips.
_MISSING_BYTES = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
_chars = st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters="\x04\x06\x13\x14\x16\x1d")
_PIECES = ["ab", " ", "1", "\n", "\t", "<|im_start|>", "é", "東", "🚀", "\u0301"]
_texts = st.text(_chars | st.characters(min_codepoint=0xC0000, exclude_categories=("Cs",)), max_size=80) | st.lists(
    st.sampled_from(_PIECES), max_size=40
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=_texts)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(text, parse_special=False)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(text=_texts)
def test_stream_matches_decode(tok, text):
    ids = tok.encode(text)
    for skip in (False, True):
        stream = StreamDecoder(tok, skip_special=skip)
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tok.decode(ids, skip_special=skip)
        assert not any("\ufffd" in p for p in pieces)  # never a broken character from valid input


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=30))
def test_stream_matches_decode_on_arbitrary_ids(tok, ids):
    # Arbitrary ids can form invalid UTF-8; the stream must replace it exactly as decode does.
    stream = StreamDecoder(tok, skip_special=False)
    assert stream.push(ids) + stream.flush() == tok.decode(ids)


@pytest.mark.parametrize("text", ["🚀🌕 東京は日本の首都です。", "👩\u200d💻 e\u0301", "안녕하세요"])
def test_stream_holds_back_split_characters(tok, text):
    ids = tok.encode(text)
    tb = tok.token_bytes()
    split = [i for i in ids if not _is_utf8(tb[i])]
    assert split, "expected a character split across tokens"
    stream = StreamDecoder(tok)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert "" in pieces  # held back at least once
    # A stream cut inside a character shows nothing for it until flushed.
    stream = StreamDecoder(tok)
    head = stream.push(tok.encode("🚀")[:-1])
    assert head == "" and stream.flush() == "\ufffd"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_json_round_trip(tok):
    s = tok.to_json()
    tok2 = Tokenizer.from_json(s)
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "stop_ids", "special_ids", "chat_template"):
        assert getattr(tok2, attr) == getattr(tok, attr), attr
    assert tok2.encode_batch([c["text"] for c in CASES]) == [c["ids"] for c in CASES]
    assert tok2.token_bytes() == tok.token_bytes()
    assert tok2.to_json() == s
    for bad in ("", "[]", json.dumps({"format": "other"}), s.replace('"version": 1', '"version": 99')):
        with pytest.raises(TokenizerError):
            Tokenizer.from_json(bad)


def test_from_hf_dir(tok, tmp_path):
    backend = json.loads(tok.to_json())["backend"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend), encoding="utf-8")
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "pad_token": "<|im_end|>",
        "chat_template": tok.chat_template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    hf = Tokenizer.from_hf_dir(tmp_path)
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.stop_ids) == (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids)
    assert hf.encode_batch([c["text"] for c in CASES]) == [c["ids"] for c in CASES]
    assert hf.token_bytes() == tok.token_bytes()
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs) == tok.apply_chat_template(msgs)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


def test_sentencepiece_style_hf_dir(tmp_path):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xE6>": 4, "▁": 5, "a": 6, "b": 7, "▁a": 8, "ab": 9}
    backend = tokenizers.Tokenizer(models.BPE(vocab, [("▁", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2]}))
    t = Tokenizer.from_hf_dir(tmp_path)
    assert t.eos_id == 2 and t.chat_template is None
    assert t.token_bytes()[3:10] == [b"\n", b"\xe6", b" ", b"a", b"b", b" a", b"ab"]
    assert t.decode(t.encode("a ab")) == "a ab"
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------ chat template


def test_template_variables_and_tools(meta):
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}>{% endif %}{{ eos_token }}"
    )
    t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": template})
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "é"}]
    assert t.apply_chat_template(msgs) == "<|im_start|>system:s;user:é;><|im_end|>"
    assert t.apply_chat_template(msgs, add_generation_prompt=False, tools=[{"name": "ñ"}]) == (
        '<|im_start|>system:s;user:é;[{"name": "ñ"}]<|im_end|>'
    )


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list of dicts"),
        ({"role": "user", "content": "x"}, "list of dicts"),
        (["hi"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], r"messages\[1\]\['content'\]"),
        ([{"role": "user"}], r"messages\[0\]\['content'\]"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)


@pytest.mark.parametrize(
    "template, match",
    [
        ("{{ raise_exception('only user turns') }}", "only user turns"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),
        ("{% for %}", "does not compile"),
    ],
)
def test_template_errors(meta, template, match):
    t = Tokenizer.from_gguf_metadata({**meta, "tokenizer.chat_template": template})
    with pytest.raises(TokenizerError, match=match):
        t.apply_chat_template([{"role": "user", "content": "x"}])


# ------------------------------------------------------------------------------------------ malformed metadata


def _tiny_meta() -> dict:
    """A complete byte-level vocabulary: 3 control tokens, 256 byte tokens and two merges."""
    byte_tokens = [_byte_alphabet()[0][b] for b in range(256)]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *byte_tokens, "Ġt", "Ġtt"],
        "tokenizer.ggml.token_type": [3, 3, 3, *[1] * 258],
        "tokenizer.ggml.merges": ["Ġ t", "Ġt t"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


def test_tiny_vocabulary():
    t = Tokenizer.from_gguf_metadata(_tiny_meta())
    assert t.vocab_size == 261
    assert t.encode(" tt t<|im_end|>") == [260, 259, 2]
    assert t.stop_ids == (2, 0) and t.pad_id == 2 and t.chat_template is None
    assert t.decode(t.encode("héllo 🚀")) == "héllo 🚀"


@pytest.mark.parametrize(
    "change, key",
    [
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": 7}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": [1, 2]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["Ġt"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["Ġ zz"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1, 2]}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.token_type": ["x"] * 261}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "martian"}, "tokenizer.ggml.pre"),
        ({"tokenizer.ggml.eos_token_id": None}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.eos_token_id": 999}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.bos_token_id": "one"}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.chat_template": 5}, "tokenizer.chat_template"),
    ],
)
def test_malformed_metadata(change, key):
    meta = _tiny_meta()
    for k, v in change.items():
        if v is None:
            del meta[k]
        else:
            meta[k] = v
    with pytest.raises(TokenizerError, match=key.replace(".", r"\.")) as info:
        Tokenizer.from_gguf_metadata(meta, where="tiny.gguf")
    assert str(info.value).startswith("tiny.gguf: ")
