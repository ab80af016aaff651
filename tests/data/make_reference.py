"""Golden reference data for SmolLM2-135M-Instruct, produced by an independent stack (torch + transformers).

Usage (in a separate environment with torch, transformers, accelerate and gguf; the tests never import these):

    python tests/data/make_reference.py /path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Writes, next to this script:

- ``smollm2_reference.json``: for three chat prompts, the templated prompt text and ids, 24 greedy tokens
  (plain argmax, EOS not treated specially), their text, and the top-1 minus top-2 logit margin at every step
  so that tests can tolerate documented near-ties.
- ``smollm2_last_logits.npy``: float32 [3, vocab] logits at the last prompt position of each prompt.
- ``tokenizer_reference.json``: ids and decodes for a set of awkward strings.

The model is the GGUF dequantized to float32 by transformers. Greedy decoding re-runs the full forward pass
at every step, with no KV cache, so the reference shares no caching logic with the code under test.

About the tokenizer reference: transformers builds a GGUF ``gpt2`` tokenizer with GPT-2's pre-tokenizer and
ignores ``tokenizer.ggml.pre = "smollm"``. llama.cpp (and SmolLM2's own ``tokenizer.json``) first isolate every
numeric character, then apply the GPT-2 split. The two only disagree when a run of two or more whitespace
characters precedes a digit (GPT-2 leaves the last space to join the number; isolating digits first keeps the
run whole). Each string therefore records ``ids_hf_gguf`` (transformers as shipped) and ``ids`` (the same
transformers tokenizer with its pre-tokenizer set to the smollm rule, which is what the model was trained with).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Regex, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent

PROMPTS = [
    "List three facts about the Moon.",
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
]
N_GREEDY = 24

TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple    inner     spaces",
    "line one\nline two\n\nline four",
    "\ttab\tseparated\tvalues\t",
    "mixed \n\t whitespace \r\n end",
    "12345 3.14159",
    "x  12 and y   345\n  6",
    "def add(a, b):\n    return a + b  # sum\n",
    'if (x != 0) { printf("%d\\n", x); }',
    "Café, naïve, résumé, Ångström",
    "東京は日本の首都です。",
    "안녕하세요 세계",
    "Привет, мир!",
    "emoji: 🚀🌕 👩\u200d💻 ok",
    "combining: e\u0301 a\u0300 n\u0303",
    "<|im_start|>user\nHi<|im_end|>\n",
    "text before<|im_end|>text after",
    "<|endoftext|><|im_start|>",
    "don't won't I'll you're we've",
    "ALL CAPS and MiXeD CaSe",
    "",
    "   ",
    "a" * 40,
    # SmolLM2's vocabulary lacks the bytes 04 06 13 14 16 1d c0 c1 f1 f2 f5-ff: such characters are dropped.
    "a\x04b\x1dc",
    "x\U00040000y",
]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _smollm_pre_tokenizer():
    # llama.cpp's SMOLLM rule: split off every \p{N} character, then the GPT-2 regex (inside ByteLevel).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _chat_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; 4.x returned a plain list.
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


@torch.no_grad()
def _greedy(model, prompt_ids: list[int]) -> tuple[list[int], list[float], np.ndarray]:
    ids = list(prompt_ids)
    out, margins, first_logits = [], [], None
    for _ in range(N_GREEDY):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        if first_logits is None:
            first_logits = logits.numpy().astype(np.float32)
        top2 = torch.topk(logits, 2).values
        nxt = int(torch.argmax(logits))
        margins.append(float(top2[0] - top2[1]))
        out.append(nxt)
        ids.append(nxt)
    return out, margins, first_logits


def main(gguf_path: str) -> None:
    gguf_path = os.path.abspath(gguf_path)
    folder, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()

    records, last_logits = [], []
    for prompt in PROMPTS:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = _chat_ids(tok, prompt)
        greedy_ids, margins, logits = _greedy(model, prompt_ids)
        last_logits.append(logits)
        records.append(
            {
                "prompt": prompt,
                "prompt_text": text,
                "prompt_ids": prompt_ids,
                "greedy_ids": greedy_ids,
                "greedy_text": tok.decode(greedy_ids),
                "greedy_margin": margins,
            }
        )
        print(f"{prompt!r} -> {tok.decode(greedy_ids)!r} (min margin {min(margins):.4f})")

    meta = {
        "gguf_file": name,
        "gguf_sha256": _sha256(gguf_path),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": "float32 (GGUF dequantized by transformers)",
        "n_greedy": N_GREEDY,
        "decoding": "argmax over full forward passes without a KV cache; EOS not special-cased",
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "vocab_size": len(tok),
    }
    with open(HERE / "smollm2_reference.json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "prompts": records}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    np.save(HERE / "smollm2_last_logits.npy", np.stack(last_logits).astype(np.float32))

    hf_ids = [tok.encode(s, add_special_tokens=False) for s in TOKENIZER_STRINGS]
    tok.backend_tokenizer.pre_tokenizer = _smollm_pre_tokenizer()
    cases = []
    for s, ids_hf in zip(TOKENIZER_STRINGS, hf_ids, strict=True):
        ids = tok.encode(s, add_special_tokens=False)
        cases.append(
            {
                "text": s,
                "ids": ids,
                "ids_hf_gguf": ids_hf,
                "decode": tok.decode(ids),
                "tokens": tok.convert_ids_to_tokens(ids),
            }
        )
    tok_meta = {
        "gguf_file": name,
        "gguf_sha256": meta["gguf_sha256"],
        "transformers": transformers.__version__,
        "how": "AutoTokenizer.from_pretrained(dir, gguf_file=...).encode(text, add_special_tokens=False)",
        "ids": "transformers' GGUF tokenizer with the pre-tokenizer set to llama.cpp's 'smollm' rule "
        "(isolate each \\p{N}, then the GPT-2 split); decode and tokens are for these ids",
        "ids_hf_gguf": "transformers' GGUF tokenizer as shipped (GPT-2 split only; ignores tokenizer.ggml.pre); "
        "differs from ids only where 2+ whitespace characters precede a digit",
    }
    with open(HERE / "tokenizer_reference.json", "w", encoding="utf-8") as f:
        json.dump({"meta": tok_meta, "cases": cases}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    n_diff = sum(c["ids"] != c["ids_hf_gguf"] for c in cases)
    print(f"wrote references to {HERE} ({n_diff} strings where the smollm split differs from transformers')")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
