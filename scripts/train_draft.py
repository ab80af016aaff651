"""Trains a small draft model for speculative decoding by distillation from the target, on the target's own text.

Usage:  python scripts/train_draft.py [--model PATH] [--out DIR] [--layers 2] [--steps 300] [--json out.json]

No external data: the target writes the training text itself.
  1. Data: the target answers a set of built-in prompts (explanations, lists, code, advice; half greedy, half
     sampled), then summarizes / extracts from some of its own answers, so the data also holds text grounded
     in a given input, as speculative decoding sees in practice.
  2. Soft targets: the target scores every sequence once (teacher forcing); the top-K next-token
     probabilities at every answer position are kept.
  3. The draft: a `--layers`-layer Llama of the target's width, initialized from the target's first layers,
     final norm and embedding table (shared, frozen: the draft reads the target's table at run time), with its
     own output head over the `--head-vocab` most frequent token ids of the data (a small head keeps a draft
     step cheap: the target's full head alone is a fifth of a decode step's bytes). Trained with optax
     (AdamW, warmup + cosine) on the cross-entropy against the teacher's top-K distribution, on random windows.
  4. Saved with orbax (`aqjax.drafters.save_draft`, default `~/.cache/aqjax/draft-<model>`; not in the
     repository). The record (`aqjax_draft.json` -> meta) holds the data size, the time of every phase, the
     final loss and the acceptance measured by greedy speculative decoding on held-out prompts.

Load it with `aqjax.drafters.load_draft(dir)`, or use `SpeculativeGenerator(gen, "draft")` (default location).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from aqjax.cache import KVCache  # noqa: E402
from aqjax.decode import score  # noqa: E402
from aqjax.drafters import DraftModel, default_draft_dir, save_draft  # noqa: E402
from aqjax.engine import Generator  # noqa: E402
from aqjax.sampling import SamplingConfig  # noqa: E402
from models.llama import forward  # noqa: E402

TOPICS = [
    "the water cycle", "photosynthesis", "the French Revolution", "how vaccines work", "black holes",
    "machine learning", "the history of jazz", "climate change", "healthy sleep habits", "baking bread",
    "the stock market", "volcanoes", "the human heart", "electric cars", "coral reefs", "the printing press",
    "honey bees", "the internet", "renewable energy", "the Great Wall of China", "recycling", "earthquakes",
    "the immune system", "ancient Egypt", "public libraries", "time management", "the Moon landing",
    "rainforests", "chess", "urban gardening", "the solar system", "saving money",
]
TASKS = [
    "Explain {} in simple terms.", "Write a short essay about {}.", "Give me five facts about {}.",
    "What are the advantages and disadvantages of {}?", "Describe {} to a ten-year-old.",
    "Write a short blog post about {}.",
]
CODE = [
    "Write a Python function that reverses a string.", "Write a Python function that computes Fibonacci numbers.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a Python function that counts the words in a text.", "Write a Python function that sorts a list of "
    "dictionaries by a key.", "Write a JavaScript function that checks whether a string is a palindrome.",
    "Explain the difference between a list and a tuple in Python.", "Write a SQL query that finds duplicate emails.",
]
GROUNDED = [
    "Summarize the following text:\n\n{}", "List the main points of the following text:\n\n{}",
    "Extract the key facts from this text:\n\n{}", "Rewrite the following text in simpler words:\n\n{}",
]
# Held out: the acceptance is measured on prompts the draft never saw.
HELD_OUT = [
    "Explain how a rainbow forms.", "Write a short story about a lighthouse keeper.",
    "What are good habits for learning a new language?", "Write a Python function that merges two sorted lists.",
    "Give me three tips for public speaking.", "Describe the life cycle of a butterfly.",
    "Summarize the following text:\n\nThe town council met on Tuesday to discuss the new bicycle lanes. After "
    "a long debate, the members voted to build two lanes along the river and one through the market square. "
    "Work will start in spring and should be finished before the summer festival. Shop owners asked for "
    "loading zones, and the council promised to add them near the bakery and the post office.",
    "What is the difference between weather and climate?",
]


def chat(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def generate_data(gen: Generator, tok, *, new_tokens: int, batch: int, seed: int):
    """(sequences, answer start offsets) written by the target."""
    rng = np.random.default_rng(seed)
    prompts = [t.format(topic) for topic in TOPICS for t in rng.choice(TASKS, 2, replace=False)] + CODE

    def run(texts, temperature_every=2):
        seqs, starts = [], []
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            ids = [chat(tok, t) for t in chunk]
            cfgs = [SamplingConfig(temperature=0.8 if (i + j) % temperature_every else 0.0, top_p=0.95,
                                   seed=seed + i + j) for j in range(len(chunk))]
            for p, r in zip(ids, gen.generate(ids, cfgs, max_new_tokens=new_tokens), strict=True):
                seqs.append(p + r.tokens)
                starts.append(len(p))
        return seqs, starts

    seqs, starts = run(prompts)
    # input-grounded data: the target summarizes / extracts from its own longer answers
    answers = [tok.decode(s[st:], skip_special=True) for s, st in zip(seqs, starts, strict=True)]
    answers = [a for a in answers if len(a) > 300]
    grounded = [GROUNDED[i % len(GROUNDED)].format(a) for i, a in enumerate(answers[: len(answers) // 2])]
    s2, st2 = run(grounded)
    return seqs + s2, starts + st2


def teacher_targets(gen: Generator, seqs, starts, *, top_k: int, batch: int):
    """Per sequence: (top-K token ids [n, K], probabilities [n, K]) for the answer positions (predicting the
    answer's tokens, i.e. positions start-1 .. len-2)."""
    order = np.argsort([len(s) for s in seqs])
    res = [None] * len(seqs)
    for i in range(0, len(seqs), batch):
        idx = order[i:i + batch]
        T = max(len(seqs[j]) for j in idx)
        T = -(-T // 64) * 64
        toks = np.zeros((len(idx), T), np.int32)
        for r, j in enumerate(idx):
            toks[r, :len(seqs[j])] = seqs[j]
        logits = score(gen.params, jnp.asarray(toks), cfg=gen.cfg)
        logp = jax.nn.log_softmax(logits, axis=-1)
        vals, ids = jax.lax.top_k(logp, top_k)
        vals, ids = np.asarray(jnp.exp(vals)), np.asarray(ids)
        for r, j in enumerate(idx):
            a, b = starts[j] - 1, len(seqs[j]) - 1
            res[j] = (ids[r, a:b], vals[r, a:b])
    return res


def choose_vocab(seqs, tok, size: int) -> np.ndarray:
    """The `size` most frequent token ids of the data, topped up with the lowest ids (frequent BPE merges)."""
    counts = np.bincount(np.concatenate([np.asarray(s) for s in seqs]), minlength=tok.vocab_size)
    chosen = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0][:size]
    for special in tok.stop_ids:
        if special not in chosen:
            chosen.append(int(special))
    have = set(chosen)
    i = 0
    while len(chosen) < size:
        if i not in have:
            chosen.append(i)
        i += 1
    return np.asarray(sorted(chosen[:size]), np.int32)


def make_windows(seqs, starts, targets, vocab_ids, *, window: int, top_k: int, vocab_size: int):
    """Arrays of every answer-bearing window: tokens [N, W], soft targets (column, prob) [N, W, K], loss mask."""
    col_of = np.full((vocab_size,), -1, np.int32)
    col_of[vocab_ids] = np.arange(len(vocab_ids))
    toks, cols, probs, mask = [], [], [], []
    for s, st, (ids, p) in zip(seqs, starts, targets, strict=True):
        s = np.asarray(s, np.int32)
        tgt_c = np.zeros((len(s), top_k), np.int32)
        tgt_p = np.zeros((len(s), top_k), np.float32)
        m = np.zeros((len(s),), np.float32)
        c = col_of[ids]
        tgt_c[st - 1:len(s) - 1] = np.maximum(c, 0)
        tgt_p[st - 1:len(s) - 1] = np.where(c >= 0, p, 0.0)
        m[st - 1:len(s) - 1] = 1.0
        # half-overlapping windows over the answer, each with some preceding context
        for a in range(max(0, st - window // 2), len(s) - 1, window // 2):
            b = a + window
            pad = max(0, b - len(s))
            toks.append(np.pad(s[a:b], (0, pad)))
            cols.append(np.pad(tgt_c[a:b], ((0, pad), (0, 0))))
            probs.append(np.pad(tgt_p[a:b], ((0, pad), (0, 0))))
            mask.append(np.pad(m[a:b], (0, pad)))
    return np.stack(toks), np.stack(cols), np.stack(probs), np.stack(mask)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="target model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--out", default=None, help="output dir (default: ~/.cache/aqjax/draft-<model>)")
    ap.add_argument("--layers", type=int, default=2, help="draft layers (2-4)")
    ap.add_argument("--head-vocab", type=int, default=8192)
    ap.add_argument("--new-tokens", type=int, default=160, help="tokens the target writes per prompt")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=16, help="teacher probabilities kept per position")
    ap.add_argument("--window", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=96)
    ap.add_argument("--json", default=None, help="also write the training record here")
    args = ap.parse_args(argv)

    from models.loader import load_model

    t_all = time.perf_counter()
    m = load_model(args.model)
    tok, cfg = m.tokenizer, m.cfg
    gen = Generator(cfg, m.params, stop_ids=tok.stop_ids)
    record: dict = {"target": cfg.name, "layers": args.layers, "head_vocab": args.head_vocab, "steps": args.steps,
                    "batch": args.batch, "window": args.window, "lr": args.lr, "top_k": args.top_k}

    t0 = time.perf_counter()
    seqs, starts = generate_data(gen, tok, new_tokens=args.new_tokens, batch=args.gen_batch, seed=args.seed)
    record["data_sequences"] = len(seqs)
    record["data_answer_tokens"] = int(sum(len(s) - st for s, st in zip(seqs, starts, strict=True)))
    record["time_generate_s"] = round(time.perf_counter() - t0, 1)
    print(f"[data] {len(seqs)} sequences, {record['data_answer_tokens']} answer tokens written by the target "
          f"in {record['time_generate_s']} s", flush=True)

    t0 = time.perf_counter()
    targets = teacher_targets(gen, seqs, starts, top_k=args.top_k, batch=8)
    record["time_teacher_s"] = round(time.perf_counter() - t0, 1)
    print(f"[teacher] top-{args.top_k} soft targets in {record['time_teacher_s']} s", flush=True)

    vocab_ids = choose_vocab(seqs, tok, args.head_vocab)
    toks, cols, probs, mask = make_windows(seqs, starts, targets, vocab_ids, window=args.window, top_k=args.top_k,
                                           vocab_size=cfg.vocab_size)
    covered = float(probs.sum() / max(mask.sum(), 1))
    record["teacher_mass_in_head_vocab"] = round(covered, 4)
    print(f"[windows] {len(toks)} windows of {args.window}; teacher top-{args.top_k} mass inside the head "
          f"vocabulary: {covered:.3f}", flush=True)

    # the draft: the target's first layers, final norm and (a subset of) its tied head
    dcfg = dataclasses.replace(cfg, n_layers=args.layers, name=f"{cfg.name}-draft{args.layers}")
    tp = gen.params
    head0 = (tp["embed"][vocab_ids].T if cfg.tie_embeddings else tp["lm_head"][:, vocab_ids])
    trainable = {"layers": jax.tree.map(lambda x: jnp.array(x[:args.layers]), tp["layers"]),
                 "final_norm": jnp.array(tp["final_norm"]), "head": jnp.array(head0)}
    embed = tp["embed"]
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 20), args.steps, args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = opt.init(trainable)

    def loss_fn(w, x, c, p, msk):
        B, T = x.shape
        cache = KVCache.init(dcfg, B, T, embed.dtype)
        h, _ = forward({"embed": embed, "layers": w["layers"], "final_norm": w["final_norm"]}, x, cache, cfg=dcfg)
        logq = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w["head"]), axis=-1)
        # cross-entropy against the teacher's top-K distribution (its mass outside the head vocabulary is lost)
        ce = -jnp.sum(p * jnp.take_along_axis(logq, c, axis=-1), axis=-1)
        return jnp.sum(ce * msk) / jnp.maximum(jnp.sum(msk), 1.0)

    @jax.jit
    def train_step(w, s, x, c, p, msk):
        loss, g = jax.value_and_grad(loss_fn)(w, x, c, p, msk)
        upd, s = opt.update(g, s, w)
        return optax.apply_updates(w, upd), s, loss

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        b = rng.integers(0, len(toks), args.batch)
        trainable, opt_state, loss = train_step(trainable, opt_state, jnp.asarray(toks[b]), jnp.asarray(cols[b]),
                                                jnp.asarray(probs[b]), jnp.asarray(mask[b]))
        losses.append(float(loss))
        if step % 25 == 0 or step == args.steps - 1:
            print(f"[train] step {step:4d}  loss {np.mean(losses[-25:]):.3f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    record["time_train_s"] = round(time.perf_counter() - t0, 1)
    record["final_loss"] = round(float(np.mean(losses[-25:])), 4)

    draft = DraftModel(cfg=dcfg, params=trainable, vocab_ids=vocab_ids, meta=record)
    # acceptance on held-out prompts: greedy speculative decoding with this draft (k = 4)
    from aqjax.speculative import SpeculativeGenerator

    t0 = time.perf_counter()
    sg = SpeculativeGenerator(gen, "draft", draft=draft, draft_k=4)
    prompts = [chat(tok, q) for q in HELD_OUT]
    _, stats = sg.generate(prompts, max_new_tokens=args.eval_tokens, return_stats=True)
    record["eval_acceptance"] = round(stats.acceptance, 4)
    record["eval_tokens_per_step"] = round(stats.tokens_per_step, 3)
    _, lstats = sg.generate(prompts, max_new_tokens=args.eval_tokens, speculative="lookup", return_stats=True)
    record["eval_lookup_tokens_per_step"] = round(lstats.tokens_per_step, 3)
    record["time_eval_s"] = round(time.perf_counter() - t0, 1)
    record["time_total_s"] = round(time.perf_counter() - t_all, 1)
    print(f"[eval] held-out greedy, k=4: draft acceptance {stats.acceptance:.3f}, "
          f"{stats.tokens_per_step:.2f} tokens per target forward (lookup: {lstats.tokens_per_step:.2f})", flush=True)

    out = args.out or default_draft_dir(cfg)
    path = save_draft(out, dataclasses.replace(draft, meta=record), target_cfg=cfg)
    print(f"[saved] {path}  (total {record['time_total_s']} s)")
    print(json.dumps(record, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
